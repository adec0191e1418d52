"""Tests of plugin discovery, registration checks and component creation."""

from __future__ import annotations

import importlib.metadata
import inspect
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pluggy
import pytest

from medsynth_core import (
    ROLES,
    ConfigError,
    Context,
    EmptyConfig,
    Evaluator,
    Filter,
    Generator,
    MaskSource,
    PluginError,
    Refiner,
    Registry,
    UnknownComponentError,
    default_registry,
    hookimpl,
    hookspecs,
    make_plugin_manager,
    option,
)
from medsynth_core.errors import ConfigError as CoreConfigError
from medsynth_core.registry import ENTRY_POINT_GROUP, ROLE_HOOKS
from medsynth_core.roles import ROLE_CLASSES

BASELINE = {
    "mask_source": ["real-masks", "real-pairs"],
    "generator": ["augment"],
    "refiner": ["threshold"],
    "filter": ["mask-area"],
    "evaluator": ["mask-stats"],
}
HOOK_NAMES = sorted(
    name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if getattr(fn, f"{hookspecs.PROJECT_NAME}_spec", None) is not None
)


@dataclass(frozen=True)
class StepsConfig:
    """Options of the tiny generator."""

    steps: int = option(2, "Steps to take.")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise CoreConfigError(f"steps must be >= 1, got {self.steps}")


def tiny(base: type, doc: str | None = "A tiny test component.", config: Any = EmptyConfig,
         **attrs: Any) -> type:
    """A throwaway subclass of a role base class."""
    return type(f"Tiny{base.__name__}", (base,), {"__doc__": doc, "Config": config, **attrs})


def make_plugin(hook: str, entries: list[tuple[Any, Any]] | Callable[[Any], None]) -> types.SimpleNamespace:
    """A plugin object with one hook implementation that registers ``entries``."""

    @hookimpl
    def impl(register):
        if callable(entries):
            entries(register)
            return
        for name, cls in entries:
            register(name, cls)

    return types.SimpleNamespace(**{hook: impl})


@contextmanager
def registered(pm: pluggy.PluginManager, *plugins: tuple[str, Any]) -> Iterator[Registry]:
    for name, plugin in plugins:
        pm.register(plugin, name=name)
    try:
        yield Registry(pm)
    finally:
        for name, _ in plugins:
            pm.unregister(name=name)


@pytest.fixture
def pm() -> pluggy.PluginManager:
    return make_plugin_manager(load_entry_points=False)


# --- discovery of the built-in plugin -----------------------------------------------------------


def test_baseline_is_an_entry_point() -> None:
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("baseline") == "medsynth_plugins.baseline"


def test_default_registry_lists_the_baseline_components() -> None:
    registry = default_registry()
    assert registry is default_registry()
    version = importlib.metadata.version("medsynth")
    for role, names in BASELINE.items():
        infos = {c.name: c for c in registry.components(role) if c.plugin == "baseline"}
        assert sorted(infos) == names
        for info in infos.values():
            assert info.role == role
            assert issubclass(info.cls, ROLE_CLASSES[role])
            assert info.version == version != "unknown"
            assert info.description and "\n" not in info.description


def test_plugin_manager_loads_entry_points() -> None:
    pm = make_plugin_manager()
    module = pm.get_plugin("baseline")
    assert module is not None and module.__name__ == "medsynth_plugins.baseline"
    assert make_plugin_manager(load_entry_points=False).get_plugin("baseline") is None


def test_broken_entry_point_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = importlib.metadata.EntryPoint(name="broken", value="medsynth_no_such_module_xyz",
                                           group=ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [broken])
    with pytest.raises(PluginError, match="plugin 'broken' .*medsynth_no_such_module_xyz.* failed to import"):
        make_plugin_manager()


def test_components_are_sorted_by_role_then_name() -> None:
    found = default_registry().components()
    keys = [(ROLES.index(c.role), c.name) for c in found]
    assert keys == sorted(keys)
    assert {c.role for c in found} == set(ROLES)


# --- registering test plugins -------------------------------------------------------------------


def test_empty_plugin_manager_has_no_components(pm: pluggy.PluginManager) -> None:
    registry = Registry(pm)
    assert registry.components() == []
    with pytest.raises(UnknownComponentError, match="unknown generator 'augment'; available: none installed"):
        registry.get("generator", "augment")


def test_test_plugin_adds_components(pm: pluggy.PluginManager) -> None:
    gen = tiny(Generator, "Make tiny things.\n\nMore text that is not the summary.")
    plugin = make_plugin("register_generators", [("zeta", gen), ("alpha", gen)])
    with registered(pm, ("tiny-plugin", plugin)) as registry:
        infos = registry.components("generator")
        assert [i.name for i in infos] == ["alpha", "zeta"]
        info = registry.get("generator", "zeta")
        assert info.cls is gen and info.role == "generator"
        assert info.plugin == "tiny-plugin" and info.version == "unknown"
        assert info.description == "Make tiny things."
        assert registry.components("refiner") == []
    assert Registry(pm).components() == []  # unregistered in `finally`


