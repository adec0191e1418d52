"""Evaluation reports: run evaluators, write ``report.json`` and ``report.md``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic, write_json_atomic
from .config import config_to_dict, to_jsonable
from .dataset import Dataset
from .errors import ConfigError
from .provenance import now_iso, software_versions
from .registry import Registry
from .roles import Context, Evaluator
from .sample import Metric

ARROWS = {"higher": "↑", "lower": "↓", "none": ""}


@dataclass
class EvaluatorResult:
    """The metrics one evaluator gave for one synthetic set."""

    evaluator: str
    config: dict[str, Any]
    synthetic: str
    metrics: list[Metric]


def evaluate(evaluators: Sequence[Evaluator], real: Dataset, synthetic: Dataset) -> list[EvaluatorResult]:
    """Run each evaluator on (real, synthetic), in order."""
    results = []
    for ev in evaluators:
        with ev.context.progress.task(f"evaluating {ev.name} on {synthetic.name}", total=1) as task:
            metrics = ev.evaluate(real, synthetic)
            task.advance()
        results.append(EvaluatorResult(ev.name, config_to_dict(ev.config), synthetic.name, list(metrics)))
    return results


@dataclass(frozen=True)
class Skipped:
    """An evaluator that could not run here, with the line that says how to enable it."""

    evaluator: str
    reason: str


def build_evaluators(registry: Registry, stages: Sequence[Mapping[str, Any]], context: Context, *,
                     skip_unavailable: bool = False) -> tuple[list[Evaluator], list[Skipped]]:
    """Build evaluators from ``{"name": ..., **options}`` stages.

    One that cannot run here raises ConfigError with its reason, or, with ``skip_unavailable``
    (``--evaluator all``), is left out and returned among the skipped.
    """
    built: list[Evaluator] = []
    skipped: list[Skipped] = []
    for stage in stages:
        options = {k: v for k, v in stage.items() if k != "name"}
        component = registry.create("evaluator", stage["name"], options, context=context)
        reason = component.unavailable()
        if reason and not skip_unavailable:
            raise ConfigError(f"evaluator {component.name!r}: {reason}")
        if reason:
            skipped.append(Skipped(component.name, reason))
        else:
            built.append(component)
    return built, skipped


def write_report(folder: Path, real: Dataset, results: Sequence[EvaluatorResult], *,
                 synthetic: Sequence[Dataset] = (), skipped: Sequence[Skipped] = (),
                 figures: bool = True) -> tuple[Path, Path]:
    """Write ``report.json``, ``report.md`` and PNG figures into ``folder``; return the first two.

    The figures are a contact sheet of pairs (real and each ``synthetic`` set, masks outlined),
    bars of every metric with error bars, and a line plot for each metric that carries a curve.
    """
    folder.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    if figures:
        from . import figures as fig

        images.append(fig.contact_sheet(folder / "pairs.png", [real, *synthetic]))
        bars = fig.metric_bars(folder / "metrics.png", results)
        images += [bars] if bars else []
        images += fig.curves(folder, results)
    payload = {
        "created": now_iso(),
        "versions": software_versions(),
        "real": {"name": real.name, "root": str(real.root) if real.root else None, "pairs": len(real)},
        "results": [
            {"evaluator": r.evaluator, "config": r.config, "synthetic": r.synthetic,
             "metrics": [to_jsonable(dataclasses.asdict(m)) for m in r.metrics]}
            for r in results
        ],
        "skipped": [dataclasses.asdict(s) for s in skipped],
        "figures": [p.name for p in images],
    }
    json_path, md_path = folder / "report.json", folder / "report.md"
    write_json_atomic(json_path, payload)
    write_bytes_atomic(md_path, render_markdown(real, results, skipped, [p.name for p in images]).encode())
    return json_path, md_path


def render_markdown(real: Dataset, results: Sequence[EvaluatorResult], skipped: Sequence[Skipped] = (),
                    figures: Sequence[str] = ()) -> str:
    """A Markdown table per synthetic set (evaluator, metric, value ± sd, better direction), then skips and figures."""
    lines = ["# medsynth evaluation report", "", f"Real set: `{real.name}` ({len(real)} pairs)", ""]
    for synthetic in dict.fromkeys(r.synthetic for r in results):
        lines += [f"## Synthetic set `{synthetic}`", "", "| evaluator | metric | value | better |",
                  "|---|---|---|---|"]
        for r in (r for r in results if r.synthetic == synthetic):
            for m in r.metrics:
                lines.append(f"| {r.evaluator} | {m.name} | {format_value(m)} | {ARROWS[m.direction]} |")
        lines.append("")
    if skipped:
        lines += ["## Not run here", ""] + [f"- `{s.evaluator}`: {s.reason}" for s in skipped] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + [""]
    return "\n".join(lines)


def format_value(metric: Metric) -> str:
    """``0.123 ± 0.045`` with four significant digits."""
    text = _num(metric.value)
    if metric.sd is not None:
        text += f" ± {_num(metric.sd)}"
    return text


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4g}"
