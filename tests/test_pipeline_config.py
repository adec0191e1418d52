"""Pipeline files: parsing, checking and building, each mistake as one error line."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import medsynth_plugins.baseline as baseline
from medsynth_core import (
    Condition,
    ConfigError,
    Filter,
    Generator,
    PipelineSpec,
    Registry,
    Sample,
    StageSpec,
    UnknownComponentError,
    Verdict,
    build_pipeline,
    default_registry,
    hookimpl,
    load_pipeline,
    make_plugin_manager,
    option,
    parse_pipeline,
    read_pipeline_file,
)
from medsynth_plugins.baseline.augment import AugmentGenerator
from medsynth_plugins.baseline.mask_area import MaskAreaFilter
from medsynth_plugins.baseline.real_masks import RealPairsSource

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass(frozen=True)
class SoftConfig:
    """Options of the soft-only test generator."""

    level: float = option(0.7, "Value of the soft mask.")


class SoftOnlyGenerator(Generator):
    """Makes a flat image and a soft mask, never a binary mask."""

    Config = SoftConfig
    makes = frozenset({"soft_mask"})

    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        raise AssertionError("not run in these tests")


class TrainableGenerator(Generator):
    """Needs weights from `medsynth train` before it can generate."""

    makes = frozenset({"mask"})
    trainable = True


class MasklessGenerator(Generator):
    """Makes images only."""


class DataFilter(Filter):
    """Learns from the real set before judging."""

    needs_data = True

    def judge(self, samples: Sequence[Sample]) -> list[Verdict]:
        return [Verdict(True, 1.0) for _ in samples]


class _TestPlugin:
    @hookimpl
    def register_generators(self, register):
        register("soft-only", SoftOnlyGenerator)
        register("trainable", TrainableGenerator)
        register("maskless", MasklessGenerator)

    @hookimpl
    def register_filters(self, register):
        register("data-filter", DataFilter)


@pytest.fixture
def registry() -> Iterator[Registry]:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(baseline, name="baseline")
    pm.register(_TestPlugin(), name="test-plugin")
    try:
        yield Registry(pm)
    finally:
        pm.unregister(name="test-plugin")
        pm.unregister(name="baseline")


def _data(**sections) -> dict:
    data = {"run": {"n": 4, "data": "data/demo", "out": "runs/x"},
            "mask_source": {"name": "real-pairs"},
            "generator": {"name": "augment"}}
    for key, value in sections.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


# --- parse_pipeline: the shape of the file ---------------------------------------------------------


def test_parse_reads_every_section() -> None:
    spec = parse_pipeline(_data(
        run={"n": 5, "seed": 3, "batch_size": 2, "data": "d", "out": "o", "max_candidates": 9},
        generator={"name": "augment", "rotation": 5.0, "checkpoint": "ckpt"},
        refiners=[{"name": "threshold", "method": "fixed"}],
        filters=["mask-area"],
        evaluators=[{"name": "mask-stats"}],
    ))
    assert isinstance(spec, PipelineSpec)
    assert (spec.run.n, spec.run.seed, spec.run.batch_size, spec.run.max_candidates) == (5, 3, 2, 9)
    assert spec.run.data == "d" and spec.run.out == "o"
    assert spec.generator == StageSpec("augment", {"rotation": 5.0})
    assert spec.checkpoint == "ckpt"
    assert spec.mask_source == StageSpec("real-pairs")
    assert spec.refiners == (StageSpec("threshold", {"method": "fixed"}),)
    assert spec.filters == (StageSpec("mask-area"),)  # a bare string names a stage without options
    assert spec.evaluators == (StageSpec("mask-stats"),)
    assert spec.to_dict()["generator"] == {"name": "augment", "rotation": 5.0, "checkpoint": "ckpt"}


def test_run_defaults() -> None:
    spec = parse_pipeline({"generator": {"name": "augment"}})
    assert (spec.run.n, spec.run.seed, spec.run.batch_size) == (16, 0, 8)
    assert spec.run.data is None and spec.run.out is None and spec.run.max_candidates is None
    assert spec.mask_source is None and spec.refiners == spec.filters == spec.evaluators == ()


def test_unknown_section_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        parse_pipeline(_data(filter=[{"name": "mask-area"}]), "p.toml")
    msg = str(err.value)
    assert "p.toml" in msg and "[filter]" in msg
    for section in ("run", "mask_source", "generator", "refiners", "filters", "evaluators"):
        assert section in msg
    assert "\n" not in msg


def test_unknown_run_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        parse_pipeline(_data(run={"n": 4, "sed": 1}))
    msg = str(err.value)
    assert "[run]" in msg and "'sed'" in msg
    for key in ("n", "seed", "batch_size", "data", "out", "device", "max_candidates"):
        assert key in msg


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("n", "many", "expected int"),
    ("n", True, "expected int"),
    ("n", 2.5, "expected int"),
    ("seed", [1], "expected int"),
    ("data", 3, "expected str"),
])
def test_wrong_type_in_run(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_pipeline(_data(run={key: value}))
    msg = str(err.value)
    assert "[run]" in msg and repr(key) in msg and expected in msg and repr(value) in msg


@pytest.mark.parametrize(("run", "text"), [
    ({"n": 0}, "n must be >= 1"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"n": 10, "max_candidates": 5}, "max_candidates must be >= n"),
    ({"seed": -1}, "seed must be >= 0"),
])
def test_bad_run_values(run: dict, text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        parse_pipeline(_data(run=run))


def test_strings_from_flags_are_parsed() -> None:
    spec = parse_pipeline(_data(run={"n": "7", "seed": "2"}))
    assert spec.run.n == 7 and spec.run.seed == 2


def test_overrides_replace_run_keys_and_none_is_ignored() -> None:
    spec = parse_pipeline(_data(run={"n": 4, "seed": 1, "out": "a"}), overrides={"n": 9, "seed": None, "out": "b"})
    assert spec.run.n == 9 and spec.run.seed == 1 and spec.run.out == "b"
    with pytest.raises(ConfigError, match="'colour'"):
        parse_pipeline(_data(), overrides={"colour": "red"})


@pytest.mark.parametrize(("data", "text"), [
    ({"run": {"n": 1}}, "no [generator] section"),
    (_data(run=[1, 2]), "[run]: expected a table"),
    (_data(generator={"rotation": 3.0}), "[generator]: missing name"),
    (_data(generator={"name": ""}), "[generator]: missing name"),
    (_data(generator={"name": "augment", "checkpoint": 3}), "checkpoint must be a string path"),
    (_data(refiners={"name": "threshold"}), "[[refiners]]: expected a list of tables"),
    (_data(filters=[{"min_fraction": 0.1}]), "[[filters]] #1: missing name"),
    (_data(evaluators=["mask-stats", 7]), "[[evaluators]] #2: expected a table"),
    (_data(mask_source=3), "[mask_source]: expected a table"),
])
def test_malformed_sections(data: dict, text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_pipeline(data, "p.toml")
    assert text in str(err.value)
    assert str(err.value).startswith("p.toml")


# --- pipeline files -----------------------------------------------------------------------------------


def test_load_pipeline_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[run]\nn = 3\nout = "o"\n\n[mask_source]\nname = "real-pairs"\n\n'
                    '[generator]\nname = "augment"\nrotation = 2.0\n')
    spec = load_pipeline(path, {"n": 5})
    assert spec.run.n == 5 and spec.run.out == "o"
    assert spec.generator.options == {"rotation": 2.0}


def test_load_pipeline_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match="pipeline file not found") as err:
        load_pipeline(missing)
    assert str(missing) in str(err.value)
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\nn = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML") as err:
        read_pipeline_file(broken)
    assert str(broken) in str(err.value)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[generator]\nname = "augment"\n[extras]\nx = 1\n')
    with pytest.raises(ConfigError, match=r"unknown section \[extras\]") as err:
        load_pipeline(unknown)
    assert str(unknown) in str(err.value)


def test_quickstart_example_builds() -> None:
    spec = load_pipeline(EXAMPLES / "quickstart.toml")
    pipeline = build_pipeline(spec, default_registry())
    assert isinstance(pipeline.mask_source, RealPairsSource)
    assert isinstance(pipeline.generator, AugmentGenerator)
    assert [type(f) for f in pipeline.filters] == [MaskAreaFilter]
    assert [e.name for e in pipeline.evaluators] == ["mask-stats"]
    assert pipeline.generator.config.rotation == 12.0
    assert pipeline.filters[0].config.min_fraction == 0.05
    assert pipeline.generator.plugin == "baseline"
    assert pipeline.needs_data


# --- fingerprints ---------------------------------------------------------------------------------------


def _fingerprint(data: dict) -> str:
    return build_pipeline(parse_pipeline(data), default_registry()).fingerprint()


def test_fingerprint_ignores_what_does_not_change_the_pairs() -> None:
    base = _fingerprint(_data())
    same = _fingerprint(_data(
        run={"n": 99, "batch_size": 1, "data": "data/demo", "out": "elsewhere", "device": "cpu",
             "max_candidates": 500},
        evaluators=["mask-stats"],
    ))
    assert same == base


def test_fingerprint_sees_options_at_their_defaults_as_left_out() -> None:
    written = _fingerprint(_data(generator={"name": "augment", "rotation": 10.0, "hflip": "0.5"}))
    assert written == _fingerprint(_data())


@pytest.mark.parametrize("change", [
    {"run": {"n": 4, "data": "data/demo", "seed": 1}},
    {"run": {"n": 4, "data": "data/other"}},
    {"generator": {"name": "augment", "rotation": 3.0}},
    {"generator": {"name": "augment", "elastic": 0.0}},
    {"mask_source": {"name": "real-pairs", "order": "random"}},
    {"filters": ["mask-area"]},
    {"refiners": ["threshold"]},
])
def test_fingerprint_changes_with_what_decides_the_pairs(change: dict) -> None:
    assert _fingerprint(_data(**change)) != _fingerprint(_data())


# --- build_pipeline: names and fit ---------------------------------------------------------------------


def test_build_with_the_default_registry() -> None:
    pipeline = build_pipeline(parse_pipeline(_data(
        refiners=["threshold"], filters=[{"name": "mask-area", "min_fraction": 0.1}], evaluators=["mask-stats"],
    )), default_registry())
    assert [c.name for c in pipeline.stages()] == ["real-pairs", "augment", "threshold", "mask-area", "mask-stats"]
    assert [c.role for c in pipeline.stages()] == ["mask_source", "generator", "refiner", "filter", "evaluator"]
    assert pipeline.filters[0].config.min_fraction == 0.1


@pytest.mark.parametrize(("section", "value", "role", "names"), [
    ("generator", {"name": "agument"}, "generator", ["augment"]),
    ("mask_source", {"name": "real-mask"}, "mask source", ["real-masks", "real-pairs"]),
    ("refiners", ["otsu"], "refiner", ["threshold"]),
    ("filters", ["area"], "filter", ["mask-area"]),
    ("evaluators", ["fidd"], "evaluator", ["mask-stats"]),
])
def test_unknown_component_lists_valid_names(section: str, value: object, role: str, names: list[str]) -> None:
    with pytest.raises(UnknownComponentError) as err:
        build_pipeline(parse_pipeline(_data(**{section: value})), default_registry())
    msg = str(err.value)
    assert msg.startswith(f"unknown {role} ")
    assert "available: " in msg
    for name in names:
        assert name in msg


def test_unknown_component_option_lists_valid_options() -> None:
    with pytest.raises(ConfigError) as err:
        build_pipeline(parse_pipeline(_data(generator={"name": "augment", "rotaton": 3.0})), default_registry())
    msg = str(err.value)
    assert "[generator] 'augment'" in msg and "'rotaton'" in msg and "rotation" in msg and "elastic" in msg


def test_wrong_component_option_type() -> None:
    with pytest.raises(ConfigError) as err:
        build_pipeline(parse_pipeline(_data(filters=[{"name": "mask-area", "min_fraction": "lots"}])),
                       default_registry())
    msg = str(err.value)
    assert "[[filters]] 'mask-area'" in msg and "min_fraction" in msg and "expected float" in msg


def test_component_config_check_names_the_stage() -> None:
    with pytest.raises(ConfigError) as err:
        build_pipeline(parse_pipeline(_data(filters=[{"name": "mask-area", "min_fraction": 0.5,
                                                      "max_fraction": 0.2}])), default_registry())
    assert "[[filters]] 'mask-area'" in str(err.value) and "min_fraction <= max_fraction" in str(err.value)


def test_generator_needing_images_fed_by_real_masks(registry: Registry) -> None:
    with pytest.raises(ConfigError) as err:
        build_pipeline(parse_pipeline(_data(mask_source={"name": "real-masks"})), registry)
    msg = str(err.value)
    assert "generator 'augment' needs conditions with image" in msg
    assert "mask source 'real-masks' gives mask" in msg


def test_generator_needing_conditions_without_a_mask_source(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="needs conditions with image, mask, but there is no"):
        build_pipeline(parse_pipeline(_data(mask_source=None)), registry)


def test_soft_mask_only_generator_needs_a_refiner(registry: Registry) -> None:
    data = _data(mask_source=None, generator={"name": "soft-only"})
    with pytest.raises(ConfigError, match="'soft-only' makes soft masks only; add a refiner such as 'threshold'"):
        build_pipeline(parse_pipeline(data), registry)
    data["refiners"] = ["threshold"]
    pipeline = build_pipeline(parse_pipeline(data), registry)
    assert [r.name for r in pipeline.refiners] == ["threshold"]


def test_generator_without_any_mask(registry: Registry) -> None:
    data = _data(mask_source=None, generator={"name": "maskless"})
    with pytest.raises(ConfigError, match="makes no mask and no mask source gives one"):
        build_pipeline(parse_pipeline(data), registry)
    data["mask_source"] = {"name": "real-masks"}
    assert build_pipeline(parse_pipeline(data), registry).generator.name == "maskless"


def test_trainable_generator_needs_a_checkpoint(registry: Registry) -> None:
    data = _data(mask_source=None, generator={"name": "trainable"})
    with pytest.raises(ConfigError) as err:
        build_pipeline(parse_pipeline(data), registry)
    assert "'trainable' needs a checkpoint" in str(err.value) and "medsynth train trainable" in str(err.value)
    data["generator"] = {"name": "trainable", "checkpoint": "runs/train"}
    pipeline = build_pipeline(parse_pipeline(data), registry)
    assert pipeline.spec.checkpoint == "runs/train"


@pytest.mark.parametrize(("sections", "users"), [
    ({"mask_source": None, "generator": {"name": "soft-only"}, "refiners": ["threshold"],
      "evaluators": ["mask-stats"]}, "mask-stats"),
    ({"mask_source": None, "generator": {"name": "soft-only"}, "refiners": ["threshold"],
      "filters": ["data-filter"]}, "data-filter"),
    ({}, "real-pairs"),
])
def test_stages_needing_data_without_data(registry: Registry, sections: dict, users: str) -> None:
    data = _data(**sections)
    data["run"] = {"n": 4}
    with pytest.raises(ConfigError) as err:
        build_pipeline(parse_pipeline(data), registry)
    msg = str(err.value)
    assert users in msg and "need the real dataset" in msg and "[run] data" in msg


def test_pipeline_without_data_needs_none(registry: Registry) -> None:
    data = _data(mask_source=None, generator={"name": "soft-only", "level": 0.4}, refiners=["threshold"])
    data["run"] = {"n": 2}
    pipeline = build_pipeline(parse_pipeline(data), registry)
    assert not pipeline.needs_data
    assert pipeline.generator.config.level == 0.4
