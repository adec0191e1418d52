"""Variety (ms-ssim, avg-image-jpeg), intensity-kl and paired (psnr-ssim, mask-agreement) evaluators."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medsynth_core import ConfigError, Dataset, Registry, Sample, build_config, make_plugin_manager, open_dataset
from medsynth_plugins import evaluation
from medsynth_plugins.evaluation.avg_image import AvgImageConfig, AvgImageJPEGEvaluator, encoded_size
from medsynth_plugins.evaluation.intensity_kl import IntensityKLConfig, IntensityKLEvaluator
from medsynth_plugins.evaluation.mask_agreement import MaskAgreementConfig, MaskAgreementEvaluator
from medsynth_plugins.evaluation.ms_ssim import MSSSIMConfig, MSSSIMEvaluator, draw_pairs, max_scales
from medsynth_plugins.evaluation.psnr_ssim import PSNRSSIMConfig, PSNRSSIMEvaluator


def by_name(metrics):
    return {m.name: m for m in metrics}


def copies(sample: Sample, n: int) -> Dataset:
    return Dataset.from_samples([sample.replace() for _ in range(n)])


def conditioned_on(real: Dataset, images, nested: bool = True) -> Dataset:
    """Synthetic samples carrying the real stem as their condition source, as a run folder does."""
    out = []
    for sample, image in zip(real, images):
        condition = {"source": sample.meta["stem"], "augmented": False}
        meta = {"meta": {"condition": condition}} if nested else {"condition": condition}
        out.append(Sample(image=image.astype(np.float32), mask=sample.mask, meta=meta))
    return Dataset.from_samples(out)


@pytest.fixture(scope="module")
def real(demo_dir: Path) -> Dataset:
    dataset = open_dataset(demo_dir)
    dataset.validate()
    return dataset


@pytest.mark.parametrize("name,cls", [
    ("ms-ssim", MSSSIMEvaluator), ("avg-image-jpeg", AvgImageJPEGEvaluator), ("intensity-kl", IntensityKLEvaluator),
    ("psnr-ssim", PSNRSSIMEvaluator), ("mask-agreement", MaskAgreementEvaluator)])
def test_registered(name: str, cls: type) -> None:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(evaluation, name="evaluation")
    assert Registry(pm).get("evaluator", name).cls is cls
    assert cls().unavailable() is None


@pytest.mark.parametrize("cls,values,word", [
    (MSSSIMConfig, {"pairs": "0"}, "pairs"), (MSSSIMConfig, {"scales": "6"}, "scales"),
    (AvgImageConfig, {"size": "4"}, "size"), (IntensityKLConfig, {"bins": "1"}, "bins"),
    (IntensityKLConfig, {"pseudo_count": "-1"}, "pseudo_count"), (PSNRSSIMConfig, {"psnr_cap": "inf"}, "psnr_cap"),
    (MaskAgreementConfig, {"size": "30"}, "size"), (MaskAgreementConfig, {"steps": "0"}, "steps")])
def test_bad_options_are_one_line(cls: type, values: dict, word: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(cls, values, "[evaluator] x")
    assert word in str(err.value) and "\n" not in str(err.value)


# ms-ssim

def test_ms_ssim_of_identical_images_is_one(real: Dataset) -> None:
    metrics = by_name(MSSSIMEvaluator().evaluate(real, copies(real[0], 3)))
    assert metrics["ms_ssim_synthetic"].value == pytest.approx(1.0, abs=1e-9)
    assert metrics["ms_ssim_synthetic"].sd == pytest.approx(0.0, abs=1e-9)
    assert metrics["ms_ssim_synthetic"].details["scales"] == max_scales(64, 64, 1.5) == 3


def test_copies_are_less_varied_than_the_real_set(real: Dataset) -> None:
    ev = MSSSIMEvaluator(MSSSIMConfig(pairs=20, seed=3))
    metrics = by_name(ev.evaluate(real, copies(real[0], 6)))
    syn, ref = metrics["ms_ssim_synthetic"], metrics["ms_ssim_real"]
    assert syn.direction == "lower" and ref.direction == "none"
    assert syn.value > ref.value and 0 <= ref.value < 1 and ref.sd > 0
    assert ref.details["pairs_used"] == 20 and ref.details["seed"] == 3 and not ref.details["all_pairs"]
    assert syn.details["pairs_used"] == 15 and syn.details["all_pairs"]  # 6 images have only 15 distinct pairs
    again = by_name(ev.evaluate(real, copies(real[0], 6)))["ms_ssim_real"]
    assert again.value == ref.value


def test_ms_ssim_pairs_and_scale_limits(real: Dataset) -> None:
    first, second = draw_pairs(50, 100, seed=0)[:2]
    assert len(first) == 100 and not np.any(first == second)
    assert max_scales(32, 32, 1.5) == 2 and max_scales(256, 256, 1.5) == 5 and max_scales(8, 8, 1.5) == 0
    with pytest.raises(ConfigError, match="at most 3 fit"):
        MSSSIMEvaluator(MSSSIMConfig(scales=5)).evaluate(real, real)
    small = by_name(MSSSIMEvaluator(MSSSIMConfig(size=32, pairs=5)).evaluate(real, Dataset.from_samples([real[0]])))
    assert math.isnan(small["ms_ssim_synthetic"].value) and "fewer than 2" in small["ms_ssim_synthetic"].details["note"]
    assert small["ms_ssim_real"].details["scales"] == 2


# avg-image-jpeg

def test_copies_give_a_larger_average_image_than_a_varied_set(real: Dataset) -> None:
    for codec in ("ljpeg", "jpegls", "png"):
        metrics = by_name(AvgImageJPEGEvaluator(AvgImageConfig(codec=codec)).evaluate(real, copies(real[0], 12)))
        syn, ref = metrics["avg_image_bytes_synthetic"], metrics["avg_image_bytes_real"]
        assert syn.value > ref.value > 0, codec
        assert syn.direction == "lower" and syn.details["codec"] == codec and syn.details["size"] == [64, 64]
        assert metrics["noise_sigma_synthetic"].value > 0 and metrics["noise_sigma_real"].sd > 0


def test_avg_image_can_average_equal_counts(real: Dataset) -> None:
    ev = AvgImageJPEGEvaluator(AvgImageConfig(images=4, seed=1, noise=False))
    metrics = by_name(ev.evaluate(real, Dataset.from_samples(list(real)[:6])))
    assert set(metrics) == {"avg_image_bytes_synthetic", "avg_image_bytes_real"}
    assert metrics["avg_image_bytes_real"].details["averaged"] == metrics["avg_image_bytes_synthetic"].details[
        "averaged"] == 4
    assert ev.evaluate(real, real)[1].value == metrics["avg_image_bytes_real"].value  # the same seeded draw


def test_lossless_jpeg_round_trips_and_noise_is_reported_beside_the_size() -> None:
    import imagecodecs

    rng = np.random.default_rng(0)
    image = (rng.random((32, 32)) * 255).astype(np.uint8)
    assert np.array_equal(imagecodecs.ljpeg_decode(imagecodecs.ljpeg_encode(image)), image)
    flat = np.full((32, 32), 0.5, np.float32)
    noisy = np.clip(flat + rng.normal(0, 0.1, flat.shape), 0, 1).astype(np.float32)
    sets = [Dataset.from_samples([Sample(image=im)]) for im in (flat, noisy)]
    metrics = by_name(AvgImageJPEGEvaluator(AvgImageConfig(size=32)).evaluate(*sets))
    assert metrics["avg_image_bytes_synthetic"].value > metrics["avg_image_bytes_real"].value
    assert metrics["noise_sigma_synthetic"].value == pytest.approx(0.1, rel=0.3)
    assert metrics["noise_sigma_real"].value == pytest.approx(0.0, abs=1e-3)
    colour = np.repeat(noisy[..., None], 3, axis=2)
    assert encoded_size((colour * 255).astype(np.uint8), "ljpeg") > encoded_size((noisy * 255).astype(np.uint8),
                                                                                  "ljpeg")


# intensity-kl

def test_intensity_kl_is_zero_for_identical_sets_and_positive_for_a_shift(real: Dataset) -> None:
    ev = IntensityKLEvaluator(IntensityKLConfig(bins=32))
    same = by_name(ev.evaluate(real, real))
    assert same["kl_foreground"].value == 0.0 and same["kl_background"].value == 0.0
    assert same["kl_foreground"].direction == "lower"
    shifted = Dataset.from_samples([s.replace(image=np.clip(s.image + 0.2, 0, 1).astype(np.float32)) for s in real])
    moved = by_name(ev.evaluate(real, shifted))
    assert moved["kl_foreground"].value > 0.1 and moved["kl_background"].value > 0.1
    assert 0 < moved["kl_foreground"].details["js_divergence"] <= 1
    assert moved["kl_foreground"].details["pixels_real"] == sum(int((s.mask > 0).sum()) for s in real)
    smoothed = by_name(IntensityKLEvaluator(IntensityKLConfig(bins=32, smoothing=2.0)).evaluate(real, shifted))
    assert 0 < smoothed["kl_foreground"].value < moved["kl_foreground"].value


def test_intensity_kl_without_foreground_is_nan_with_a_note(real: Dataset) -> None:
    empty = Dataset.from_samples([s.replace(mask=np.zeros_like(s.mask)) for s in real])
    metric = by_name(IntensityKLEvaluator().evaluate(real, empty))["kl_foreground"]
    assert math.isnan(metric.value) and "synthetic" in metric.details["note"]


# psnr-ssim

@pytest.mark.parametrize("nested", [True, False])
def test_psnr_ssim_identical_images_are_capped_and_noise_lowers_them(real: Dataset, nested: bool) -> None:
    ev = PSNRSSIMEvaluator()
    same = by_name(ev.evaluate(real, conditioned_on(real, [s.image for s in real], nested)))
    assert same["ssim"].value == pytest.approx(1.0) and same["psnr"].value == 100.0
    assert same["psnr"].details["capped"] == len(real) and same["psnr"].details["pairs"] == len(real)
    rng = np.random.default_rng(0)
    noisy = [np.clip(s.image + rng.normal(0, 0.05, s.image.shape), 0, 1) for s in real]
    worse = by_name(ev.evaluate(real, conditioned_on(real, noisy, nested)))
    assert 20 < worse["psnr"].value < 40 and worse["psnr"].sd > 0 and worse["ssim"].value < 0.9
    assert worse["psnr"].direction == worse["ssim"].direction == "higher"


def test_psnr_ssim_skips_and_counts_unmatched_pairs(real: Dataset) -> None:
    matched = list(conditioned_on(real, [s.image for s in real]))[:3]
    unconditioned = [Sample(image=s.image, mask=s.mask) for s in real][:2]
    unknown = Sample(image=real[0].image, mask=real[0].mask, meta={"meta": {"condition": {"source": "nope"}}})
    warped = Sample(image=real[0].image, mask=real[0].mask,
                    meta={"condition": {"source": real[0].meta["stem"], "augmented": True}})
    metrics = by_name(PSNRSSIMEvaluator().evaluate(real, Dataset.from_samples([*matched, *unconditioned, unknown,
                                                                                warped])))
    assert metrics["ssim"].details["pairs"] == 3
    assert metrics["ssim"].details["skipped"] == {"no_source": 2, "unknown_source": 1, "augmented": 1}


def test_psnr_ssim_without_any_source_reports_nan_or_fails_when_asked(real: Dataset) -> None:
    unconditioned = Dataset.from_samples([Sample(image=s.image, mask=s.mask) for s in real])
    metrics = by_name(PSNRSSIMEvaluator().evaluate(real, unconditioned))
    assert math.isnan(metrics["psnr"].value) and math.isnan(metrics["ssim"].value)
    assert "no condition source" in metrics["psnr"].details["note"]
    with pytest.raises(ConfigError, match="psnr-ssim: no synthetic image"):
        PSNRSSIMEvaluator(PSNRSSIMConfig(require_pairs=True)).evaluate(real, unconditioned)


def test_psnr_ssim_finds_sources_in_a_run_manifest(tmp_path: Path, demo_dir: Path) -> None:
    from medsynth_core import build_pipeline, parse_pipeline, run_pipeline
    from medsynth_plugins import baseline

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(baseline, name="baseline")
    spec = parse_pipeline({"run": {"data": str(demo_dir), "n": 4, "seed": 0},
                           "mask_source": {"name": "real-pairs"}, "generator": {"name": "augment"}})
    run_pipeline(build_pipeline(spec, Registry(pm)), tmp_path / "run")
    synthetic = open_dataset(tmp_path / "run")
    assert synthetic[0].meta["meta"]["condition"]["source"].startswith("case_")
    metrics = by_name(PSNRSSIMEvaluator().evaluate(open_dataset(demo_dir), synthetic))
    assert metrics["ssim"].details["pairs"] == 4 and 0 < metrics["ssim"].value < 1
    assert 0 < metrics["psnr"].value < 100


# mask-agreement

def test_mask_agreement_is_high_on_real_pairs_and_low_on_shifted_masks(real: Dataset) -> None:
    ev = MaskAgreementEvaluator(MaskAgreementConfig(steps=60, size=32))
    shifted = Dataset.from_samples([s.replace(mask=np.roll(s.mask, 20, axis=1)) for s in real])
    metrics = by_name(ev.evaluate(real, shifted))
    fit, syn = metrics["dice_real"], metrics["dice_synthetic"]
    assert fit.value > 0.7 and syn.value < fit.value - 0.3
    assert metrics["iou_synthetic"].value <= syn.value and syn.direction == "higher" and fit.direction == "none"
    assert syn.details["pairs"] == len(real) and syn.sd is not None


def test_mask_agreement_unknown_encoder_is_one_line(real: Dataset) -> None:
    with pytest.raises(ConfigError, match="unknown encoder 'tu-nope'") as err:
        MaskAgreementEvaluator(MaskAgreementConfig(encoder="tu-nope", steps=1, size=32)).evaluate(real, real)
    assert "\n" not in str(err.value)
