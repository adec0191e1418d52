"""The baseline plugin: real masks, classical augmentation, thresholding, the area filter and mask statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medsynth_core import (
    Condition,
    ConfigError,
    Dataset,
    PipelineError,
    Sample,
    default_registry,
    open_dataset,
    sample_seed,
)
from medsynth_plugins.baseline.augment import AugmentConfig, AugmentGenerator
from medsynth_plugins.baseline.mask_area import MaskAreaConfig, MaskAreaFilter
from medsynth_plugins.baseline.mask_stats import MaskStatsConfig, MaskStatsEvaluator
from medsynth_plugins.baseline.real_masks import RealMasksConfig, RealMasksSource, RealPairsSource
from medsynth_plugins.baseline.threshold import ThresholdConfig, ThresholdRefiner

NO_GEOMETRY = {"hflip": 0.0, "vflip": 0.0, "rotation": 0.0, "scale": 0.0, "translate": 0.0, "elastic": 0.0}
NO_INTENSITY = {"gamma": 0.0, "contrast": 0.0, "brightness": 0.0, "noise": 0.0}


@pytest.fixture(scope="module")
def real(demo_dir: Path) -> Dataset:
    return open_dataset(demo_dir)


def _seeds(indices, run_seed: int = 0) -> list[int]:
    return [sample_seed(run_seed, i) for i in indices]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum()) / float((a | b).sum())


def _contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean intensity outside the mask minus inside (the phantom's lungs are dark)."""
    return float(image[mask == 0].mean() - image[mask > 0].mean())


def _augment(condition: Condition, seed: int, **options) -> Sample:
    return AugmentGenerator(AugmentConfig(**options)).generate([condition], [seed])[0]


# --- registration -----------------------------------------------------------------------------------


def test_baseline_registers_its_components() -> None:
    found = {(c.role, c.name): c for c in default_registry().components() if c.plugin == "baseline"}
    assert {key: info.cls for key, info in found.items()} == {
        ("mask_source", "real-masks"): RealMasksSource,
        ("mask_source", "real-pairs"): RealPairsSource,
        ("generator", "augment"): AugmentGenerator,
        ("refiner", "threshold"): ThresholdRefiner,
        ("filter", "mask-area"): MaskAreaFilter,
        ("evaluator", "mask-stats"): MaskStatsEvaluator,
    }
    assert all(info.description for info in found.values())


# --- real-masks and real-pairs ---------------------------------------------------------------------------


def test_real_masks_cycle_through_the_real_set(real: Dataset) -> None:
    source = RealMasksSource()
    source.fit(real)
    indices = list(range(14))
    conditions = source.conditions(indices, _seeds(indices))
    assert len(conditions) == 14
    for i, c in zip(indices, conditions):
        assert np.array_equal(c.mask, real[i % 12].mask)
        assert c.mask.dtype == np.uint8
        assert c.image is None and c.kinds() == frozenset({"mask"})
        assert c.meta == {"source": f"case_{i % 12:04d}", "augmented": False}


def test_real_pairs_give_the_image_too(real: Dataset) -> None:
    source = RealPairsSource()
    source.fit(real)
    conditions = source.conditions([3, 15], _seeds([3, 15]))
    for c in conditions:
        assert c.kinds() == frozenset({"mask", "image"})
        assert np.array_equal(c.image, real[3].image) and np.array_equal(c.mask, real[3].mask)
    assert RealPairsSource.provides == frozenset({"mask", "image"})


def test_real_masks_random_order_depends_on_the_seed_only(real: Dataset) -> None:
    indices = list(range(24))
    picks = {}
    for run_seed in (0, 1):
        source = RealMasksSource(RealMasksConfig(order="random"))
        source.fit(real)
        picks[run_seed] = [c.meta["source"] for c in source.conditions(indices, _seeds(indices, run_seed))]
    again = RealMasksSource(RealMasksConfig(order="random"))
    again.fit(real)
    assert [c.meta["source"] for c in again.conditions(indices, _seeds(indices))] == picks[0]
    # batch by batch, or one sample at a time: the same picks
    one_by_one = [again.conditions([i], _seeds([i]))[0].meta["source"] for i in indices]
    assert one_by_one == picks[0]
    assert picks[0] != picks[1]
    assert picks[0] != [f"case_{i % 12:04d}" for i in indices]
    assert len(set(picks[0])) > 4
    # the pick depends on the seed, not on the index
    moved = again.conditions([100], [sample_seed(0, 5)])[0]
    assert moved.meta["source"] == picks[0][5]


