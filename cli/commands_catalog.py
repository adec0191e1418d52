"""``medsynth list`` and ``medsynth info``: what is installed and how to configure it."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from medsynth_core import ROLES, default_registry, describe_config
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
    name: str = typer.Argument(..., help="Component name, as shown by `medsynth list`."),
    role: str | None = typer.Option(None, "--role", "-r", help="Role, when several roles share the name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show a component's description and options with their types, defaults and help."""
    registry = default_registry()
    infos = [registry.get(role.replace("-", "_"), name)] if role else registry.find(name)
    payload = []
    for c in infos:
        options = describe_config(c.cls.Config)
        payload.append({
            "role": c.role, "name": c.name, "plugin": c.plugin, "version": c.version,
            "description": c.description, "doc": (c.cls.__doc__ or "").strip(),
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
