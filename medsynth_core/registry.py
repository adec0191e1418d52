"""Plugin discovery and component lookup.

Plugins are modules named in the ``medsynth`` entry-point group; built-in plugins are found the
same way as third-party ones. Each ``register_<role>s`` hook implementation is called with a
``register`` callback that records which plugin (and distribution version) offered what.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import pluggy

from . import hookspecs
from .config import build_config
from .errors import PluginError, UnknownComponentError
from .roles import ROLE_CLASSES, Component, Context

ENTRY_POINT_GROUP = "medsynth"
ROLES = ("mask_source", "generator", "refiner", "filter", "evaluator")
ROLE_HOOKS = {
    "generator": "register_generators",
    "mask_source": "register_mask_sources",
    "refiner": "register_refiners",
    "filter": "register_filters",
    "evaluator": "register_evaluators",
}
ROLE_TITLES = {
    "generator": "generator",
    "mask_source": "mask source",
    "refiner": "refiner",
    "filter": "filter",
    "evaluator": "evaluator",
}
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class ComponentInfo:
    """A registered component: its role, name, class and the plugin that provides it."""

    role: str
    name: str
    cls: type[Component]
    plugin: str
    version: str

    @property
    def description(self) -> str:
        """The component's one-line description."""
        return self.cls.summary()


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with medsynth's hook specs and, by default, every installed plugin."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                module = ep.load()
            except Exception as err:  # a broken plugin must be named, whatever it raised
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: {err}") from None
            pm.register(module, name=ep.name)
            dist = getattr(ep, "dist", None)
            if dist is not None:
                _DISTS[ep.name] = (dist.metadata["Name"], dist.version)
    return pm


_DISTS: dict[str, tuple[str, str]] = {}


class Registry:
    """The components that a plugin manager's plugins register, by role and name."""

    def __init__(self, plugin_manager: pluggy.PluginManager) -> None:
        self.plugin_manager = plugin_manager

    def components(self, role: str | None = None) -> list[ComponentInfo]:
        """Every registered component, or those of one role, sorted by role then name."""
        found = self._collect()
        if role is not None:
            check_role(role)
            found = [c for c in found if c.role == role]
        return found

    def get(self, role: str, name: str) -> ComponentInfo:
        """The component ``name`` of ``role``, or UnknownComponentError listing the valid names."""
        check_role(role)
        matches = [c for c in self._collect() if c.role == role and c.name == name]
        if not matches:
            names = sorted(c.name for c in self._collect() if c.role == role)
            raise UnknownComponentError(
                f"unknown {ROLE_TITLES[role]} {name!r}; available: {', '.join(names) or 'none installed'}")
        return matches[0]

    def find(self, name: str) -> list[ComponentInfo]:
        """Components of any role called ``name``."""
        found = [c for c in self._collect() if c.name == name]
        if not found:
            names = sorted({c.name for c in self._collect()})
            raise UnknownComponentError(f"unknown component {name!r}; available: {', '.join(names)}")
        return found

    def create(self, role: str, name: str, options: Mapping[str, Any] | None = None, *,
               context: Context | None = None, where: str | None = None) -> Component:
        """Build component ``name`` of ``role`` with ``options`` checked against its Config."""
        info = self.get(role, name)
        config = build_config(info.cls.Config, dict(options or {}), where or f"{ROLE_TITLES[role]} {name!r}")
        component = info.cls(config, context=context, name=name)
        component.plugin, component.version = info.plugin, info.version
        return component

    def _collect(self) -> list[ComponentInfo]:
        found: list[ComponentInfo] = []
        seen: dict[tuple[str, str], ComponentInfo] = {}
        for role in ROLES:
            caller = getattr(self.plugin_manager.hook, ROLE_HOOKS[role])
            for impl in caller.get_hookimpls():
                plugin = impl.plugin_name
                version = _DISTS.get(plugin, ("", "unknown"))[1]

                def register(name: str, cls: type, _role: str = role, _plugin: str = plugin,
                             _version: str = version) -> None:
                    info = _validated(_role, name, cls, _plugin, _version)
                    key = (_role, name)
                    if key in seen:
                        raise PluginError(
                            f"{ROLE_TITLES[_role]} {name!r} is registered by both plugin {seen[key].plugin!r} "
                            f"and plugin {_plugin!r}; uninstall one of them")
                    seen[key] = info
                    found.append(info)

                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as err:
                    raise PluginError(f"plugin {plugin!r} failed in {ROLE_HOOKS[role]}: {err}") from None
        return sorted(found, key=lambda c: (ROLES.index(c.role), c.name))


def _validated(role: str, name: str, cls: Any, plugin: str, version: str) -> ComponentInfo:
    base = ROLE_CLASSES[role]
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(f"plugin {plugin!r} registered {ROLE_TITLES[role]} name {name!r}; "
                          "names are lowercase words joined by '-'")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"plugin {plugin!r} registered {name!r} as a {ROLE_TITLES[role]}, "
                          f"but {cls!r} does not subclass medsynth_core.{base.__name__}")
    if not dataclasses.is_dataclass(cls.Config):
        raise PluginError(f"plugin {plugin!r}: {name!r}.Config must be a dataclass")
    if not cls.summary():
        raise PluginError(f"plugin {plugin!r}: {name!r} has no description (give the class a docstring)")
    return ComponentInfo(role, name, cls, plugin, version)


def check_role(role: str) -> None:
    """Raise UnknownComponentError unless ``role`` is one of ROLES."""
    if role not in ROLES:
        raise UnknownComponentError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")


@cache
def default_registry() -> Registry:
    """The registry of every installed plugin, built once per process."""
    return Registry(make_plugin_manager())
