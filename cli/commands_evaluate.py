"""``medsynth evaluate``: score synthetic sets against a real one and write a report."""

from __future__ import annotations

from pathlib import Path

import typer

from medsynth_core import ConfigError, build_evaluators, default_registry, evaluate, open_dataset, write_report

from .app import app
from .commands_run import make_context
from .console import log
from .errors import reports_errors
from .options import apply_sets
from .reporting import print_results


@app.command("evaluate")
@reports_errors
def evaluate_command(
    real: Path = typer.Option(..., "--real", help="Real dataset folder."),
    synthetic: list[Path] = typer.Option(..., "--synthetic", help="Synthetic dataset folder (repeatable)."),
    evaluator: list[str] = typer.Option(
        ..., "--evaluator", "-e", help="Evaluator (repeatable); 'all' runs every one that can run here."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for report.json and report.md."),
    sets: list[str] = typer.Option([], "--set", "-s", help="EVALUATOR.OPTION=VALUE, e.g. mask-stats.min_component=9."),
    device: str = typer.Option("auto", "--device", help="'auto', 'cpu', 'cuda', ..."),
    layout: str = typer.Option("auto", "--layout", help="Layout of --real: auto, medsynth, nnunet or msd."),
    slice_axis: int = typer.Option(2, "--slice-axis", help="Axis to slice 3-D volumes of --real along."),
    drop_empty: bool = typer.Option(False, "--drop-empty", help="Drop 3-D slices of --real with an empty label."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to standard output."),
) -> None:
    """Score one or more synthetic sets against the real set with any evaluators."""
    registry = default_registry()
    names = [c.name for c in registry.components("evaluator")] if "all" in evaluator else evaluator
    stages = apply_sets({"evaluators": [{"name": e} for e in dict.fromkeys(names)]}, sets)["evaluators"]
    context = make_context(device)
    evaluators, skipped = build_evaluators(registry, stages, context, skip_unavailable="all" in evaluator)
    for s in skipped:
        log(f"skipping {s.evaluator}: {s.reason}")
    if len(set(map(str, synthetic))) != len(synthetic):
        raise ConfigError("the same --synthetic folder is given twice")
    real_set = open_dataset(real, layout=layout, slice_axis=slice_axis, drop_empty=drop_empty)
    synthetic_sets = [open_dataset(path, labels=real_set.labels) for path in synthetic]
    set_names = [d.name for d in synthetic_sets]
    for dataset, path in zip(synthetic_sets, synthetic):
        if set_names.count(dataset.name) > 1:
            dataset.name = str(path)  # two folders of the same name must stay apart in the report
    for dataset in (real_set, *synthetic_sets):
        dataset.validate(context.progress)
    results = []
    for dataset in synthetic_sets:
        results += evaluate(evaluators, real_set, dataset)
    json_path, md_path = write_report(out, real_set, results, synthetic=synthetic_sets, skipped=skipped)
    if as_json:
        typer.echo(json_path.read_text())
        return
    print_results(results)
    log(f"report: {md_path}")