def test_description_attribute_beats_the_docstring(pm: pluggy.PluginManager) -> None:
    gen = tiny(Generator, None, description="Set explicitly.")
    with registered(pm, ("p", make_plugin("register_generators", [("g", gen)]))) as registry:
        assert registry.get("generator", "g").description == "Set explicitly."


def test_unknown_name_lists_available(pm: pluggy.PluginManager) -> None:
    gen = tiny(Generator)
    with registered(pm, ("p", make_plugin("register_generators", [("ddpm", gen), ("gan", gen)]))) as registry:
        with pytest.raises(UnknownComponentError) as err:
            registry.get("generator", "diffusion")
        assert str(err.value) == "unknown generator 'diffusion'; available: ddpm, gan"
        assert isinstance(err.value, LookupError) and not isinstance(err.value, KeyError)
        with pytest.raises(UnknownComponentError, match="unknown mask source 'ddpm'"):
            registry.get("mask_source", "ddpm")


def test_unknown_role(pm: pluggy.PluginManager) -> None:
    registry = Registry(pm)
    for call in (lambda: registry.get("painter", "x"), lambda: registry.components("painter"),
                 lambda: registry.create("painter", "x")):
        with pytest.raises(UnknownComponentError, match="unknown role 'painter'; roles: mask_source, gen"):
            call()


def test_find_searches_every_role(pm: pluggy.PluginManager) -> None:
    plugins = [
        ("a", make_plugin("register_generators", [("same", tiny(Generator))])),
        ("b", make_plugin("register_refiners", [("same", tiny(Refiner)), ("other", tiny(Refiner))])),
    ]
    with registered(pm, *plugins) as registry:
        assert sorted(i.role for i in registry.find("same")) == ["generator", "refiner"]
        assert [i.role for i in registry.find("other")] == ["refiner"]
        with pytest.raises(UnknownComponentError, match="unknown component 'nope'; available: other, same"):
            registry.find("nope")


@pytest.mark.parametrize("name", ["Bad", "two words", "snake_case", "-lead", "trail-", "double--dash",
                                  "1st", "", "ünï", 3, None])
def test_bad_name_format(pm: pluggy.PluginManager, name: Any) -> None:
    with registered(pm, ("namer", make_plugin("register_refiners", [(name, tiny(Refiner))]))) as registry:
        with pytest.raises(PluginError, match="plugin 'namer' registered refiner name") as err:
            registry.components()
        assert "lowercase words joined by '-'" in str(err.value)


@pytest.mark.parametrize("name", ["a", "otsu", "mask-area", "x2", "stable-diffusion-v1"])
def test_good_name_format(pm: pluggy.PluginManager, name: str) -> None:
    with registered(pm, ("namer", make_plugin("register_refiners", [(name, tiny(Refiner))]))) as registry:
        assert registry.get("refiner", name).name == name


@pytest.mark.parametrize("cls", [tiny(Refiner), tiny(MaskSource), object, int, "Generator",
                                 lambda config=None: None])
def test_class_must_subclass_the_role_base(pm: pluggy.PluginManager, cls: Any) -> None:
    with registered(pm, ("wrong", make_plugin("register_generators", [("g", cls)]))) as registry:
        with pytest.raises(PluginError, match="does not subclass medsynth_core.Generator") as err:
            registry.get("generator", "g")
        assert "plugin 'wrong'" in str(err.value)


def test_config_must_be_a_dataclass(pm: pluggy.PluginManager) -> None:
    class PlainConfig:
        steps = 3

    plugin = make_plugin("register_filters", [("f", tiny(Filter, config=PlainConfig))])
    expected = r"plugin 'p': 'f'.Config must be a dataclass"
    with registered(pm, ("p", plugin)) as reg, pytest.raises(PluginError, match=expected):
        reg.components()


@pytest.mark.parametrize("doc", [None, "", "   \n  "])
def test_component_needs_a_description(pm: pluggy.PluginManager, doc: str | None) -> None:
    plugin = make_plugin("register_evaluators", [("e", tiny(Evaluator, doc))])
    expected = "plugin 'p': 'e' has no description"
    with registered(pm, ("p", plugin)) as reg, pytest.raises(PluginError, match=expected):
        reg.components()


def test_same_name_from_two_plugins(pm: pluggy.PluginManager) -> None:
    plugins = [
        ("first", make_plugin("register_generators", [("ddpm", tiny(Generator))])),
        ("second", make_plugin("register_generators", [("ddpm", tiny(Generator))])),
    ]
    with registered(pm, *plugins) as registry:
        with pytest.raises(PluginError) as err:
            registry.get("generator", "ddpm")
        message = str(err.value)
        assert "generator 'ddpm' is registered by both" in message
        assert "'first'" in message and "'second'" in message
        assert "uninstall one" in message


def test_same_name_in_different_roles_is_allowed(pm: pluggy.PluginManager) -> None:
    plugins = [
        ("first", make_plugin("register_generators", [("clip", tiny(Generator))])),
        ("second", make_plugin("register_evaluators", [("clip", tiny(Evaluator))])),
    ]
    with registered(pm, *plugins) as registry:
        assert registry.get("generator", "clip").plugin == "first"
        assert registry.get("evaluator", "clip").plugin == "second"


