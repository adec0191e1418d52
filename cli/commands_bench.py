"""``medsynth bench``: every installed method, the same data, seeds and evaluators, one table."""

from __future__ import annotations

from pathlib import Path

import typer

from medsynth_core import default_registry
from medsynth_core.bench import DEFAULT_EVALUATORS, BenchSettings, bench_methods, run_bench

from .app import app
from .commands_run import make_context
from .console import log
from .errors import reports_errors
from .options import apply_sets
from .reporting import print_results


@app.command("bench")
@reports_errors
def bench(
    data: Path = typer.Option(..., "--data", help="Real dataset folder (e.g. `medsynth demo-data data/demo`)."),
    out: Path = typer.Option(Path("runs/bench"), "--out", "-o", help="Folder for the runs and bench.md."),
    method: list[str] = typer.Option([], "--method", "-m",
                                     help="Generator to compare (repeatable); default: every one with a recipe."),
    evaluator: list[str] = typer.Option([], "--evaluator", "-e",
                                        help="Evaluator (repeatable); default: fid[segmenter], ms-ssim, "
                                             "mask-agreement, utility at N = all."),
    n: int = typer.Option(32, "--n", "-n", help="Pairs per method."),
    seed: int = typer.Option(0, "--seed", help="Seed shared by every method."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per batch."),
    sets: list[str] = typer.Option([], "--set", "-s", help="EVALUATOR.OPTION=VALUE, e.g. utility.repeats=3."),
    device: str = typer.Option("auto", "--device", help="'auto', 'cpu', 'cuda', ..."),
) -> None:
    """Run every installed method on the same data and write one comparison table (a killed bench resumes)."""
    registry = default_registry()
    methods = bench_methods(registry, method)
    stages = [{"name": e} for e in dict.fromkeys(evaluator)] if evaluator else [dict(e) for e in DEFAULT_EVALUATORS]
    stages = apply_sets({"evaluators": stages}, sets)["evaluators"]
    settings = BenchSettings(data=data, out=out, n=n, seed=seed, batch_size=batch_size, evaluators=stages)
    result = run_bench(settings, registry, make_context(device), methods)
    print_results(result.results)
    log(f"table: {result.table}")
