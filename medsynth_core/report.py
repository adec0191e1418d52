"""Evaluation reports: run evaluators, write ``report.json`` and ``report.md``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic, write_json_atomic
from .config import config_to_dict, to_jsonable
from .dataset import Dataset
from .provenance import now_iso, software_versions
from .roles import Evaluator
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


def write_report(folder: Path, real: Dataset, results: Sequence[EvaluatorResult]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "created": now_iso(),
        "versions": software_versions(),
        "real": {"name": real.name, "root": str(real.root) if real.root else None, "pairs": len(real)},
        "results": [
            {"evaluator": r.evaluator, "config": r.config, "synthetic": r.synthetic,
             "metrics": [to_jsonable(dataclasses.asdict(m)) for m in r.metrics]}
            for r in results
        ],
    }
    json_path, md_path = folder / "report.json", folder / "report.md"
    write_json_atomic(json_path, payload)
    write_bytes_atomic(md_path, render_markdown(real, results).encode())
    return json_path, md_path


def render_markdown(real: Dataset, results: Sequence[EvaluatorResult]) -> str:
    """A Markdown table per synthetic set: evaluator, metric, value (± sd), better direction."""
    lines = ["# medsynth evaluation report", "", f"Real set: `{real.name}` ({len(real)} pairs)", ""]
    for synthetic in dict.fromkeys(r.synthetic for r in results):
        lines += [f"## Synthetic set `{synthetic}`", "", "| evaluator | metric | value | better |",
                  "|---|---|---|---|"]
        for r in (r for r in results if r.synthetic == synthetic):
            for m in r.metrics:
                lines.append(f"| {r.evaluator} | {m.name} | {format_value(m)} | {ARROWS[m.direction]} |")
        lines.append("")
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
