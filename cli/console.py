"""Terminal output: rich progress bars, log lines and one-line errors, all on stderr.

Standard output is kept for results (``--json``) so that it can be piped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


@dataclass
class Settings:
    """Global flags of one invocation."""

    quiet: bool = False
    debug: bool = False


settings = Settings()


class _RichTask:
    def __init__(self, bar: Progress, task_id: Any) -> None:
        self._bar, self._id = bar, task_id

    def advance(self, n: int = 1) -> None:
        self._bar.advance(self._id, n)
        speed = next(t for t in self._bar.tasks if t.id == self._id).speed
        if speed:
            self._bar.update(self._id, rate=f"{speed:.2f}/s")

    def show(self, **fields: Any) -> None:
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._bar.update(self._id, info=text)


class _SilentTask:
    def advance(self, n: int = 1) -> None:
        pass

    def show(self, **fields: Any) -> None:
        pass


@dataclass
class RichProgress:
    """The core's Progress protocol drawn with rich: rate, M/N, elapsed and ETA per task."""

    quiet: bool = False
    _bar: Progress | None = field(default=None, init=False)
    _open: int = field(default=0, init=False)

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        if self.quiet:
            yield _SilentTask()
            return
        if self._bar is None:
            self._bar = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("[cyan]{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=err_console, transient=False,
            )
            self._bar.start()
        task_id = self._bar.add_task(description, total=total, info="", rate="")
        self._open += 1
        try:
            yield _RichTask(self._bar, task_id)
        finally:
            self._open -= 1
            if self._open == 0:
                self._bar.stop()
                self._bar = None


def log(message: str) -> None:
    """Print one informational line unless ``--quiet``."""
    if not settings.quiet:
        # paths and "[generator]" are text, not rich markup; a wrapped path could not be copied
        err_console.print(escape(message), soft_wrap=True)


def error(message: str) -> None:
    """Print one error line."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
