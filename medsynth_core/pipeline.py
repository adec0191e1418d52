"""Pipeline files: parse, check and build ``MaskSource -> Generator -> Refiner* -> Filter* -> Evaluator*``.

A pipeline file is TOML::

    [run]
    n = 16
    data = "demo"

    [mask_source]
    name = "real-masks"

    [generator]
    name = "augment"
    elastic = true          # every other key is an option of the component

    [[refiners]]
    name = "threshold"

    [[filters]]
    name = "mask-area"
    min_fraction = 0.05

    [[evaluators]]
    name = "mask-stats"

Everything is checked before any work starts: unknown sections or keys, wrong types and
unknown component names each give one error line with the valid choices.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import build_config, config_to_dict, option
from .dataset import Dataset, open_dataset
from .errors import ConfigError
from .registry import Registry
from .roles import Context, Evaluator, Filter, Generator, MaskSource, Refiner

SECTIONS = ("run", "mask_source", "generator", "refiners", "filters", "evaluators")
LIST_SECTIONS = {"refiners": "refiner", "filters": "filter", "evaluators": "evaluator"}


@dataclass(frozen=True)
class RunConfig:
    """Settings of a run as a whole (the ``[run]`` section)."""

    n: int = option(16, "Number of pairs to keep (pairs dropped by filters do not count).")
    seed: int = option(0, "Run seed; sample i is drawn with a seed derived from this seed and i.")
    batch_size: int = option(8, "Samples generated per batch; results do not depend on it.")
    data: str | None = option(None, "Real dataset folder (images/ + masks/), for fitting and evaluation.")
    out: str | None = option(None, "Output folder for the pairs, manifest, card and report.")
    layout: Literal["auto", "medsynth", "nnunet", "msd"] = option(
        "auto", "Layout of the real dataset: images/+masks/, nnU-Net v2 raw, or Decathlon 3-D NIfTI.")
    slice_axis: int = option(2, "Axis along which 3-D volumes are cut into 2-D slices (0, 1 or 2).")
    drop_empty: bool = option(False, "Leave out slices of 3-D volumes whose label is empty.")
    device: str = option("auto", "Torch device: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    max_candidates: int | None = option(None, "Give up after this many candidates (default: 50 x n).")
    workers: int = option(0, "Worker processes that refine and PNG-encode a batch while the next one is sampled "
                             "(refiners marked in_worker); 0: all in this process, one step after another.")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "Autocast while generating: bf16 (CPU or GPU) or fp16 (GPU only); changes the pixels slightly.")
    channels_last: bool = option(False, "Put the generator's networks in channels-last memory format (faster "
                                        "convolutions on recent GPUs).")
    compile: bool = option(False, "torch.compile the generator's networks (slow first batch, faster after).")

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_candidates is not None and self.max_candidates < self.n:
            raise ConfigError(f"max_candidates must be >= n ({self.n}), got {self.max_candidates}")
        if self.slice_axis not in (0, 1, 2):
            raise ConfigError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class StageSpec:
    """One stage as written in a pipeline file: a component name and its options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The stage as a plain dict (``name`` first, then options)."""
        return {"name": self.name, **self.options}


@dataclass(frozen=True)
class PipelineSpec:
    """A whole pipeline before its components are built."""

    run: RunConfig
    generator: StageSpec
    checkpoint: str | None = None
    mask_source: StageSpec | None = None
    refiners: tuple[StageSpec, ...] = ()
    filters: tuple[StageSpec, ...] = ()
    evaluators: tuple[StageSpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The spec as TOML-shaped plain data, for dataset cards."""
        gen = self.generator.to_dict()
        if self.checkpoint:
            gen["checkpoint"] = self.checkpoint
        return {
            "run": config_to_dict(self.run),
            "mask_source": self.mask_source.to_dict() if self.mask_source else None,
            "generator": gen,
            "refiners": [s.to_dict() for s in self.refiners],
            "filters": [s.to_dict() for s in self.filters],
            "evaluators": [s.to_dict() for s in self.evaluators],
        }


def load_pipeline(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineSpec:
    """Read a TOML pipeline file; ``overrides`` replaces ``[run]`` keys (from CLI flags)."""
    return parse_pipeline(read_pipeline_file(path), str(path), overrides)


def read_pipeline_file(path: str | Path) -> dict[str, Any]:
    """The raw data of a TOML pipeline file, or ConfigError naming the file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from None


def parse_pipeline(data: Mapping[str, Any], where: str = "pipeline",
                   overrides: Mapping[str, Any] | None = None) -> PipelineSpec:
    """Check the shape of pipeline data (names are checked later, by ``build_pipeline``)."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section [{unknown[0]}]; valid sections: {', '.join(SECTIONS)}")
    run_values = dict(_table(data.get("run", {}), f"{where} [run]"))
    run_values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    run = build_config(RunConfig, run_values, f"{where} [run]")
    if "generator" not in data:
        raise ConfigError(f"{where}: no [generator] section; name the generator to run")
    gen_value = data["generator"]
    gen_table = {"name": gen_value} if isinstance(gen_value, str) else dict(_table(gen_value, f"{where} [generator]"))
    checkpoint = gen_table.pop("checkpoint", None)
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise ConfigError(f"{where} [generator]: checkpoint must be a string path, got {checkpoint!r}")
    lists = {key: tuple(_stage(item, f"{where} [[{key}]] #{i + 1}") for i, item in
                        enumerate(_list(data.get(key, []), f"{where} [[{key}]]"))) for key in LIST_SECTIONS}
    return PipelineSpec(
        run=run,
        generator=_stage(gen_table, f"{where} [generator]"),
        checkpoint=checkpoint,
        mask_source=_stage(data["mask_source"], f"{where} [mask_source]") if "mask_source" in data else None,
        **lists,
    )


