"""``medsynth run`` and ``medsynth train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from medsynth_core import (
    ConfigError,
    Context,
    PipelineError,
    build_config,
    build_pipeline,
    default_registry,
    open_dataset,
    parse_pipeline,
    read_pipeline_file,
    run_pipeline,
)
from medsynth_core.checkpoint import CARD as CHECKPOINT_CARD
from medsynth_core.checkpoint import read_checkpoint_card
from medsynth_core.distributed import current_processes
from medsynth_core.runner import check_run_folder
from medsynth_core.training import EXTRAS_KEY as TRAINING
from medsynth_core.training import TrainingSettings

from .app import app
from .console import RichProgress, log, settings
from .errors import reports_errors
from .launcher import launched, relaunch
from .options import apply_sets, parse_extra_options
from .reporting import print_results


def make_context(device: str) -> Context:
    """The context every component of one command shares; only the main process draws and logs."""
    procs = current_processes()
    quiet = settings.quiet or not procs.is_main
    return Context(device=resolve_device(device, procs.local_rank), progress=RichProgress(quiet=quiet),
                   log=(lambda line: None) if quiet else log)


def resolve_device(device: str, local_rank: int = 0) -> str:
    """'auto' becomes this process's GPU when one is visible, else 'cpu'."""
    if device != "auto":
        return device
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


