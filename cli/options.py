"""Component options from the command line: ``--set section.key=value`` and ``--key value`` extras."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

from medsynth_core import ConfigError

ROLE_SECTIONS = ("run", "mask_source", "generator")
LIST_SECTIONS = ("refiners", "filters", "evaluators")


def apply_sets(data: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to raw pipeline data.

    ``KEY`` is ``section.option`` for run, mask_source and generator, ``<component>.option`` for a
    refiner, filter or evaluator named in the pipeline, or ``refiners.0.option`` by position.
    Values stay strings; the component's Config parses them.
    """
    data = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in sets:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected SECTION.OPTION=VALUE, e.g. generator.rotation=15")
        table = _target_table(data, parts[:-1], item)
        table[parts[-1]] = value
    return data


def _target_table(data: dict[str, Any], path: list[str], item: str) -> dict[str, Any]:
    head = path[0]
    if len(path) == 1 and head in ROLE_SECTIONS:
        table = dict(data.get(head) or {})
        data[head] = table
        return table
    if len(path) == 2 and head in LIST_SECTIONS:
        stages = data.get(head) or []
        if not path[1].isdigit() or int(path[1]) >= len(stages):
            raise ConfigError(f"--set {item!r}: the pipeline has {len(stages)} {head}; index out of range")
        stages = [dict(s) if isinstance(s, dict) else {"name": s} for s in stages]
        data[head] = stages
        return stages[int(path[1])]
    if len(path) == 1:
        hits = [(sec, k) for sec in LIST_SECTIONS for k, s in enumerate(data.get(sec) or [])
                if (s.get("name") if isinstance(s, dict) else s) == head]
        if len(hits) == 1:
            sec, k = hits[0]
            stages = [dict(s) if isinstance(s, dict) else {"name": s} for s in data[sec]]
            data[sec] = stages
            return stages[k]
        if len(hits) > 1:
            raise ConfigError(f"--set {item!r}: {head!r} appears {len(hits)} times; use {hits[0][0]}.N.option")
    sections = ", ".join([*ROLE_SECTIONS, *LIST_SECTIONS])
    raise ConfigError(f"--set {item!r}: no section or stage {'.'.join(path)!r}; use one of {sections}, "
                      "or the name of a refiner, filter or evaluator in the pipeline")


def parse_extra_options(args: Sequence[str], config_cls: type, owner: str) -> dict[str, str | bool]:
    """Turn ``--rotation 15 --elastic=0 --no-flag`` style extras into raw option values.

    Dashes in names become underscores. A bool option given alone (``--augment``) means true.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; options of {owner} look like --name value")
        name, eq, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if key not in fields:
            valid = ", ".join("--" + f.replace("_", "-") for f in fields) or "none"
            raise ConfigError(f"unknown option --{name} for {owner}; valid options: {valid}")
        if eq:
            values[key] = value
        elif hints[key] is bool and (i + 1 == len(args) or args[i + 1].startswith("--")):
            values[key] = True
        elif i + 1 < len(args):
            i += 1
            values[key] = args[i]
        else:
            raise ConfigError(f"option --{name} of {owner} needs a value")
        i += 1
    return values