@dataclass
class Pipeline:
    """Built components, ready to run."""

    spec: PipelineSpec
    mask_source: MaskSource | None
    generator: Generator
    refiners: list[Refiner]
    filters: list[Filter]
    evaluators: list[Evaluator]

    def open_real(self) -> Dataset:
        """The real dataset named by ``[run]`` (data, layout, slice axis, empty slices)."""
        run = self.spec.run
        return open_dataset(run.data, layout=run.layout, slice_axis=run.slice_axis, drop_empty=run.drop_empty)

    @property
    def needs_data(self) -> bool:
        """Whether some stage must see the real dataset."""
        return bool(
            (self.mask_source is not None and self.mask_source.needs_data)
            or any(f.needs_data for f in self.filters)
            or self.evaluators
        )

    def fingerprint(self) -> str:
        """A hash of everything that decides which pairs a run makes.

        Built from the components' full configs, so an option written out at its default value
        and one left out give the same fingerprint; n, batch size, output folder, device and
        evaluators do not count; nor do worker processes, which change where work runs, not its result.
        """
        stages = [self.mask_source, self.generator, *self.refiners, *self.filters]
        data = {
            "seed": self.spec.run.seed,
            "data": self.spec.run.data,
            "layout": [self.spec.run.layout, self.spec.run.slice_axis, self.spec.run.drop_empty],
            "checkpoint": self.spec.checkpoint,
            "stages": [[c.role, c.name, config_to_dict(c.config)] for c in stages if c is not None],
        }
        numerics = [self.spec.run.precision, self.spec.run.channels_last, self.spec.run.compile]
        if numerics != ["fp32", False, False]:
            data["numerics"] = numerics  # they change the pixels; left at their defaults they leave old runs be
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def stages(self) -> list[Any]:
        """Every component in running order."""
        head = [self.mask_source] if self.mask_source is not None else []
        return [*head, self.generator, *self.refiners, *self.filters, *self.evaluators]


def build_pipeline(spec: PipelineSpec, registry: Registry, context: Context | None = None) -> Pipeline:
    """Build every component of ``spec`` and check that they fit together."""
    context = context or Context()

    def make(role: str, stage: StageSpec, where: str) -> Any:
        return registry.create(role, stage.name, stage.options, context=context, where=where)

    source = make("mask_source", spec.mask_source, f"[mask_source] {spec.mask_source.name!r}") \
        if spec.mask_source else None
    generator = make("generator", spec.generator, f"[generator] {spec.generator.name!r}")
    built = {key: [make(role, s, f"[[{key}]] {s.name!r}") for s in getattr(spec, key)]
             for key, role in LIST_SECTIONS.items()}
    pipeline = Pipeline(spec, source, generator, built["refiners"], built["filters"], built["evaluators"])
    _check_fit(pipeline)
    return pipeline


def _check_fit(p: Pipeline) -> None:
    gen = p.generator
    provided = p.mask_source.provides if p.mask_source else frozenset()
    missing = sorted(gen.requires - provided)
    if missing:
        source = f"mask source {p.mask_source.name!r} gives {', '.join(sorted(provided)) or 'nothing'}" \
            if p.mask_source else "there is no [mask_source]"
        raise ConfigError(f"generator {gen.name!r} needs conditions with {', '.join(missing)}, but {source}")
    if "mask" not in gen.makes and "soft_mask" in gen.makes and not p.refiners:
        raise ConfigError(f"generator {gen.name!r} makes soft masks only; add a refiner such as 'threshold'")
    if not gen.makes & {"mask", "soft_mask"} and "mask" not in provided:
        raise ConfigError(f"generator {gen.name!r} makes no mask and no mask source gives one; "
                          "add a [mask_source] such as 'real-masks'")
    if p.spec.checkpoint and not gen.trainable:
        raise ConfigError(f"generator {gen.name!r} is not trained and takes no checkpoint; remove the checkpoint")
    if gen.trainable and not p.spec.checkpoint:
        raise ConfigError(f"generator {gen.name!r} needs a checkpoint: run `medsynth train {gen.name}` "
                          "and set [generator] checkpoint to its --out folder")
    for evaluator in p.evaluators:
        reason = evaluator.unavailable()
        if reason:
            raise ConfigError(f"evaluator {evaluator.name!r}: {reason}")
    if p.needs_data and not p.spec.run.data:
        users = [c.name for c in p.stages() if getattr(c, "needs_data", False) or isinstance(c, Evaluator)]
        raise ConfigError(f"{', '.join(users)} need the real dataset: set [run] data or pass --data")


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of tables, got {value!r}")
    return value


def _stage(value: Any, where: str) -> StageSpec:
    if isinstance(value, str):
        return StageSpec(value)
    table = dict(_table(value, where))
    name = table.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: missing name = \"...\" (the component to use)")
    return StageSpec(name, table)

