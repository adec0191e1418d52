"""``medsynth bench``: every installed method on the same data, seeds, pair count and evaluators.

A method is a generator with a ``recipe``. Each is trained (when trainable) into
``OUT/<method>/checkpoint``, run into ``OUT/<method>/pairs``, and scored with the same
evaluators; ``OUT/bench.md`` is one table, a row per method, with fidelity, variety, utility
and cost columns, beside the usual report and its figures. Finished steps are recorded in
``OUT/bench.json`` (with each method's scores), so a killed bench resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic, write_json_atomic
from .config import to_jsonable
from .dataset import Dataset, open_dataset
from .errors import ConfigError
from .pipeline import build_pipeline, parse_pipeline
from .registry import Registry
from .report import EvaluatorResult, Skipped, build_evaluators, evaluate, format_value, write_report
from .roles import Context
from .runner import run_pipeline
from .sample import Metric

STATE = "bench.json"
CHECKPOINT_PLACEHOLDER = "{checkpoint}"
RECIPE_KEYS = frozenset({"train", "mask_source", "generator", "refiners", "filters"})
DEFAULT_EVALUATORS: tuple[dict[str, Any], ...] = (
    {"name": "fid", "extractor": "segmenter"},   # fidelity, with no downloaded weights
    {"name": "ms-ssim", "pairs": 200},          # variety
    {"name": "mask-agreement"},                  # does the image show its mask?
    {"name": "utility", "n_real": ["all"]},      # does a segmenter trained with the pairs do better?
)


@dataclass
class BenchSettings:
    """What every method shares."""

    data: Path
    out: Path
    n: int = 32
    seed: int = 0
    batch_size: int = 8
    evaluators: Sequence[Mapping[str, Any]] = DEFAULT_EVALUATORS


@dataclass
class BenchResult:
    """The rows of the table and where they were written."""

    table: Path
    results: list[EvaluatorResult]
    skipped: list[Skipped] = field(default_factory=list)


def bench_methods(registry: Registry, names: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The recipes of ``names`` (default: every installed generator that has one)."""
    recipes = {c.name: c.cls.recipe for c in registry.components("generator") if c.cls.recipe}
    if not names:
        if not recipes:
            raise ConfigError("no installed generator has a recipe for `medsynth bench`")
        return recipes
    for name in names:
        registry.get("generator", name)  # unknown names get the registry's one-line error
        if name not in recipes:
            raise ConfigError(f"generator {name!r} has no recipe for `medsynth bench`; "
                              f"methods with one: {', '.join(sorted(recipes))}")
    return {name: recipes[name] for name in names}


def run_bench(settings: BenchSettings, registry: Registry, context: Context,
              methods: Mapping[str, Mapping[str, Any]]) -> BenchResult:
    """Train, run and score every method; write ``bench.md`` and the report into ``settings.out``."""
    for name, recipe in methods.items():
        unknown = sorted(set(recipe) - RECIPE_KEYS)
        if unknown:
            raise ConfigError(f"recipe of {name!r}: unknown key {unknown[0]!r}; "
                              f"valid: {', '.join(sorted(RECIPE_KEYS))}")
    stages = [dict(e) for e in settings.evaluators]
    evaluators, skipped = build_evaluators(registry, stages, context, skip_unavailable=True)
    for s in skipped:
        context.log(f"skipping {s.evaluator}: {s.reason}")
    real = open_dataset(settings.data)
    real.validate(context.progress)
    settings.out.mkdir(parents=True, exist_ok=True)
    state = _read_state(settings)
    results: list[EvaluatorResult] = []
    sets: list[Dataset] = []
    for name, recipe in methods.items():
        cost = state["methods"].setdefault(name, {})
        checkpoint = _train(name, recipe, real, settings, registry, context, cost, state)
        synthetic = _generate(name, recipe, checkpoint, real, settings, registry, context, cost, state)
        sets.append(synthetic)
        if cost.get("evaluators") != stages:  # scored before with these evaluators: keep those scores
            cost["results"] = [_result_to_json(r) for r in evaluate(evaluators, real, synthetic)]
            cost["evaluators"] = stages
            _write_state(settings, state)
        results += [_result_from_json(r) for r in cost["results"]]
        results.append(_cost_result(name, cost, settings.n))
    write_report(settings.out, real, results, synthetic=sets, skipped=skipped)
    table = settings.out / "bench.md"
    write_bytes_atomic(table, render_table(real, settings, results, skipped).encode())
    return BenchResult(table, results, skipped)


def _train(name: str, recipe: Mapping[str, Any], real: Dataset, settings: BenchSettings, registry: Registry,
           context: Context, cost: dict[str, Any], state: dict[str, Any]) -> Path | None:
    if not registry.get("generator", name).cls.trainable:
        return None
    checkpoint = settings.out / name / "checkpoint"
    if "train_seconds" in cost:
        return checkpoint
    context.log(f"{name}: training")
    component = registry.create("generator", name, dict(recipe.get("train", {})), context=context,
                                where=f"recipe of {name!r} [train]")
    started = time.perf_counter()
    component.fit(real, checkpoint)  # resumes from what a killed bench left there
    cost["train_seconds"] = time.perf_counter() - started
    _write_state(settings, state)
    return checkpoint


