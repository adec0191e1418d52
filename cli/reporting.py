"""Evaluation results as a rich table in the terminal."""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape
from rich.table import Table

from medsynth_core import EvaluatorResult
from medsynth_core.report import ARROWS, format_value

from .console import out_console, settings


def print_results(results: Sequence[EvaluatorResult]) -> None:
    """One table: synthetic set, evaluator, metric, value and which way is better."""
    if settings.quiet:
        return
    table = Table(title="evaluation")
    for column in ("synthetic set", "evaluator", "metric", "value", "better"):
        table.add_column(column, overflow="fold")
    for r in results:
        for m in r.metrics:
            # names such as 'dice[real]' are text, not rich markup
            table.add_row(escape(r.synthetic), escape(r.evaluator), escape(m.name), format_value(m),
                          ARROWS[m.direction])
    out_console.print(table)
