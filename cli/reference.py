"""Render docs/reference.md from the docstrings of the hook specs, roles, types and built-in components.

The reference is generated, never edited by hand: ``medsynth reference --out docs/reference.md``
rewrites it, and a test fails when the committed file is out of date.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import typer

from medsynth_core import (
    Condition,
    Context,
    Evaluator,
    Filter,
    Generator,
    MaskSource,
    Metric,
    Refiner,
    Sample,
    Verdict,
    default_registry,
    describe_config,
    hookspecs,
)
from medsynth_core.registry import ROLE_HOOKS, ROLE_TITLES, ROLES

from .app import app
from .console import log
from .errors import reports_errors

BUILTIN_PREFIX = "medsynth_plugins."


def render_reference(builtin_only: bool = True) -> str:
    """The whole reference page as Markdown."""
    out = ["# medsynth reference", "",
           "Generated from the docstrings by `medsynth reference --out docs/reference.md`; do not edit by hand.", ""]
    out += ["## Hook specifications", "", inspect.getdoc(hookspecs) or "", ""]
    for role in ROLES:
        hook = getattr(hookspecs, ROLE_HOOKS[role])
        out += [f"### {hook.__name__}(register)", "", inspect.getdoc(hook) or "", ""]
    out += ["## Roles", ""]
    for cls in (MaskSource, Generator, Refiner, Filter, Evaluator):
        out += [f"### {cls.__name__}", "", inspect.getdoc(cls) or "", ""]
        for name, member in vars(cls).items():
            if callable(member) and not name.startswith("_"):
                signature = str(inspect.signature(member)).replace("'", "")
                out += [f"- `{name}{signature}`: {_one_paragraph(inspect.getdoc(member))}"]
        out.append("")
    out += ["## Data types", ""]
    for cls in (Condition, Sample, Verdict, Metric, Context):
        out += [f"### {cls.__name__}", "", inspect.getdoc(cls) or "", ""]
    out += ["## Built-in components", ""]
    for info in default_registry().components():
        if builtin_only and not info.cls.__module__.startswith(BUILTIN_PREFIX):
            continue
        out += [f"### `{info.name}` ({ROLE_TITLES[info.role]})", "", inspect.getdoc(info.cls) or "", ""]
        options = describe_config(info.cls.Config)
        if options:
            out += ["| option | type | default | help |", "|---|---|---|---|"]
            for o in options:
                out.append(f"| `{o.name}` | {o.type.replace('|', '&#124;')} | `{json.dumps(o.default)}` | {o.help} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _one_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").split("\n\n")[0].split())


@app.command("reference")
@reports_errors
def reference(
    out: Path | None = typer.Option(None, "--out", "-o", help="Write here instead of standard output."),
    all_plugins: bool = typer.Option(False, "--all", help="Include components of third-party plugins."),
) -> None:
    """Print the API reference (hook specs, roles, components) rendered from docstrings."""
    text = render_reference(builtin_only=not all_plugins)
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text)
    log(f"wrote {out}")
