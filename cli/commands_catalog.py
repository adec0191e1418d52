"""``medsynth list`` and ``medsynth info``: what is installed and how to configure it."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from medsynth_core import ROLES, default_registry, describe_config, read_checkpoint_card
from medsynth_core.registry import ROLE_TITLES

from .app import app
from .console import out_console
from .errors import reports_errors


@app.command("list")
@reports_errors
def list_components(
    role: str | None = typer.Option(None, "--role", "-r", help=f"Only this role: {', '.join(ROLES)}."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List every discovered component: role, name, plugin, version and description."""
    infos = default_registry().components(role.replace("-", "_") if role else None)
    if as_json:
        rows = [{"role": c.role, "name": c.name, "plugin": c.plugin, "version": c.version,
                 "description": c.description} for c in infos]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="medsynth components")
    for column in ("role", "name", "plugin", "version", "description"):
        table.add_column(column, overflow="fold")
    for c in infos:
        table.add_row(ROLE_TITLES[c.role], c.name, c.plugin, c.version, escape(c.description))
    out_console.print(table)


@app.command("info")
@reports_errors
def info(
    name: str = typer.Argument(..., help="Component name (see `medsynth list`), or a checkpoint folder."),
    role: str | None = typer.Option(None, "--role", "-r", help="Role, when several roles share the name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show a component's options with types, defaults and help; or the card of a checkpoint folder."""
    registry = default_registry()
    known = any(c.name == name for c in registry.components())
    if not known and Path(name).is_dir():
        card = read_checkpoint_card(name)
        if as_json:
            typer.echo(json.dumps(card, indent=2))
        else:
            what = f"{card.get('component')!r}, step {card.get('step')}"
            out_console.print(f"[bold]checkpoint[/] {escape(name)} of {what}")
            out_console.print_json(data=card)
        return
    infos = [registry.get(role.replace("-", "_"), name)] if role else registry.find(name)
    payload = []
    for c in infos:
        options = describe_config(c.cls.Config)
        payload.append({
            "role": c.role, "name": c.name, "plugin": c.plugin, "version": c.version,
            "description": c.description, "doc": inspect.cleandoc(c.cls.__doc__ or ""),
            "options": [{"name": o.name, "type": o.type, "default": o.default, "help": o.help} for o in options],
        })
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        return
    for item in payload:
        out_console.print(f"[bold]{item['name']}[/] ({ROLE_TITLES[item['role']]}, plugin {item['plugin']} "
                          f"{item['version']})")
        out_console.print(escape(item["doc"] or item["description"]))
        table = Table(show_header=True)
        for column in ("option", "type", "default", "help"):
            table.add_column(column, overflow="fold")
        for o in item["options"]:
            table.add_row(o["name"], escape(o["type"]), escape(json.dumps(o["default"])), escape(o["help"]))
        if item["options"]:
            out_console.print(table)
        else:
            out_console.print("no options")