@pytest.mark.parametrize("source_cls", [RealMasksSource, RealPairsSource])
def test_real_masks_augmented(real: Dataset, source_cls: type[RealMasksSource]) -> None:
    config = RealMasksConfig(augment=True, rotation=20.0, translate=0.05, elastic=0.02, hflip=0.5)
    source = source_cls(config)
    source.fit(real)
    indices = list(range(12))
    conditions = source.conditions(indices, _seeds(indices))
    again = source.conditions(indices, _seeds(indices))
    changed = 0
    for i, c, d in zip(indices, conditions, again):
        assert np.array_equal(c.mask, d.mask)
        assert c.mask.dtype == np.uint8 and c.mask.shape == (64, 64)
        assert set(np.unique(c.mask)) == {0, 1}
        assert c.meta["augmented"] is True
        changed += not np.array_equal(c.mask, real[i].mask)
        if c.image is not None:
            assert c.image.dtype == np.float32 and c.image.shape == (64, 64)
            assert _contrast(c.image, c.mask) > 0.1
            assert _contrast(c.image, c.mask) > _contrast(c.image, real[i].mask)
    assert changed == 12
    other = source.conditions(indices, _seeds(indices, run_seed=1))
    assert any(not np.array_equal(a.mask, b.mask) for a, b in zip(conditions, other))


def test_real_masks_need_fit_and_masks() -> None:
    source = RealMasksSource()
    with pytest.raises(PipelineError, match="fit"):
        source.conditions([0], [1])
    unlabelled = Dataset.from_samples([Sample(image=np.zeros((8, 8), np.float32))], name="bare")
    with pytest.raises(PipelineError, match="'bare' has no masks"):
        source.fit(unlabelled)
    assert RealMasksSource.needs_data


def test_real_masks_config_checks() -> None:
    with pytest.raises(ConfigError, match="hflip"):
        RealMasksConfig(hflip=2.0)
    with pytest.raises(ConfigError, match="order"):
        default_registry().create("mask_source", "real-masks", {"order": "shuffle"})


# --- augment ---------------------------------------------------------------------------------------------


def test_augment_output_contract(real: Dataset) -> None:
    gen = AugmentGenerator()
    conditions = [Condition(mask=real[i].mask, image=real[i].image) for i in range(4)]
    samples = gen.generate(conditions, _seeds(range(4)))
    assert len(samples) == 4
    for s in samples:
        s.check("augment")
        assert s.image.dtype == np.float32 and s.image.shape == (64, 64)
        assert s.image.min() >= 0.0 and s.image.max() <= 1.0
        assert s.mask.dtype == np.uint8 and set(np.unique(s.mask)) == {0, 1}
        assert s.soft_mask is None


def test_augment_is_seeded(real: Dataset) -> None:
    condition = Condition(mask=real[0].mask, image=real[0].image)
    a = _augment(condition, 11)
    b = _augment(condition, 11)
    c = _augment(condition, 12)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)
    # one sample's output does not depend on its batch-mates
    batch = AugmentGenerator().generate([Condition(mask=real[1].mask, image=real[1].image), condition], [5, 11])
    assert np.array_equal(batch[1].image, a.image) and np.array_equal(batch[1].mask, a.mask)


def test_augment_hflip_alone_mirrors_image_and_mask(real: Dataset) -> None:
    pair = real[2]
    out = _augment(Condition(mask=pair.mask, image=pair.image), 3, **{**NO_GEOMETRY, "hflip": 1.0}, **NO_INTENSITY)
    assert np.array_equal(out.mask, pair.mask[:, ::-1])
    np.testing.assert_allclose(out.image, pair.image[:, ::-1], atol=1e-6)
    both = _augment(Condition(mask=pair.mask, image=pair.image), 3,
                    **{**NO_GEOMETRY, "hflip": 1.0, "vflip": 1.0}, **NO_INTENSITY)
    assert np.array_equal(both.mask, pair.mask[::-1, ::-1])
    np.testing.assert_allclose(both.image, pair.image[::-1, ::-1], atol=1e-6)


