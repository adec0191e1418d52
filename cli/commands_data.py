"""``medsynth demo-data``: the embedded default dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from medsynth_core.demo_data import write_demo_dataset

from .app import app
from .console import RichProgress, log, settings
from .errors import reports_errors


@app.command("demo-data")
@reports_errors
def demo_data(
    out: Path = typer.Argument(..., help="Folder to create (must not exist or be empty)."),
    n: int = typer.Option(32, "--n", "-n", help="Number of pairs."),
    size: int = typer.Option(128, "--size", help="Image size in pixels (32-512)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed writes the same files."),
    nodules: bool = typer.Option(False, "--nodules", help="Add small nodules inside the lungs."),
) -> None:
    """Write seeded chest-radiograph phantoms with lung masks: data for every command, no download."""
    folder = write_demo_dataset(out, n=n, size=size, seed=seed, nodules=nodules,
                                progress=RichProgress(quiet=settings.quiet))
    log(f"demo set of {n} pairs ready in {folder}")