def test_hook_that_raises_is_named(pm: pluggy.PluginManager) -> None:
    def explode(register: Any) -> None:
        raise RuntimeError("weights folder missing")

    with registered(pm, ("faulty", make_plugin("register_refiners", explode))) as registry:
        with pytest.raises(PluginError) as err:
            registry.components()
        assert str(err.value) == "plugin 'faulty' failed in register_refiners: weights folder missing"
        assert err.value.__suppress_context__


def test_registry_sees_plugins_registered_after_it_was_made(pm: pluggy.PluginManager) -> None:
    registry = Registry(pm)
    assert registry.components() == []
    with registered(pm, ("late", make_plugin("register_generators", [("late", tiny(Generator))]))):
        assert [c.name for c in registry.components()] == ["late"]


# --- create -------------------------------------------------------------------------------------


@pytest.fixture
def steps_registry(pm: pluggy.PluginManager) -> Iterator[Registry]:
    gen = tiny(Generator, config=StepsConfig)
    with registered(pm, ("steps-plugin", make_plugin("register_generators", [("tiny", gen)]))) as registry:
        yield registry


def test_create_builds_with_checked_options(steps_registry: Registry) -> None:
    comp = steps_registry.create("generator", "tiny", {"steps": "5"})
    assert isinstance(comp, Generator)
    assert comp.config == StepsConfig(steps=5)
    assert comp.name == "tiny" and comp.plugin == "steps-plugin" and comp.version == "unknown"
    assert comp.context.device == "cpu"
    assert steps_registry.create("generator", "tiny").config == StepsConfig()


def test_create_passes_the_context(steps_registry: Registry) -> None:
    ctx = Context(device="cuda:3")
    assert steps_registry.create("generator", "tiny", context=ctx).context is ctx


def test_create_rejects_unknown_options(steps_registry: Registry) -> None:
    with pytest.raises(ConfigError) as err:
        steps_registry.create("generator", "tiny", {"stepz": 3})
    assert str(err.value) == "generator 'tiny': unknown option 'stepz'; valid options: steps"
    with pytest.raises(ConfigError, match=r"^\[generator\] tiny: unknown option"):
        steps_registry.create("generator", "tiny", {"stepz": 3}, where="[generator] tiny")


def test_create_rejects_bad_values(steps_registry: Registry) -> None:
    with pytest.raises(ConfigError, match="option 'steps': expected int, got 'many'"):
        steps_registry.create("generator", "tiny", {"steps": "many"})
    with pytest.raises(ConfigError, match="^generator 'tiny': steps must be >= 1, got 0$"):
        steps_registry.create("generator", "tiny", {"steps": 0})


def test_create_unknown_component(steps_registry: Registry) -> None:
    with pytest.raises(UnknownComponentError, match="available: tiny"):
        steps_registry.create("generator", "huge")


def test_create_baseline_component() -> None:
    comp = default_registry().create("refiner", "threshold", {"method": "fixed", "threshold": "0.3"})
    assert isinstance(comp, Refiner)
    assert comp.config.method == "fixed" and comp.config.threshold == 0.3
    assert comp.plugin == "baseline"
    with pytest.raises(ConfigError, match="'median' is not allowed"):
        default_registry().create("refiner", "threshold", {"method": "median"})


# --- one test per hook spec ---------------------------------------------------------------------


def _check_hook(hook: str, role: str) -> None:
    assert ROLE_HOOKS[role] == hook
    pm = make_plugin_manager(load_entry_points=False)
    cls = tiny(ROLE_CLASSES[role], f"A tiny {role} for {hook}.")
    with registered(pm, (f"test-{role}", make_plugin(hook, [("tiny-one", cls)]))) as registry:
        info = registry.get(role, "tiny-one")
        assert info.cls is cls and info.role == role and info.plugin == f"test-{role}"
        assert [c.name for c in registry.components()] == ["tiny-one"]
        component = registry.create(role, "tiny-one")
        assert component.role == role and isinstance(component, ROLE_CLASSES[role])


def test_hook_register_generators() -> None:
    _check_hook("register_generators", "generator")


def test_hook_register_mask_sources() -> None:
    _check_hook("register_mask_sources", "mask_source")


def test_hook_register_refiners() -> None:
    _check_hook("register_refiners", "refiner")


def test_hook_register_filters() -> None:
    _check_hook("register_filters", "filter")


def test_hook_register_evaluators() -> None:
    _check_hook("register_evaluators", "evaluator")


def test_every_hookspec_has_a_test_and_a_docstring() -> None:
    assert sorted(ROLE_HOOKS.values()) == HOOK_NAMES
    assert sorted(ROLE_HOOKS) == sorted(ROLES)
    for name in HOOK_NAMES:
        assert callable(globals().get(f"test_hook_{name}")), f"write test_hook_{name}"
        spec = getattr(hookspecs, name)
        assert list(inspect.signature(spec).parameters) == ["register"]
        assert (spec.__doc__ or "").strip(), f"{name} needs a docstring"