def test_augment_identity_when_everything_is_off(real: Dataset) -> None:
    pair = real[4]
    out = _augment(Condition(mask=pair.mask, image=pair.image), 9, **NO_GEOMETRY, **NO_INTENSITY)
    assert np.array_equal(out.mask, pair.mask)
    np.testing.assert_allclose(out.image, pair.image, atol=1e-6)


def test_augment_warps_image_and_mask_together(real: Dataset) -> None:
    # an image drawn from its mask: dark inside, bright outside, so any misalignment shows
    mask = real[5].mask
    image = np.where(mask > 0, 0.2, 0.8).astype(np.float32)
    options = {**NO_GEOMETRY, "rotation": 30.0, "scale": 0.15, "translate": 0.08, "elastic": 0.03}
    for seed in range(6):
        out = _augment(Condition(mask=mask, image=image), seed, **options, **NO_INTENSITY)
        assert _iou(out.mask, mask) < 0.97, "the warp must move the mask for this test to mean anything"
        # linear interpolation blends across the boundary only; away from it the values are exact
        inner = ndimage.binary_erosion(out.mask > 0, iterations=2)
        outer = ndimage.binary_erosion(out.mask == 0, iterations=2)
        assert inner.any() and outer.any()
        assert np.allclose(out.image[inner], 0.2, atol=1e-4)
        assert np.allclose(out.image[outer], 0.8, atol=1e-4)
        assert np.mean((out.image < 0.5) == (out.mask > 0)) > 0.99


def test_augmented_mask_stays_over_the_dark_lungs(real: Dataset) -> None:
    options = {"rotation": 25.0, "scale": 0.1, "translate": 0.06, "elastic": 0.02}
    for i in range(6):
        pair = real[i]
        out = _augment(Condition(mask=pair.mask, image=pair.image), sample_seed(0, i), **options)
        assert _contrast(out.image, out.mask) > 0.1
        assert _contrast(out.image, out.mask) > _contrast(out.image, pair.mask)


def test_augment_colour_image() -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:24] = 1
    image = np.random.default_rng(0).uniform(0, 1, (32, 32, 3)).astype(np.float32)
    out = _augment(Condition(mask=mask, image=image), 1)
    out.check("colour")
    assert out.image.shape == (32, 32, 3) and out.image.dtype == np.float32
    flipped = _augment(Condition(mask=mask, image=image), 1, **{**NO_GEOMETRY, "hflip": 1.0}, **NO_INTENSITY)
    np.testing.assert_allclose(flipped.image, image[:, ::-1], atol=1e-6)


