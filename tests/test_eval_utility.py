"""The utility evaluator: segmenters trained with and without the synthetic pairs, tested on held-out real pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth_core import (
    ConfigError,
    Dataset,
    DatasetError,
    Registry,
    Sample,
    build_config,
    make_plugin_manager,
    open_dataset,
)
from medsynth_plugins import evaluation
from medsynth_plugins.common.segmenter import dice_score, train_segmenter
from medsynth_plugins.evaluation.utility import UtilityConfig, UtilityEvaluator
from medsynth_plugins.evaluation.utility_mix import train_mixed
from medsynth_plugins.evaluation.utility_split import make_split, mix_partners, n_values, synthetic_source

# tiny recipe: 6 real training pairs, 6 test pairs, 32 px; 80 steps is where this recipe stops depending on the
# seed (Dice 0.93-0.95 for seeds 0-7, where 40 steps spread over 0.6-0.93)
TINY = {"size": 32, "steps": 80, "repeats": 1, "n_real": ("all",), "test_fraction": 0.5}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The suite's two workers share two cores: a second torch thread per worker would only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real(demo_dir: Path) -> Dataset:
    return open_dataset(demo_dir)


def _copies(real: Dataset, indices) -> Dataset:
    """Synthetic pairs that are exact copies of real pairs, with the provenance the runner records."""
    samples = [Sample(real[i].image, real[i].mask, meta={"condition": {"source": real.files[i].stem}})
               for i in indices]
    return Dataset.from_samples(samples, labels=real.labels, name="copies")


def _by_name(metrics) -> dict:
    return {m.name: m for m in metrics}


@pytest.fixture(scope="module")
def copies_run(real: Dataset):
    """real, and real + copies of every real pair (the copies of test pairs must be left out)."""
    config = UtilityConfig(protocols=("real", "real+synthetic"), **TINY)
    return _by_name(UtilityEvaluator(config).evaluate(real, _copies(real, range(len(real)))))


def test_utility_is_registered() -> None:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(evaluation, name="evaluation")
    assert Registry(pm).get("evaluator", "utility").cls is UtilityEvaluator


def test_trained_real_model_beats_an_untrained_one(real: Dataset, copies_run) -> None:
    details = copies_run["dice[real]"].details
    test_stems = set(details["split"]["test_stems"])
    test = [real[i] for i in range(len(real)) if real.files[i].stem in test_stems]
    train = [real[i] for i in range(len(real)) if real.files[i].stem not in test_stems]
    config = UtilityConfig(**TINY)
    untrained = train_segmenter(train, config.recipe(0), steps=0)
    untrained_dice = np.mean([dice_score(p, s.mask) for p, s in zip(untrained.predict([s.image for s in test]), test)])
    empty_dice = np.mean([dice_score(np.zeros_like(s.mask), s.mask) for s in test])
    trained = copies_run["dice[real]"].value
    assert 0.0 <= untrained_dice <= 1.0 and empty_dice == 0.0
    assert trained > 0.8
    assert trained > untrained_dice + 0.2


def test_copies_of_real_do_not_help_by_magic(copies_run) -> None:
    # the union repeats each training pair twice: the same distribution, so only training noise remains
    # (gains of -0.018 to +0.008 over seeds 0-7 of this recipe)
    gain = copies_run["dice_gain[real+synthetic]"]
    assert gain.value == pytest.approx(copies_run["dice[real+synthetic]"].value - copies_run["dice[real]"].value)
    assert gain.value < 0.04
    assert 0.0 <= gain.details["p_value"] <= 1.0


def test_mix_swaps_partners_in(real: Dataset) -> None:
    reals = [real[i] for i in range(4)]
    recipe = UtilityConfig(size=32, steps=3).recipe(0)
    baseline = train_segmenter(reals, recipe).model.state_dict()

    def weights(partners, alpha):
        return train_mixed(reals, partners, alpha, recipe).model.state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    blank = Sample(np.zeros_like(reals[0].image), np.zeros_like(reals[0].mask))
    assert same(weights([[blank]] * 4, 0.0), baseline)  # alpha = 0: the real-only training, exactly
    assert same(weights([[s] for s in reals], 1.0), baseline)  # swapped for identical copies: no change
    assert not same(weights([[blank]] * 4, 1.0), baseline)
    assert same(weights([[], [], [], []], 1.0), baseline)  # a real pair without partners stays itself


def test_copies_of_test_images_are_left_out(real: Dataset, copies_run) -> None:
    split = copies_run["dice[real]"].details["split"]
    assert set(split["test_stems"]) <= {f.stem for f in real.files}  # the test images are real pairs only
    assert split["real_test"] == 6 and split["real_train_pool"] == 6
    assert split["synthetic_excluded_leakage"] == 6 and split["synthetic_used"] == 6


def test_split_and_leakage_rule(real: Dataset) -> None:
    synthetic = _copies(real, [*range(len(real)), 0, 1])
    split = make_split(real, synthetic, 0.25, seed=3)
    assert len(split.test) == 3 and sorted(split.train + split.test) == list(range(len(real)))
    test_stems = {real.files[i].stem for i in split.test}
    leaked = [j for j in range(len(synthetic)) if synthetic_source(synthetic[j].meta) in test_stems]
    assert split.excluded == leaked and leaked
    assert sorted(split.synthetic + split.excluded) == list(range(len(synthetic)))
    assert not test_stems & {split.sources[j] for j in split.synthetic}
    assert make_split(real, synthetic, 0.25, seed=3) == split
    assert make_split(real, synthetic, 0.25, seed=4).test != split.test


def test_synthetic_set_made_only_from_test_images_is_refused(real: Dataset) -> None:
    test = make_split(real, Dataset.from_samples([]), 0.5, seed=0).test
    config = UtilityConfig(protocols=("real", "real+synthetic"), **TINY)
    with pytest.raises(DatasetError, match="made from test images were left out") as err:
        UtilityEvaluator(config).evaluate(real, _copies(real, test))
    assert "\n" not in str(err.value)


def test_source_read_from_memory_and_manifest() -> None:
    assert synthetic_source({"condition": {"source": "case_0003"}}) == "case_0003"
    assert synthetic_source({"meta": {"condition": {"source": "case_0004"}}, "stem": "000001"}) == "case_0004"
    assert synthetic_source({"stem": "000001"}) is None


def test_mix_partners_by_source_and_from_pool(real: Dataset) -> None:
    synthetic = _copies(real, [*range(len(real))] * 3)
    split = make_split(real, synthetic, 0.5, seed=0)
    partners, mode = mix_partners(split.train, split, r=2, seed=0, repeat=0)
    assert mode == "source"
    for i, group in zip(split.train, partners):
        assert len(group) == 2 and all(split.sources[j] == real.files[i].stem for j in group)
    anonymous = Dataset.from_samples([Sample(s.image, s.mask) for s in synthetic])
    split = make_split(real, anonymous, 0.5, seed=0)
    partners, mode = mix_partners(split.train, split, r=3, seed=0, repeat=0)
    assert mode == "pool" and all(len(g) == 3 for g in partners)


def test_n_values_cap_and_all() -> None:
    assert n_values((4, 8, "all"), 6) == ([4, 6], ["n_real 8 capped at the 6 real training pairs available"])
    assert n_values((1, "all"), 20)[0] == [1, 20]


def test_all_protocols_are_deterministic_and_draw_a_curve(real: Dataset) -> None:
    config = UtilityConfig(protocols=("real", "real+synthetic", "synthetic", "pretrain-finetune", "mix"),
                           size=32, steps=6, finetune_steps=3, n_real=(2, 100), test_fraction=0.5, seed=1, alpha=0.0)
    synthetic = _copies(real, range(len(real)))
    first = UtilityEvaluator(config).evaluate(real, synthetic)
    second = UtilityEvaluator(config).evaluate(real, synthetic)
    assert [(m.name, m.value, m.sd) for m in first] == [(m.name, m.value, m.sd) for m in second]
    metrics = _by_name(first)
    protocols = ["real", "real+synthetic", "synthetic", "pretrain-finetune", "mix"]
    assert set(metrics) == {f"{k}[{p}]" for p in protocols for k in ("dice", "iou")} | {
        f"dice_gain[{p}]" for p in protocols[1:]}
    assert all(0.0 <= metrics[f"dice[{p}]"].value <= 1.0 and metrics[f"dice[{p}]"].direction == "higher"
               for p in protocols)
    curve = metrics["dice[real]"].details["curve"]
    assert curve["x"] == [2, 6] and curve["xlabel"] == "real training pairs" and curve["ylabel"] == "Dice"
    assert set(curve["series"]) == set(protocols)
    assert all(len(s["mean"]) == len(s["sd"]) == 2 for s in curve["series"].values())
    assert curve["series"]["synthetic"]["mean"][0] == curve["series"]["synthetic"]["mean"][1]  # N-independent
    assert any("capped" in note for note in metrics["dice[real]"].details["notes"])
    # alpha = 0: mix is the real-only training, so every per-image difference is zero
    assert curve["series"]["mix"] == curve["series"]["real"]
    assert metrics["dice_gain[mix]"].value == 0.0 and metrics["dice_gain[mix]"].details["p_value"] == 1.0
    trainings = metrics["dice[real]"].details["mix"]["trainings"]
    assert [(t["n_real"], t["partners_from"], t["reals_with_partner"]) for t in trainings] == [
        (2, "source", 2), (6, "source", 6)]


@pytest.mark.parametrize("options, message", [
    ({"alpha": 1.5}, "alpha must lie in [0, 1]"),
    ({"alpha": -0.1}, "alpha must lie in [0, 1]"),
    ({"protocols": ("real", "magic")}, "unknown protocol 'magic'"),
    ({"n_real": (0, "all")}, "n_real values must be integers >= 1"),
    ({"n_real": ("some",)}, "n_real values must be integers >= 1"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"repeats": 0}, "repeats must be >= 1"),
    ({"r": 0}, "r must be >= 1"),
    ({"size": 33}, "multiple of 8"),
])
def test_bad_options_give_one_line(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        UtilityConfig(**options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_options_from_toml_and_command_line() -> None:
    assert build_config(UtilityConfig, {"n_real": [4, 8, "all"]}, "[evaluators] utility").n_real == (4, 8, "all")
    assert build_config(UtilityConfig, {"n_real": "1,3,5,all"}, "--set").n_real == (1, 3, 5, "all")
    assert build_config(UtilityConfig, {"protocols": "real,mix", "alpha": "0.3"}, "--set").protocols == ("real", "mix")
    with pytest.raises(ConfigError, match=r"^--set: alpha must lie in \[0, 1\], got 2.0$"):
        build_config(UtilityConfig, {"alpha": "2"}, "--set")
    with pytest.raises(ConfigError, match="n_real"):
        build_config(UtilityConfig, {"n_real": "4,-1"}, "--set")


def test_unknown_encoder_is_a_config_error(real: Dataset) -> None:
    config = UtilityConfig(encoder="no-such-encoder", **TINY)
    with pytest.raises(ConfigError, match="encoder 'no-such-encoder'"):
        UtilityEvaluator(config).evaluate(real, _copies(real, range(len(real))))


def test_real_only_models_are_trained_once_for_several_synthetic_sets(real: Dataset,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import medsynth_plugins.evaluation.utility as utility

    trained: list[int] = []

    def counting(pairs, *args, **kwargs):
        trained.append(len(pairs))
        return train_segmenter(pairs, *args, **kwargs)

    monkeypatch.setattr(utility, "train_segmenter", counting)
    evaluator = UtilityEvaluator(UtilityConfig(protocols=("real", "real+synthetic"), **TINY))
    first = _by_name(evaluator.evaluate(real, _copies(real, range(len(real)))))
    second = _by_name(evaluator.evaluate(real, _copies(real, range(0, len(real), 2))))
    assert len(trained) == 3, "real-only once, real+synthetic once per set"
    assert first["dice[real]"].value == second["dice[real]"].value
    fresh = _by_name(UtilityEvaluator(UtilityConfig(protocols=("real",), **TINY)).evaluate(
        real, _copies(real, range(0, len(real), 2))))
    assert fresh["dice[real]"].value == second["dice[real]"].value, "the kept scores are the ones training gives"
