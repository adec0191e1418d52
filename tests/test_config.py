"""Tests of typed component configuration: building, checking and describing Config dataclasses."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from medsynth_core import ConfigError, EmptyConfig, build_config, config_to_dict, describe_config, option
from medsynth_core.config import coerce, type_name

WHERE = "[generator] tiny"


@dataclass(frozen=True)
class TinyConfig:
    """Options of a test component, one field per supported type."""

    steps: int = option(3, "Denoising steps.")
    rate: float = option(0.1, "Learning rate.")
    flag: bool = option(False, "A switch.")
    name: str = option("x", "A name.")
    mode: Literal["otsu", "fixed"] = option("otsu", "Threshold method.")
    size: tuple[int, int] = option((8, 8), "Height and width.")
    tags: tuple[str, ...] = option((), "Free tags.")
    limit: int | None = option(None, "Optional limit.")
    out: Path = option(Path("out"), "Output folder.")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class RequiredConfig:
    """A config with a field that has no default."""

    count: int


@dataclass(frozen=True)
class FactoryConfig:
    """A config whose default comes from a factory, plus a field the caller cannot set."""

    items: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "Some items."})
    derived: int = field(default=0, init=False)


def test_defaults_build_without_values() -> None:
    assert build_config(TinyConfig, {}, WHERE) == TinyConfig()


def test_typed_toml_values_are_accepted() -> None:
    values = {"steps": 5, "rate": 2, "flag": True, "name": "abc", "mode": "fixed", "size": [4, 6],
              "tags": ["a", "b"], "limit": 9, "out": "runs/one"}
    cfg = build_config(TinyConfig, values, WHERE)
    assert cfg == TinyConfig(steps=5, rate=2.0, flag=True, name="abc", mode="fixed", size=(4, 6),
                             tags=("a", "b"), limit=9, out=Path("runs/one"))
    # An int is widened to float, and TOML arrays become tuples.
    assert isinstance(cfg.rate, float)
    assert isinstance(cfg.size, tuple) and isinstance(cfg.tags, tuple)
    assert isinstance(cfg.out, Path)


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("steps", "3", 3),
        ("steps", "-2", None),  # parsed, then refused by __post_init__ (checked below)
        ("rate", "0.5", 0.5),
        ("rate", "1e-3", 1e-3),
        ("rate", "2", 2.0),
        ("flag", "true", True),
        ("flag", "YES", True),
        ("flag", "on", True),
        ("flag", "1", True),
        ("flag", "false", False),
        ("flag", "off", False),
        ("flag", "0", False),
        ("name", "3", "3"),
        ("mode", "fixed", "fixed"),
        ("size", "3,4", (3, 4)),
        ("size", " 3 , 4 ", (3, 4)),
        ("tags", "a,b", ("a", "b")),
        ("tags", "solo", ("solo",)),
        ("tags", "", ()),
        ("limit", "none", None),
        ("limit", "None", None),
        ("limit", "7", 7),
        ("out", "runs/a", Path("runs/a")),
    ],
)
def test_strings_from_the_command_line_are_parsed(key: str, text: str, expected: Any) -> None:
    if expected is None and key == "steps":
        with pytest.raises(ConfigError, match="steps must be >= 1, got -2"):
            build_config(TinyConfig, {key: text}, WHERE)
        return
    cfg = build_config(TinyConfig, {key: text}, WHERE)
    value = getattr(cfg, key)
    assert value == expected
    assert type(value) is type(expected)


def test_unknown_key_lists_valid_options() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(TinyConfig, {"stepz": 3}, WHERE)
    message = str(info.value)
    assert message.startswith(f"{WHERE}: unknown option 'stepz'")
    valid = message.split("valid options:")[1]
    for f in dataclasses.fields(TinyConfig):
        assert f.name in valid
    assert "\n" not in message


def test_unknown_key_is_reported_even_with_valid_keys_beside_it() -> None:
    with pytest.raises(ConfigError, match="unknown option 'zzz'"):
        build_config(TinyConfig, {"steps": 2, "zzz": 1}, WHERE)


def test_empty_config_accepts_nothing() -> None:
    assert build_config(EmptyConfig, {}, WHERE) == EmptyConfig()
    with pytest.raises(ConfigError, match="valid options: none"):
        build_config(EmptyConfig, {"steps": 1}, WHERE)


def test_fields_outside_init_cannot_be_set() -> None:
    with pytest.raises(ConfigError, match="unknown option 'derived'; valid options: items"):
        build_config(FactoryConfig, {"derived": 3}, WHERE)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("steps", "three"),
        ("steps", "2.5"),
        ("steps", 2.5),
        ("steps", True),  # a bool is not an int here, though Python says it is
        ("rate", "fast"),
        ("rate", False),
        ("rate", [1.0]),
        ("flag", "maybe"),
        ("flag", 1),
        ("name", 3),
        ("size", "a,b"),
        ("size", 5),
        ("tags", 5),
        ("limit", "lots"),
        ("limit", 1.5),
        ("out", 3),
    ],
)
def test_wrong_types_are_refused_naming_the_option(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(TinyConfig, {key: value}, WHERE)
    message = str(info.value)
    assert message.startswith(f"{WHERE} option {key!r}: ")
    assert repr(value) in message or "expected" in message
    assert "\n" not in message


def test_wrong_type_message_says_what_was_expected() -> None:
    with pytest.raises(ConfigError, match=r"expected int, got 'three'"):
        build_config(TinyConfig, {"steps": "three"}, WHERE)
    with pytest.raises(ConfigError, match=r"expected int \| None, got 'lots'"):
        build_config(TinyConfig, {"limit": "lots"}, WHERE)


def test_tuple_of_fixed_length_checks_the_count() -> None:
    with pytest.raises(ConfigError, match=r"expected 2 values \(int, int\), got 3"):
        build_config(TinyConfig, {"size": "1,2,3"}, WHERE)
    with pytest.raises(ConfigError, match="expected 2 values"):
        build_config(TinyConfig, {"size": [1]}, WHERE)


def test_literal_outside_choices_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(TinyConfig, {"mode": "median"}, WHERE)
    message = str(info.value)
    assert "'median' is not allowed" in message
    assert "'otsu'" in message and "'fixed'" in message


def test_post_init_error_gets_the_where_prefix() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(TinyConfig, {"steps": 0}, WHERE)
    assert str(info.value) == f"{WHERE}: steps must be >= 1, got 0"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_required_field_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(RequiredConfig, {}, WHERE)
    assert str(info.value).startswith(f"{WHERE}: ") and "count" in str(info.value)
    assert build_config(RequiredConfig, {"count": "4"}, WHERE) == RequiredConfig(count=4)


def test_describe_config_gives_types_defaults_and_help() -> None:
    infos = {i.name: i for i in describe_config(TinyConfig)}
    assert list(infos) == [f.name for f in dataclasses.fields(TinyConfig)]
    assert {name: i.type for name, i in infos.items()} == {
        "steps": "int",
        "rate": "float",
        "flag": "bool",
        "name": "str",
        "mode": "'otsu' | 'fixed'",
        "size": "int, int",
        "tags": "str, ...",
        "limit": "int | None",
        "out": "Path",
    }
    assert infos["steps"].default == 3 and infos["steps"].help == "Denoising steps."
    assert infos["size"].default == [8, 8]  # JSON-ready, as shown by `medsynth info`
    assert infos["out"].default == "out"
    assert infos["limit"].default is None
    assert all(i.help for i in infos.values())
    json.dumps([dataclasses.asdict(i) for i in infos.values()])


def test_describe_config_runs_default_factories_and_tolerates_missing_help() -> None:
    infos = {i.name: i for i in describe_config(FactoryConfig)}
    assert infos["items"].default == [1, 2]
    assert infos["items"].type == "int, ..."
    assert infos["derived"].help == ""
    req = describe_config(RequiredConfig)
    assert [(i.name, i.default) for i in req] == [("count", None)]
    assert describe_config(EmptyConfig) == []


def test_config_to_dict_is_json_ready_and_builds_back() -> None:
    cfg = TinyConfig(steps=4, size=(2, 3), tags=("a",), limit=5, out=Path("x/y"))
    data = config_to_dict(cfg)
    assert json.loads(json.dumps(data)) == data
    assert data["size"] == [2, 3] and data["out"] == "x/y" and data["limit"] == 5
    # What a checkpoint card stores can rebuild the same config.
    assert build_config(TinyConfig, data, WHERE) == cfg


def test_coerce_lists_and_nested_unions() -> None:
    assert coerce("1, 2", list[int], "w") == [1, 2]
    assert coerce((1, 2, 3), list[int], "w") == [1, 2, 3]
    assert build_config(FactoryConfig, {"items": [4, 5, 6]}, WHERE).items == [4, 5, 6]
    assert coerce("fixed", Literal["otsu", "fixed"] | None, "w") == "fixed"
    assert coerce("none", Literal["otsu", "fixed"] | None, "w") is None
    with pytest.raises(ConfigError):
        coerce("median", Literal["otsu", "fixed"] | None, "w")
    with pytest.raises(ConfigError, match="expected int"):
        coerce(None, int, "w")
    with pytest.raises(ConfigError, match="unsupported option type"):
        coerce(1, dict, "w")


def test_type_name_is_short() -> None:
    assert type_name(int) == "int"
    assert type_name(float | None) == "float | None"
    assert type_name(tuple[float, ...]) == "float, ..."
    assert type_name(Literal["a", "b"]) == "'a' | 'b'"