def _generate(name: str, recipe: Mapping[str, Any], checkpoint: Path | None, real: Dataset,
              settings: BenchSettings, registry: Registry, context: Context, cost: dict[str, Any],
              state: dict[str, Any]) -> Dataset:
    folder = settings.out / name / "pairs"
    if "generate_seconds" not in cost:
        context.log(f"{name}: generating {settings.n} pairs")
        raw: dict[str, Any] = {
            "run": {"n": settings.n, "seed": settings.seed, "batch_size": settings.batch_size,
                    "data": str(settings.data), "out": str(folder)},
            "generator": {"name": name, **recipe.get("generator", {})},
        }
        if checkpoint is not None:
            raw["generator"]["checkpoint"] = str(checkpoint)
        for key in ("mask_source", "refiners", "filters"):
            if key in recipe:
                raw[key] = _with_checkpoint(recipe[key], checkpoint)
        pipeline = build_pipeline(parse_pipeline(raw, f"recipe of {name!r}"), registry, context)
        started = time.perf_counter()
        run_pipeline(pipeline, resume=True, real=real)
        cost["generate_seconds"] = time.perf_counter() - started
        _write_state(settings, state)
    synthetic = open_dataset(folder, labels=real.labels)
    synthetic.name = name
    return synthetic


def _result_to_json(result: EvaluatorResult) -> dict[str, Any]:
    return to_jsonable(dataclasses.asdict(result))


def _result_from_json(data: Mapping[str, Any]) -> EvaluatorResult:
    metrics = [Metric(**m) for m in data["metrics"]]
    return EvaluatorResult(data["evaluator"], data["config"], data["synthetic"], metrics)


def _with_checkpoint(value: Any, checkpoint: Path | None) -> Any:
    """The recipe section with every ``"{checkpoint}"`` replaced by the trained checkpoint folder
    (a mask source that samples from the generator's own checkpoint names it so)."""
    if isinstance(value, str) and value == CHECKPOINT_PLACEHOLDER:
        if checkpoint is None:
            raise ConfigError("a recipe names {checkpoint} but its generator is not trained")
        return str(checkpoint)
    if isinstance(value, Mapping):
        return {k: _with_checkpoint(v, checkpoint) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_checkpoint(v, checkpoint) for v in value]
    return value


def _cost_result(name: str, cost: Mapping[str, Any], n: int) -> EvaluatorResult:
    train, generate = cost.get("train_seconds", 0.0), cost["generate_seconds"]
    metrics = [Metric("train_seconds", train, "lower"), Metric("generate_seconds", generate, "lower"),
               Metric("pairs_per_second", n / generate if generate else float("nan"), "higher")]
    return EvaluatorResult("cost", {}, name, metrics)


def render_table(real: Dataset, settings: BenchSettings, results: Sequence[EvaluatorResult],
                 skipped: Sequence[Skipped] = ()) -> str:
    """One Markdown table: a row per method, a column per metric that has a better direction."""
    methods = list(dict.fromkeys(r.synthetic for r in results))
    columns: list[tuple[str, str]] = []
    cells: dict[tuple[str, str, str], str] = {}
    arrow: dict[tuple[str, str], str] = {}
    for r in results:
        for m in r.metrics:
            if m.direction == "none":
                continue
            key = (r.evaluator, m.name)
            if key not in columns:
                columns.append(key)
            cells[(r.synthetic, *key)] = format_value(m)
            arrow[key] = "↑" if m.direction == "higher" else "↓"
    lines = [
        "# medsynth bench",
        "",
        f"Real set `{real.name}` ({len(real)} pairs); {settings.n} pairs per method, seed {settings.seed}, "
        "the same evaluators for every method. Cost is wall-clock seconds on this machine.",
        "",
        "| method | " + " | ".join(f"{e}: {m} {arrow[e, m]}" for e, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(cells.get((method, e, m), "") for e, m in columns) + " |")
    if skipped:
        lines += ["", "Not run here: " + "; ".join(f"`{s.evaluator}` ({s.reason})" for s in skipped)]
    lines += ["", "Figures and every metric: [report.md](report.md).", ""]
    return "\n".join(lines)


def _read_state(settings: BenchSettings) -> dict[str, Any]:
    path = settings.out / STATE
    fresh = {"data": str(settings.data), "n": settings.n, "seed": settings.seed, "methods": {}}
    if not path.is_file():
        return fresh
    try:
        state = json.loads(path.read_text())
    except ValueError:
        return fresh
    if {k: state.get(k) for k in ("data", "n", "seed")} != {k: fresh[k] for k in ("data", "n", "seed")}:
        raise ConfigError(f"{settings.out}: holds a bench of other data, n or seed; choose another --out")
    return state


def _write_state(settings: BenchSettings, state: dict[str, Any]) -> None:
    write_json_atomic(settings.out / STATE, state)
