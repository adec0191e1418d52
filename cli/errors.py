"""One line and exit status 2 for every error a user can cause; tracebacks only with ``--debug``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from medsynth_core import MedsynthError

from .console import error, settings

F = TypeVar("F", bound=Callable[..., Any])
EXIT_USER_ERROR = 2


def reports_errors(command: F) -> F:
    """Wrap a command so that user errors print one line and exit 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except MedsynthError as err:
            if settings.debug:
                raise
            error(str(err))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except OSError as err:  # disk full, permission denied, ...
            if settings.debug:
                raise
            where = f"{err.filename}: " if err.filename else ""
            error(f"{where}{err.strerror or err}")
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            error("interrupted; a run can be continued with --resume")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
