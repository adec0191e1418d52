"""The Typer application and its global flags; the commands live in their own modules."""

from __future__ import annotations

import warnings

import typer

from .console import settings

app = typer.Typer(
    name="medsynth",
    help="Synthetic image + mask pairs for medical image segmentation, and the means to check they help.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    settings.quiet = quiet
    settings.debug = debug
    if not debug:  # a deprecation inside clean-fid's imports, not the user's to act on
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)


from . import (  # noqa: E402,F401
    commands_bench,
    commands_catalog,
    commands_data,
    commands_evaluate,
    commands_export,
    commands_run,
    reference,
)


def main() -> None:
    """Console-script entry point."""
    app()