@pytest.mark.parametrize(("options", "text"), [
    ({"hflip": 1.5}, "hflip is a probability"),
    ({"vflip": -0.1}, "vflip is a probability"),
    ({"rotation": -1.0}, "rotation must be >= 0"),
    ({"scale": 1.0}, "scale must be < 1"),
    ({"noise": -0.1}, "noise must be >= 0"),
    ({"gamma": -1.0}, "gamma must be >= 0"),
])
def test_augment_config_checks(options: dict, text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        AugmentConfig(**options)


def test_augment_requires_image_and_mask() -> None:
    assert AugmentGenerator.requires == frozenset({"image", "mask"})
    assert AugmentGenerator.makes == frozenset({"mask"}) and not AugmentGenerator.trainable


# --- threshold -------------------------------------------------------------------------------------------


def _disc(size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (np.hypot(yy - size / 2, xx - size / 2.5) < size / 4).astype(np.uint8)


def _soft(truth: np.ndarray, scale: float = 1.0, noise: float = 0.08, seed: int = 0) -> np.ndarray:
    blurred = ndimage.gaussian_filter(truth.astype(np.float64), 2.0) * scale
    noisy = blurred + np.random.default_rng(seed).normal(0, noise, truth.shape)
    return np.clip(noisy, 0, 1).astype(np.float32)


def _soft_sample(soft: np.ndarray, **meta) -> Sample:
    return Sample(image=np.zeros(soft.shape, np.float32), soft_mask=soft, meta=dict(meta))


def test_threshold_fixed() -> None:
    soft = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    refiner = ThresholdRefiner(ThresholdConfig(method="fixed", threshold=0.3))
    (out,) = refiner.refine([_soft_sample(soft)])
    assert out.mask.dtype == np.uint8
    assert np.array_equal(out.mask, (soft > 0.3).astype(np.uint8))
    assert out.meta["threshold"] == 0.3
    out.check("threshold")


def test_threshold_otsu_recovers_a_blurred_noisy_mask() -> None:
    truth = _disc()
    # a generator that is unsure: the soft mask never gets above 0.6, so a fixed 0.5 loses most of it
    soft = _soft(truth, scale=0.6)
    (otsu,) = ThresholdRefiner().refine([_soft_sample(soft)])
    (fixed,) = ThresholdRefiner(ThresholdConfig(method="fixed")).refine([_soft_sample(soft)])
    assert set(np.unique(otsu.mask)) == {0, 1} and set(np.unique(fixed.mask)) <= {0, 1}
    assert _iou(otsu.mask, truth) > 0.9
    assert _iou(otsu.mask, truth) > _iou(fixed.mask, truth) + 0.1
    assert 0.1 < otsu.meta["threshold"] < 0.5


@pytest.mark.parametrize("seed", range(3))
def test_threshold_otsu_on_a_confident_soft_mask(seed: int) -> None:
    truth = _disc()
    (out,) = ThresholdRefiner().refine([_soft_sample(_soft(truth, noise=0.08, seed=seed))])
    assert _iou(out.mask, truth) > 0.9


def test_threshold_label_and_flat_soft_mask() -> None:
    truth = _disc(32)
    (out,) = ThresholdRefiner(ThresholdConfig(label=3)).refine([_soft_sample(_soft(truth))])
    assert set(np.unique(out.mask)) == {0, 3}
    flat_high, flat_low = (_soft_sample(np.full((8, 8), v, np.float32)) for v in (0.8, 0.2))
    high, low = ThresholdRefiner(ThresholdConfig(threshold=0.5)).refine([flat_high, flat_low])
    assert high.meta["threshold"] == low.meta["threshold"] == 0.5  # Otsu has nothing to split
    assert high.mask.all() and not low.mask.any()


def test_threshold_passes_samples_without_soft_masks() -> None:
    mask = _disc(16)
    plain = Sample(image=np.zeros((16, 16), np.float32), mask=mask, meta={"index": 1})
    soft = _soft_sample(_soft(_disc(16)), index=2)
    out = ThresholdRefiner().refine([plain, soft])
    assert len(out) == 2
    assert out[0] is plain and out[0].mask is mask and out[0].meta == {"index": 1}
    assert out[1].mask is not None and out[1].meta["index"] == 2
    assert "threshold" not in soft.meta and soft.mask is None  # the input sample is left as it was


@pytest.mark.parametrize(("options", "text"), [
    ({"threshold": 1.5}, "threshold must lie in"),
    ({"label": 0}, "label must be 1-255"),
    ({"label": 256}, "label must be 1-255"),
])
def test_threshold_config_checks(options: dict, text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        ThresholdConfig(**options)


def test_threshold_method_must_be_known() -> None:
    with pytest.raises(ConfigError, match="'mean' is not allowed"):
        default_registry().create("refiner", "threshold", {"method": "mean"})


# --- mask-area -------------------------------------------------------------------------------------------


def _mask_sample(fraction: float, size: int = 20) -> Sample:
    mask = np.zeros(size * size, np.uint8)
    mask[: int(round(fraction * size * size))] = 1
    return Sample(image=np.zeros((size, size), np.float32), mask=mask.reshape(size, size))


def test_mask_area_keeps_by_fraction_and_scores_it() -> None:
    fractions = [0.0, 0.05, 0.1, 0.35, 0.6, 0.61, 1.0]
    samples = [_mask_sample(f) for f in fractions]
    verdicts = MaskAreaFilter(MaskAreaConfig(min_fraction=0.1, max_fraction=0.6)).judge(samples)
    assert len(verdicts) == len(samples)
    assert [v.keep for v in verdicts] == [False, False, True, True, True, False, False]
    assert [v.score for v in verdicts] == pytest.approx([0.0, 0.05, 0.1, 0.35, 0.6, 0.61, 1.0], abs=1e-9)
    assert all(v.sample is None for v in verdicts)


def test_mask_area_defaults_and_multi_label_masks() -> None:
    label_map = np.zeros((10, 10), np.uint8)
    label_map[:2] = 1
    label_map[2:4] = 2
    sample = Sample(image=np.zeros((10, 10), np.float32), mask=label_map)
    (verdict,) = MaskAreaFilter().judge([sample])
    assert verdict.keep and verdict.score == pytest.approx(0.4)
    (empty,) = MaskAreaFilter().judge([_mask_sample(0.0)])
    assert not empty.keep and empty.score == 0.0
    (no_mask,) = MaskAreaFilter().judge([Sample(image=np.zeros((4, 4), np.float32))])
    assert not no_mask.keep and no_mask.score == 0.0
    assert MaskAreaFilter().judge([]) == []


@pytest.mark.parametrize(("lo", "hi"), [(0.5, 0.2), (-0.1, 0.5), (0.1, 1.5)])
def test_mask_area_bad_config(lo: float, hi: float) -> None:
    with pytest.raises(ConfigError, match="min_fraction <= max_fraction"):
        MaskAreaConfig(min_fraction=lo, max_fraction=hi)
    with pytest.raises(ConfigError, match="filter 'mask-area'"):
        default_registry().create("filter", "mask-area", {"min_fraction": lo, "max_fraction": hi})


# --- mask-stats ------------------------------------------------------------------------------------------


def _metrics(real: Dataset, synthetic: Dataset, **options) -> dict[str, object]:
    metrics = MaskStatsEvaluator(MaskStatsConfig(**options)).evaluate(real, synthetic)
    by_name = {m.name: m for m in metrics}
    assert len(by_name) == len(metrics)
    return by_name


def test_mask_stats_identical_sets(real: Dataset) -> None:
    m = _metrics(real, real)
    assert m["fraction_wasserstein"].value == 0.0 and m["components_wasserstein"].value == 0.0
    assert m["fraction_real"].value == m["fraction_synthetic"].value
    assert m["empty_synthetic"].value == 0.0
    assert m["components_real"].value == 2.0  # two lungs per phantom
    expected = np.mean([float(s.mask.mean()) for s in real])
    assert m["fraction_real"].value == pytest.approx(expected)
    assert m["fraction_real"].sd == pytest.approx(np.std([float(s.mask.mean()) for s in real]))
    assert {name: metric.direction for name, metric in m.items()} == {
        "fraction_real": "none", "fraction_synthetic": "none", "fraction_wasserstein": "lower",
        "components_real": "none", "components_synthetic": "none", "components_wasserstein": "lower",
        "empty_synthetic": "lower"}


def test_mask_stats_empty_masks(real: Dataset) -> None:
    empty = Dataset.from_samples(
        [Sample(image=s.image, mask=np.zeros_like(s.mask)) for s in list(real)[:5]], name="empty")
    same = _metrics(real, real)
    m = _metrics(real, empty)
    assert m["empty_synthetic"].value == 1.0
    assert m["fraction_synthetic"].value == 0.0 and m["components_synthetic"].value == 0.0
    assert m["fraction_wasserstein"].value > same["fraction_wasserstein"].value
    # against a point mass at 0, the Wasserstein-1 distance is the mean of the real fractions
    assert m["fraction_wasserstein"].value == pytest.approx(m["fraction_real"].value)
    assert m["components_wasserstein"].value == pytest.approx(2.0)


def test_mask_stats_counts_components_above_the_minimum_size() -> None:
    mask = np.zeros((20, 20), np.uint8)
    mask[2:6, 2:6] = 1
    mask[10:15, 10:15] = 1
    mask[0, 19] = mask[19, 0] = mask[19, 19] = 1
    synthetic = Dataset.from_samples([Sample(image=np.zeros((20, 20), np.float32), mask=mask)])
    empty_real = Dataset.from_samples([Sample(image=np.zeros((20, 20), np.float32))])
    assert _metrics(empty_real, synthetic)["components_synthetic"].value == 2.0
    assert _metrics(empty_real, synthetic, min_component=1)["components_synthetic"].value == 5.0
    # a set without masks counts as one empty mask
    assert _metrics(empty_real, synthetic)["fraction_real"].value == 0.0
    with pytest.raises(ConfigError, match="min_component"):
        MaskStatsConfig(min_component=0)
