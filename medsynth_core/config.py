"""Typed component configuration built from stdlib dataclasses.

Each component declares ``Config``, a frozen dataclass whose fields carry defaults and a
``help`` text (use :func:`option`). Values arrive from TOML (already typed) or from the
command line (strings); :func:`build_config` checks names and types for both and rejects
anything unknown with the list of valid keys, before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from .errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def option(default: Any, help: str, **metadata: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with a default and a help text shown by ``medsynth info``."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class EmptyConfig:
    """Configuration of a component that has no options."""


@dataclass(frozen=True)
class OptionInfo:
    """One option of a component, as shown by ``medsynth info``."""

    name: str
    type: str
    default: Any
    help: str


def describe_config(config_cls: type) -> list[OptionInfo]:
    """List the options of a Config dataclass with their types, defaults and help."""
    hints = typing.get_type_hints(config_cls)
    infos = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        infos.append(OptionInfo(f.name, type_name(hints[f.name]), to_jsonable(default), f.metadata.get("help", "")))
    return infos


def build_config(config_cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Build ``config_cls`` from a mapping, checking every key and value.

    ``where`` names the place the values came from (``"[generator] augment"``) so that an
    error line can point at it. Strings are parsed for non-string fields, which lets the same
    function serve TOML files and ``--set key=value`` flags.
    """
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"{where}: unknown option {unknown[0]!r}; valid options: {valid}")
    kwargs = {key: coerce(value, hints[key], f"{where} option {key!r}") for key, value in values.items()}
    try:
        return config_cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a Config instance (tuples become lists, paths strings)."""
    return {f.name: to_jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def to_jsonable(value: Any) -> Any:
    """Turn tuples, paths and nested containers into plain JSON types."""
    if isinstance(value, (tuple, list)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def type_name(tp: Any) -> str:
    """A short readable name of a type hint: ``int``, ``float | None``, ``'otsu' | 'fixed'``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (tuple, list):
        if (len(args) == 2 and args[1] is Ellipsis) or (origin is list and len(args) == 1):
            return f"{type_name(args[0])}, ..."
        return ", ".join(type_name(a) for a in args)
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type hint ``tp``, parsing strings; raise ConfigError if it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() == "none")
        if is_none and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        raise _wrong(value, tp, where)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
    if origin in (tuple, list):
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise _wrong(value, tp, where)
        if (len(args) == 2 and args[1] is Ellipsis) or (origin is list and len(args) == 1):
            item_types = [args[0]] * len(items)  # list[X], like tuple[X, ...], holds any number of X
        elif args:
            if len(items) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values ({type_name(tp)}), got {len(items)}")
            item_types = list(args)
        else:
            item_types = [Any] * len(items)
        converted = [coerce(v, t, where) for v, t in zip(items, item_types)]
        return tuple(converted) if origin is tuple else converted
    return _coerce_scalar(value, tp, where)


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _wrong(value, tp, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _wrong(value, tp, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _wrong(value, tp, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong(value, tp, where)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _wrong(value, tp, where)
    if tp is type(None):
        if value is None:
            return None
        raise _wrong(value, tp, where)
    raise ConfigError(f"{where}: unsupported option type {type_name(tp)}")


def _wrong(value: Any, tp: Any, where: str) -> ConfigError:
    return ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")