@app.command("run")
@reports_errors
def run(
    pipeline: Path | None = typer.Argument(None, help="Pipeline TOML file; or describe the stages with flags."),
    data: str | None = typer.Option(None, "--data", help="Real dataset folder (overrides [run] data)."),
    layout: str | None = typer.Option(None, "--layout", help="auto, medsynth, nnunet or msd (overrides [run])."),
    slice_axis: int | None = typer.Option(None, "--slice-axis", help="Axis to slice 3-D volumes along."),
    drop_empty: bool | None = typer.Option(None, "--drop-empty/--keep-empty", help="Drop empty 3-D slices."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (overrides [run] out)."),
    n: int | None = typer.Option(None, "--n", "-n", help="Pairs to keep (overrides [run] n)."),
    seed: int | None = typer.Option(None, "--seed", help="Run seed (overrides [run] seed)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Samples per batch."),
    device: str | None = typer.Option(None, "--device", help="'auto', 'cpu', 'cuda', ..."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run in --out."),
    generator: str | None = typer.Option(None, "--generator", "-g", help="Generator, when no pipeline file."),
    mask_source: str | None = typer.Option(None, "--mask-source", "-m", help="Mask source, when no file."),
    refiner: list[str] = typer.Option([], "--refiner", help="Refiner (repeatable), when no pipeline file."),
    filter_: list[str] = typer.Option([], "--filter", help="Filter (repeatable), when no pipeline file."),
    evaluator: list[str] = typer.Option([], "--evaluator", help="Evaluator (repeatable), when no file."),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help="Checkpoint of a trained generator."),
    sets: list[str] = typer.Option([], "--set", "-s", help="SECTION.OPTION=VALUE, e.g. generator.rotation=15."),
    processes: int = typer.Option(1, "--processes", help="Split the samples over N processes (accelerate)."),
) -> None:
    """Run a pipeline: mask source -> generator -> refiners -> filters -> write -> evaluators."""
    stage_flags = generator or mask_source or refiner or filter_ or evaluator
    if pipeline is not None and stage_flags:
        raise ConfigError("give either a pipeline file or stage flags (--generator, ...), not both")
    if pipeline is None and not generator:
        raise ConfigError("give a pipeline file, or at least --generator NAME")
    if pipeline is not None:
        raw, where = read_pipeline_file(pipeline), str(pipeline)
    else:
        raw, where = _pipeline_from_flags(generator, mask_source, refiner, filter_, evaluator), "command line"
    if checkpoint:
        raw.setdefault("generator", {})
        raw["generator"] = {**raw["generator"], "checkpoint": checkpoint}
    raw = apply_sets(raw, sets)
    overrides = {"data": data, "out": out, "n": n, "seed": seed, "batch_size": batch_size, "device": device,
                 "layout": layout, "slice_axis": slice_axis, "drop_empty": drop_empty}
    spec = parse_pipeline(raw, where, overrides)
    context = make_context(spec.run.device)
    built = build_pipeline(spec, default_registry(), context)
    real = built.open_real() if spec.run.data else None
    if processes != 1 and not launched():
        check_run_folder(built, resume)  # bad input: one line here, before any process starts
        if real is not None and built.needs_data:
            real.validate(context.progress)
        relaunch(processes, spec.run.device)
    result = run_pipeline(built, resume=resume, real=real)
    if not current_processes().is_main:
        return
    dropped = ", ".join(f"{k}: {v}" for k, v in result.dropped_by.items()) or "none"
    log(f"kept {result.kept} pairs in {result.out} (dropped {result.dropped}: {dropped})")
    if result.results:
        print_results(result.results)
        log(f"report: {result.out / 'report.md'}")


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@reports_errors
def train(
    ctx: typer.Context,
    generator: str = typer.Argument(..., help="Trainable generator (see `medsynth list --role generator`)."),
    data: Path = typer.Option(..., "--data", help="Real dataset folder (images/ + masks/, nnU-Net or MSD)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to write."),
    layout: str = typer.Option("auto", "--layout", help="auto, medsynth, nnunet or msd."),
    slice_axis: int = typer.Option(2, "--slice-axis", help="Axis to slice 3-D volumes along."),
    drop_empty: bool = typer.Option(False, "--drop-empty", help="Drop 3-D slices with an empty label."),
    device: str = typer.Option("auto", "--device", help="'auto', 'cpu', 'cuda', ..."),
    resume: bool = typer.Option(False, "--resume", help="Continue training from the checkpoint in --out."),
    processes: int = typer.Option(1, "--processes", help="Data-parallel training over N processes (accelerate)."),
    mixed_precision: str = typer.Option("auto", "--mixed-precision",
                                        help="auto (the generator's option), no, fp16 or bf16."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Gradient accumulation steps per optimiser step."),
) -> None:
    """Train a generator; its options follow as --name value (see `medsynth info GENERATOR`)."""
    registry = default_registry()
    info = registry.get("generator", generator)
    if not info.cls.trainable:
        raise ConfigError(f"generator {generator!r} needs no training; use it directly in `medsynth run`")
    options = parse_extra_options(ctx.args, info.cls.Config, f"generator {generator!r}")
    build_config(info.cls.Config, options, f"generator {generator!r}")  # check before touching the disk
    training = TrainingSettings(mixed_precision=mixed_precision, grad_accum=grad_accum)
    procs = current_processes()
    error = None
    if procs.is_main:  # the others would see the main process's first files as a non-empty folder
        try:
            _check_checkpoint_folder(out, generator, resume)
        except PipelineError as err:
            error = err
    procs.agree(error)
    dataset = open_dataset(data, require_masks=False, layout=layout, slice_axis=slice_axis, drop_empty=drop_empty)
    context = make_context(device)
    dataset.validate(context.progress)
    if processes != 1 and not launched():
        relaunch(processes, device)
    context.extras[TRAINING] = training
    component = registry.create("generator", generator, options, context=context)
    checkpoint = component.fit(dataset, out)
    procs.finish()
    log(f"checkpoint: {checkpoint}")


def _check_checkpoint_folder(out: Path, generator: str, resume: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise PipelineError(f"{out}: folder is not empty; pass --resume to continue training there")
        if (out / CHECKPOINT_CARD).is_file():
            read_checkpoint_card(out, expected=generator)


def _pipeline_from_flags(generator: str | None, mask_source: str | None, refiners: list[str],
                         filters: list[str], evaluators: list[str]) -> dict[str, Any]:
    raw: dict[str, Any] = {"generator": {"name": generator}}
    if mask_source:
        raw["mask_source"] = {"name": mask_source}
    for key, names in (("refiners", refiners), ("filters", filters), ("evaluators", evaluators)):
        if names:
            raw[key] = [{"name": n} for n in names]
    return raw

