"""How components report progress without knowing who draws it.

Components call ``self.context.progress.task("training", total=steps)`` and advance the task;
the CLI supplies a rich progress bar, tests and libraries the silent default.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol


class ProgressTask(Protocol):
    """A running task: advance it, and optionally show extra fields such as the loss."""

    def advance(self, n: int = 1) -> None:
        """Mark ``n`` more units done."""

    def show(self, **fields: Any) -> None:
        """Show named values beside the bar (for example ``loss=0.12``)."""


class Progress(Protocol):
    """Something that opens progress tasks."""

    def task(self, description: str, total: int | None = None) -> AbstractContextManager[ProgressTask]:
        """Open a task of ``total`` units (None when unknown) for a ``with`` block."""


class _SilentTask:
    def advance(self, n: int = 1) -> None:
        pass

    def show(self, **fields: Any) -> None:
        pass


class SilentProgress:
    """Progress that draws nothing: the default outside the CLI."""

    def task(self, description: str, total: int | None = None) -> AbstractContextManager[ProgressTask]:
        return nullcontext(_SilentTask())
