"""Fidelity and variety evaluators: fid, kid, inception-score, mm-fid and mm-std.

Tiny recipes (a few training steps at 32 px) keep this fast; a TorchScript stand-in with the
interface of clean-fid's Inception file checks agreement with clean-fid's own code path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsynth_core import (
    ConfigError,
    Dataset,
    Registry,
    make_plugin_manager,
    open_dataset,
    write_png_image,
    write_png_mask,
)
from medsynth_core.config import build_config
from medsynth_plugins import evaluation
from medsynth_plugins.common.features import INCEPTION_ENV, INCEPTION_FILE
from medsynth_plugins.evaluation.fidelity import (
    FIDConfig,
    FIDEvaluator,
    InceptionScoreConfig,
    InceptionScoreEvaluator,
    KIDConfig,
    KIDEvaluator,
    inception_scores,
)
from medsynth_plugins.evaluation.fidelity_features import (
    Training,
    auto_scales,
    auto_size,
    build_extractor,
    shuffled_pixels,
)
from medsynth_plugins.evaluation.multiscale import MMFIDConfig, MMFIDEvaluator, MMSTDConfig, MMSTDEvaluator, normalise

TINY = {"steps": 8, "seed": 0}


@pytest.fixture(scope="module")
def real(demo_dir: Path) -> Dataset:
    return open_dataset(demo_dir)


def _variant(real: Dataset, change, name: str) -> Dataset:
    """The real pairs with their images changed by ``change(image, rng)``, in memory."""
    samples = []
    for i, s in enumerate(real):
        image = np.clip(change(s.image, np.random.default_rng(i)), 0, 1).astype(np.float32)
        samples.append(s.replace(image=image))
    return Dataset.from_samples(samples, labels=real.labels, name=name)


@pytest.fixture(scope="module")
def sets(real: Dataset) -> dict[str, Dataset]:
    return {
        "same": _variant(real, lambda im, rng: im, "same"),
        "light": _variant(real, lambda im, rng: im + rng.normal(0, 0.01, im.shape), "light"),
        "shifted": _variant(real, lambda im, rng: im + 0.3, "shifted"),
        "noised": _variant(real, lambda im, rng: im + rng.normal(0, 0.15, im.shape), "noised"),
    }


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INCEPTION_ENV, raising=False)


# --- a stand-in for clean-fid's inception-2015-12-05.pt ----------------------------------------------


class _TinyLayers(nn.Module):
    def __init__(self, live: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 7, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(128, 2048)
        with torch.no_grad():  # clean-fid insists on 2048 features; constant ones keep sqrtm cheap
            self.fc.weight[live:] = 0
            self.fc.bias[live:] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.tanh(self.conv(x))), 1))


class _TinyInception(nn.Module):
    """Same interface as clean-fid's file: ``layers`` maps normalised 299 px input to N x 2048."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _TinyLayers()
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128)
        if return_features:
            return features
        return (self.output(features) * 20).softmax(1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.jit.save(torch.jit.script(_TinyInception()), str(path))
    return path


@pytest.fixture(scope="module")
def shifted_dir(real: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real pairs brightened and noised, written as PNGs (clean-fid reads folders)."""
    root = tmp_path_factory.mktemp("shifted")
    for i, s in enumerate(real):
        rng = np.random.default_rng(i)
        write_png_image(root / "images" / f"s{i:03d}.png", np.clip(s.image + 0.2 + rng.normal(0, 0.05, s.image.shape),
                                                                   0, 1).astype(np.float32))
        write_png_mask(root / "masks" / f"s{i:03d}.png", s.mask)
    return root


# --- registration and options ------------------------------------------------------------------------


def test_evaluation_registers_the_fidelity_components() -> None:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(evaluation, name="evaluation")
    registry = Registry(pm)
    for name, cls in (("fid", FIDEvaluator), ("kid", KIDEvaluator), ("inception-score", InceptionScoreEvaluator),
                      ("mm-fid", MMFIDEvaluator), ("mm-std", MMSTDEvaluator)):
        assert registry.get("evaluator", name).cls is cls


@pytest.mark.parametrize(("cls", "values", "words"), [
    (FIDConfig, {"extractor": "vgg"}, "extractor"),
    (FIDConfig, {"extractor": "labels:"}, "extractor"),
    (FIDConfig, {"size": 30}, "size"),
    (FIDConfig, {"steps": 0}, "steps"),
    (KIDConfig, {"subset_size": 1}, "subset_size"),
    (MMFIDConfig, {"scales": (16,)}, "scales"),
    (MMFIDConfig, {"extractors": ("segmenter", "segmenter")}, "repeat"),
    (MMSTDConfig, {"extractors": ("imagenet",)}, "extractors"),
    (InceptionScoreConfig, {"splits": 0}, "splits"),
])
def test_bad_options_give_one_line(cls, values, words) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(cls, values, "[evaluator] x")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_sizes_and_scales_follow_the_images() -> None:
    assert auto_size([np.zeros((64, 64))]) == 64
    assert auto_size([np.zeros((110, 90))]) == 112
    assert auto_size([np.zeros((2000, 2000))]) == 256
    assert auto_scales(64) == (32, 64, 128, 256)
    assert auto_scales(512) == (128, 256, 512, 1024)  # the paper's 2^7..2^10
    assert normalise(-1e-9, 5.0) == 0.0 and normalise(2.0, 4.0) == 0.5 and normalise(9.0, 4.0) == 1.0


def test_shuffled_reference_keeps_the_histogram() -> None:
    image = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    (shuffled,) = shuffled_pixels([image], seed=0)
    assert np.array_equal(np.sort(shuffled.ravel()), np.sort(image.ravel())) and not np.array_equal(shuffled, image)


# --- inception weights are local only ----------------------------------------------------------------


@pytest.mark.parametrize("evaluator", [
    FIDEvaluator(), KIDEvaluator(), InceptionScoreEvaluator(),
    MMFIDEvaluator(MMFIDConfig(extractors=("inception",))), MMSTDEvaluator(MMSTDConfig(extractors=("inception",))),
])
def test_missing_inception_weights_say_how_to_give_them(evaluator, no_weights, real, sets) -> None:
    reason = evaluator.unavailable()
    assert reason and "\n" not in reason and "'weights'" in reason and INCEPTION_ENV in reason
    with pytest.raises(ConfigError, match=INCEPTION_ENV):
        evaluator.evaluate(real, sets["same"])


def test_trained_extractors_need_no_weights(no_weights) -> None:
    assert FIDEvaluator(FIDConfig(extractor="segmenter")).unavailable() is None
    assert MMFIDEvaluator().unavailable() is None  # inception joins the default grid only when present


# --- FID and KID on trained extractors ---------------------------------------------------------------


@pytest.mark.parametrize("extractor", ["segmenter", "discriminator"])
def test_fid_is_zero_for_identical_sets_and_grows_with_damage(extractor, real, sets) -> None:
    evaluator = FIDEvaluator(FIDConfig(extractor=extractor, size=32, **TINY))
    fid = {name: evaluator.evaluate(real, s)[0] for name, s in sets.items()}
    assert fid["same"].name == f"fid[{extractor}]" and fid["same"].direction == "lower"
    assert fid["same"].details["extractor"] == extractor and fid["same"].details["input_size"] == 32
    assert abs(fid["same"].value) < 1e-3 * fid["shifted"].value
    assert fid["noised"].value > fid["light"].value
    assert fid["shifted"].value > fid["light"].value


def test_fid_is_seeded(real, sets) -> None:
    once = FIDEvaluator(FIDConfig(extractor="discriminator", size=32, **TINY)).evaluate(real, sets["noised"])[0]
    again = FIDEvaluator(FIDConfig(extractor="discriminator", size=32, **TINY)).evaluate(real, sets["noised"])[0]
    assert once.value == pytest.approx(again.value, rel=1e-6)


def test_kid_is_about_zero_for_identical_sets(real, sets) -> None:
    evaluator = KIDEvaluator(KIDConfig(extractor="segmenter", size=32, **TINY))
    same, shifted = (evaluator.evaluate(real, sets[k])[0] for k in ("same", "shifted"))
    assert same.name == "kid[segmenter]" and same.direction == "lower"
    assert abs(same.value) < 1e-2 * shifted.value
    assert same.details["subsets"] == 1 and same.sd == 0.0  # both sets whole: every subset is the same
    sub = KIDEvaluator(KIDConfig(extractor="segmenter", size=32, subsets=20, subset_size=6, **TINY))
    spread = sub.evaluate(real, sets["shifted"])[0]
    assert spread.details["subsets"] == 20 and spread.details["subset_size"] == 6 and spread.sd > 0


def test_label_column_extractor(demo_copy: Path, sets) -> None:
    stems = sorted(p.stem for p in (demo_copy / "images").glob("*.png"))
    rows = [f"{stem}.png,{'left' if k % 2 else 'right'}" for k, stem in enumerate(stems)]
    (demo_copy / "labels.csv").write_text("image,side\n" + "\n".join(rows) + "\n")
    real = open_dataset(demo_copy)
    metric = FIDEvaluator(FIDConfig(extractor="labels:side", size=32, **TINY)).evaluate(real, sets["shifted"])[0]
    assert metric.name == "fid[labels:side]" and metric.value > 0
    assert "left, right" in metric.details["task"]
    with pytest.raises(ConfigError, match="columns: side"):
        FIDEvaluator(FIDConfig(extractor="labels:sex", size=32, **TINY)).evaluate(real, sets["shifted"])


# --- MM-FID and MM-STD -------------------------------------------------------------------------------


def test_mm_fid_is_normalised_and_ranks_sets(real, sets, no_weights) -> None:
    evaluator = MMFIDEvaluator(MMFIDConfig(scales=(32, 64), train_size=32, **TINY))
    same, shifted = (evaluator.evaluate(real, sets[k])[0] for k in ("same", "shifted"))
    for metric in (same, shifted):
        assert metric.name == "mm-fid" and 0.0 <= metric.value <= 1.0 and metric.sd is not None
        assert metric.details["extractors"] == ["segmenter", "discriminator"]
        assert "inception" in metric.details["skipped"]
        assert len(metric.details["cells"]) == 4
        assert all(0 <= c["normalised"] <= 1 and c["reference_fid"] > 0 for c in metric.details["cells"])
    assert same.value < shifted.value


def test_mm_fid_default_scales_follow_the_image_size(real, sets, no_weights) -> None:
    metric = MMFIDEvaluator(MMFIDConfig(extractors=("discriminator",), train_size=32, **TINY)).evaluate(
        real, sets["light"])[0]
    assert metric.details["scales"] == [32, 64, 128, 256]


def test_mm_std_of_copies_is_below_a_varied_set(real, sets, no_weights) -> None:
    copies = Dataset.from_samples([real[0]] * len(real), labels=real.labels, name="copies")
    evaluator = MMSTDEvaluator(MMSTDConfig(scales=(32, 64), train_size=32, **TINY))
    low, high = evaluator.evaluate(real, copies), evaluator.evaluate(real, sets["light"])
    by_name = [{m.name: m for m in metrics} for metrics in (low, high)]
    assert by_name[0]["mm-std"].value < by_name[1]["mm-std"].value
    assert by_name[0]["mm-std_ratio"].value < by_name[1]["mm-std_ratio"].value
    assert by_name[1]["mm-std_real"].value > 0 and by_name[1]["mm-std"].direction == "none"
    assert len(by_name[1]["mm-std"].details["cells"]) == 4


# --- agreement with clean-fid's own code path --------------------------------------------------------


def test_fid_and_kid_match_clean_fid(tiny_weights, demo_dir, shifted_dir, real, monkeypatch) -> None:
    """Same weights, same two PNG folders: our numbers equal clean-fid's to 1e-3 relative."""
    import cleanfid.fid
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(tiny_weights.parent), download=False)
    cpu = torch.device("cpu")
    expected_fid = cleanfid.fid.compute_fid(str(demo_dir / "images"), str(shifted_dir / "images"), mode="clean",
                                            custom_feat_extractor=model, device=cpu, num_workers=0, batch_size=5,
                                            verbose=False)
    # compute_kid has no custom-extractor argument: hand its own builder the same model
    monkeypatch.setattr(cleanfid.fid, "build_feature_extractor", lambda mode, device, use_dataparallel=True: model)
    expected_kid = cleanfid.fid.compute_kid(str(demo_dir / "images"), str(shifted_dir / "images"), mode="clean",
                                            device=cpu, num_workers=0, batch_size=5, verbose=False)
    synthetic = open_dataset(shifted_dir)
    fid = FIDEvaluator(FIDConfig(weights=tiny_weights)).evaluate(real, synthetic)[0]
    kid = KIDEvaluator(KIDConfig(weights=tiny_weights)).evaluate(real, synthetic)[0]
    assert fid.name == "fid[inception]" and fid.details["input_size"] == 299 and fid.details["feature_dim"] == 2048
    assert expected_fid > 0 and expected_kid > 0
    assert fid.value == pytest.approx(expected_fid, rel=1e-3)
    assert kid.value == pytest.approx(expected_kid, rel=1e-3)


def test_inception_score_with_local_weights(tiny_weights, real, sets) -> None:
    copies = Dataset.from_samples([real[0]] * 6, name="copies")
    evaluator = InceptionScoreEvaluator(InceptionScoreConfig(weights=tiny_weights, splits=2))
    assert evaluator.unavailable() is None
    score, score_real = evaluator.evaluate(real, copies)
    assert score.name == "inception-score" and score.direction == "higher" and score_real.direction == "none"
    assert score.value == pytest.approx(1.0, abs=1e-6) and score.details["splits"] == 2
    assert 1.0 <= score_real.value <= 1008


def test_inception_scores_formula() -> None:
    sure = np.eye(4)  # four confident, different predictions: IS = number of classes
    assert inception_scores(sure, 1) == pytest.approx([4.0])
    assert inception_scores(np.full((6, 4), 0.25), 3) == pytest.approx([1.0, 1.0, 1.0])


def test_mm_fid_takes_inception_when_weights_are_there(tiny_weights, demo_copy, monkeypatch) -> None:
    (demo_copy / "labels.csv").write_text("stem,sex\ncase_0000,f\ncase_0001,m\n")
    monkeypatch.setenv(INCEPTION_ENV, str(tiny_weights))
    specs, skipped = MMFIDEvaluator()._plan(open_dataset(demo_copy))
    assert specs == ["inception", "segmenter", "discriminator", "labels:sex"] and skipped == {}


def test_inception_reads_scaled_views(tiny_weights, real) -> None:
    """In the grid, inception sees each scale as a view resized to 299 px (FIDs on it are tested above)."""
    images = [s.image for s in real][:4]
    extractor = build_extractor("inception", real, images, images, Training(32, 1, 0), weights=tiny_weights)
    small, native = extractor.encode(images, 32), extractor.encode(images, None)
    assert small.shape == native.shape == (4, 2048) and not np.allclose(small, native)
    assert extractor.input(32) == "299 x 299 px, clean-fid 'clean' resize of a 32 x 32 px view"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(INCEPTION_ENV), reason=f"needs {INCEPTION_ENV}")
def test_fid_matches_clean_fid_with_real_weights(demo_dir, shifted_dir, real) -> None:
    import cleanfid.fid
    from cleanfid.inception_torchscript import InceptionV3W

    path = Path(os.environ[INCEPTION_ENV])
    folder = path if path.is_dir() else path.parent
    expected = cleanfid.fid.compute_fid(str(demo_dir / "images"), str(shifted_dir / "images"), mode="clean",
                                        custom_feat_extractor=InceptionV3W(str(folder), download=False),
                                        device=torch.device("cpu"), num_workers=0, verbose=False)
    fid = FIDEvaluator(FIDConfig()).evaluate(real, open_dataset(shifted_dir))[0]
    assert fid.value == pytest.approx(expected, rel=1e-3)
