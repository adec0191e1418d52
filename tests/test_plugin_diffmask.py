"""The diffmask plugin: cross-attention soft masks (eq. 2), their refiners, noise learning, end to end offline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from typer.testing import CliRunner

import medsynth_plugins.diffmask as diffmask
from medsynth_cli.app import app
from medsynth_core import (
    CheckpointError,
    Condition,
    ConfigError,
    Context,
    Sample,
    default_registry,
    open_dataset,
    read_checkpoint_card,
    write_checkpoint_card,
)
from medsynth_plugins.common.sd_base import SmallBaseRecipe, build_small_base, build_tokenizer, save_sd_base
from medsynth_plugins.diffmask.attention import (
    AttentionOptions,
    AttentionStore,
    record_attention,
    token_positions,
)
from medsynth_plugins.diffmask.evaluator import CHAINS, AttentionIoUConfig, refine_chain
from medsynth_plugins.diffmask.generator import SDAttentionConfig, SDAttentionGenerator
from medsynth_plugins.diffmask.noise_learning import NoiseLearningConfig, NoiseLearningFilter
from medsynth_plugins.diffmask.refiners import (
    AdaptiveThresholdConfig,
    AdaptiveThresholdRefiner,
    AffinityConfig,
    AffinityRefiner,
    CrossFusionRefiner,
    DenseCRFConfig,
    DenseCRFRefiner,
    adaptive_gamma,
    iou,
)
from medsynth_plugins.diffmask.sampling import sample_with_attention

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a chest x-ray with lung"
# a tiny offline training run whose attention already finds the lungs (measured IoU about 0.8 on CPU)
TINY_TRAIN = {"resolution": 32, "base_widths": (16, 32), "base_steps": 2, "grounding_steps": 24, "batch_size": 4,
              "checkpoint_every": 12, "sampling_steps": 4}
# measured: Otsu on the attention of the 12 demo images gave IoU 0.82-0.84 after this training (the full
# mask: 0.21); asserted with a wide margin
REAL_IOU_FLOOR = 0.55


@pytest.fixture(autouse=True, scope="module")
def registered() -> Iterator[None]:
    """The plugin in the default registry, as its entry point will put it there."""
    pm = default_registry().plugin_manager
    added = pm.get_plugin("diffmask") is None and not pm.is_registered(diffmask)
    if added:
        pm.register(diffmask, name="diffmask")
    try:
        yield
    finally:
        if added:
            pm.unregister(name="diffmask")


def tiny_unet(cross_dim: int = 32, heads: int = 2):
    """Cross-attention at two resolutions: 16 x 16 and 8 x 8 cells for a 16 px input."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=heads, norm_num_groups=8).eval()


def tiny_base(resolution: int = 32):
    base = build_small_base(SmallBaseRecipe(resolution=resolution, widths=(16, 32), text_width=32,
                                            template="a chest x-ray with {labels}", words=("lung",)))
    return base.freeze()


# --- the attention processor and eq. 2 -----------------------------------------------------------------


def test_token_positions_find_the_class_word() -> None:
    tok = build_tokenizer(["a chest x-ray with {labels}", "lung", "left"])
    pos = token_positions(tok, PROMPT, ["lung"])
    ids = tok(PROMPT).input_ids
    assert [tok.convert_ids_to_tokens(ids[p]) for p in pos] == ["lung</w>"]
    assert len(token_positions(tok, "a chest x-ray with pneumothorax", ["pneumothorax"])) > 1  # byte tokens
    with pytest.raises(ConfigError, match="'heart' does not occur"):
        token_positions(tok, PROMPT, ["heart"])


def test_processor_captures_maps_of_every_resolution_and_leaves_the_output_unchanged() -> None:
    unet = tiny_unet()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10, 10, 10])
    context = torch.randn(3, 8, 32)
    with torch.no_grad():
        plain = unet(x, t, context).sample
        store = AttentionStore([[1], [2, 3], [5]], (16, 16), calls=1)
        with record_attention(unet, store):
            recorded = unet(x, t, context).sample
    assert torch.allclose(plain, recorded, atol=1e-5)
    assert {hw: tuple(s.shape) for hw, s in store.sums.items()} == {(16, 16): (3, 2, 16, 16), (8, 8): (3, 2, 8, 8)}
    cross_layers = sum(name.endswith("attn2.processor") for name in unet.attn_processors)
    assert store.maps == cross_layers and store.step == 0
    soft = store.soft_masks((32, 32))
    assert soft.shape == (3, 32, 32) and float(soft.min()) >= 0 and float(soft.max()) <= 1
    assert all(type(p).__name__ != "TokenAttentionProcessor" for p in unet.attn_processors.values())  # restored


def test_places_and_resolutions_choose_the_layers() -> None:
    unet = tiny_unet()
    x, t, context = torch.randn(1, 1, 16, 16), torch.tensor([5]), torch.randn(1, 8, 32)
    only = AttentionStore([[1]], (16, 16), 1, AttentionOptions(places=("up",), resolutions=(8,)))
    with torch.no_grad(), record_attention(unet, only):
        unet(x, t, context)
    assert set(only.sums) == {(8, 8)} and only.maps == 2  # the two 8 x 8 layers of the first up block


def test_aggregation_of_hand_made_maps_is_eq_2() -> None:
    rng = np.random.default_rng(0)
    heads, keys, size = 2, 6, (8, 8)
    store = AttentionStore([[1], [4]], (4, 4), calls=2)
    layers = []
    for _ in range(2):
        store.next_step()
        for hw in ((4, 4), (2, 2)):
            # classifier-free guidance: [unconditional, conditional] x heads; only the conditional half counts
            logits = torch.from_numpy(rng.normal(size=(2 * 2 * heads, hw[0] * hw[1], keys))).float()
            probs = logits.softmax(-1)
            store.add(probs, heads, hw)
            layers.append((probs.reshape(4, heads, -1, keys)[2:], hw))
    expected = np.zeros((2, *size))
    for probs, hw in layers:  # eq. 2 by hand, map by map
        for k, token in enumerate((1, 4)):
            a = probs[k, :, :, token].mean(0).reshape(hw)
            a = a / a.max()
            up = F.interpolate(a[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            expected[k] += up.numpy() / len(layers)
    assert store.maps == 4
    assert np.allclose(store.token_maps(size)[:, 0].numpy(), expected, atol=1e-6)
    assert np.allclose(store.soft_masks(size).numpy(), expected, atol=1e-6)


def test_accumulator_size_does_not_grow_with_the_steps() -> None:
    base = tiny_base()
    sizes, maps = {}, {}
    for steps in (2, 6):
        _, soft, store = sample_with_attention(base, [PROMPT], [""], ["lung"], [7], 32, scheduler="ddim",
                                               steps=steps, guidance=2.0, options=AttentionOptions())
        sizes[steps], maps[steps] = store.nbytes(), store.maps
        assert soft.shape == (1, 32, 32)
    assert sizes[2] == sizes[6] > 0
    assert maps[6] == 3 * maps[2]


def test_step_window_reads_only_its_steps() -> None:
    base = tiny_base()
    counts = {}
    for window in ((0.0, 1.0), (0.5, 1.0), (0.0, 0.25)):
        _, _, store = sample_with_attention(base, [PROMPT], [""], ["lung"], [1], 32, scheduler="euler", steps=4,
                                            guidance=1.0, options=AttentionOptions(steps=window))
        counts[window] = store.maps
    per_step = counts[(0.0, 1.0)] // 4
    assert counts[(0.5, 1.0)] == 2 * per_step and counts[(0.0, 0.25)] == per_step


def test_latent_bases_sample_through_the_diffusers_pipeline() -> None:
    base = build_small_base(SmallBaseRecipe(resolution=32, widths=(16, 32), text_width=32, latent=True,
                                            vae_widths=(16, 32), latent_channels=4, words=("lung",))).freeze()
    images, soft, store = sample_with_attention(base, [PROMPT, PROMPT], ["", ""], ["lung"], [3, 4], 32,
                                                scheduler="dpm++", steps=2, guidance=2.0,
                                                options=AttentionOptions())
    assert images.shape == (2, 1, 32, 32) and soft.shape == (2, 32, 32)
    assert set(store.sums) == {(16, 16), (8, 8)}  # latents of 16 x 16 cells
    again, soft_again, _ = sample_with_attention(base, [PROMPT], [""], ["lung"], [4], 32, scheduler="dpm++",
                                                 steps=2, guidance=2.0, options=AttentionOptions())
    assert np.allclose(again[0], images[1], atol=1e-4) and np.allclose(soft_again[0], soft[1], atol=1e-4)


# --- the generator -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"resolution": 20}, {"base_widths": (16,)}, {"base_steps": 0},
                                 {"attention_steps": (0.5, 0.5)}, {"prompt_template": "no class"},
                                 {"grounding_steps": -1}, {"prompt_bank_file": "/nonexistent/bank.txt"},
                                 {"attention_places": ()}])
def test_bad_generator_options_are_one_line_config_errors(bad: dict) -> None:
    with pytest.raises(ConfigError) as err:
        SDAttentionConfig(**bad)
    assert "\n" not in str(err.value) and next(iter(bad)) in str(err.value)


def test_checkpoint_must_be_one_of_ours(tmp_path: Path) -> None:
    gen = SDAttentionGenerator(name="sd-attention")
    with pytest.raises(CheckpointError, match="not a medsynth checkpoint"):
        gen.load(tmp_path)
    other = SDAttentionGenerator(name="controlnet")
    write_checkpoint_card(tmp_path, other, 1)
    with pytest.raises(CheckpointError, match="not of 'sd-attention'"):
        gen.load(tmp_path)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random small base written as a diffusers folder: what `base = <folder>` points to."""
    return save_sd_base(tiny_base(), tmp_path_factory.mktemp("base") / "tiny-sd")


def test_a_given_base_is_used_as_is_and_prompts_come_from_the_bank(base_folder: Path, demo_dir: Path,
                                                                     tmp_path: Path) -> None:
    gen = SDAttentionGenerator(SDAttentionConfig(base=str(base_folder), sampling_steps=2), name="sd-attention")
    out = gen.fit(open_dataset(demo_dir), tmp_path / "ck")
    card = read_checkpoint_card(out, expected="sd-attention")
    assert card["base"] == str(base_folder) and not (out / "grounded").exists()
    bank = ("a frontal chest x-ray with lung", "an x-ray of a lung", "a chest x-ray with lung")
    gen = SDAttentionGenerator(SDAttentionConfig(prompt_bank=bank, sampling_steps=2), name="sd-attention")
    gen.load(out)
    seeds = [11, 12, 13, 14]
    samples = gen.generate([Condition()] * 4, seeds)
    for s in samples:
        s.check("test")
        assert s.image.shape == (32, 32) and s.soft_mask.shape == (32, 32) and s.mask is None
        assert s.meta["prompt"] in bank
    alone = gen.generate([Condition()], [13])[0]  # sample 3 alone: the same pair as in the batch
    assert np.allclose(alone.image, samples[2].image, atol=1e-4)
    assert np.allclose(alone.soft_mask, samples[2].soft_mask, atol=1e-4)
    bad = SDAttentionGenerator(SDAttentionConfig(prompt_bank=("an x-ray of the chest",)), name="sd-attention")
    with pytest.raises(ConfigError, match="does not occur in prompt"):
        bad.load(out)


# --- refiners on synthetic soft masks with known truth --------------------------------------------------


def synthetic_case(seed: int, size: int = 64) -> tuple[Sample, np.ndarray]:
    """Two dark 'lungs' in a noisy image; the soft mask is the truth blurred, scaled down and noised, so that
    a fixed 0.5 threshold keeps only the lungs' cores."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    cy = 0.5 + rng.uniform(-0.05, 0.05)
    truth = ((((yy - cy) / 0.3) ** 2 + ((xx - 0.3) / 0.13) ** 2 <= 1)
             | (((yy - cy) / 0.28) ** 2 + ((xx - 0.7) / 0.12) ** 2 <= 1))
    image = np.where(truth, 0.3, 0.65) + ndimage.gaussian_filter(rng.normal(0, 0.05, (size, size)), 1)
    soft = 0.55 * ndimage.gaussian_filter(truth.astype(float), size / 12) + 0.05
    soft = soft + ndimage.gaussian_filter(rng.normal(0, 0.15, (size, size)), 2)
    sample = Sample(image=np.clip(image, 0, 1).astype(np.float32), soft_mask=np.clip(soft, 0, 1).astype(np.float32),
                    meta={"seed": 1000 + seed})
    return sample, truth


@pytest.fixture(scope="module")
def cases() -> list[tuple[Sample, np.ndarray]]:
    return [synthetic_case(seed) for seed in range(3)]


def mean_iou(samples: list[Sample], truths: list[np.ndarray]) -> float:
    return float(np.mean([iou(s.mask > 0, t) for s, t in zip(samples, truths)]))


@pytest.mark.parametrize("refiner", [AdaptiveThresholdRefiner(), DenseCRFRefiner(),
                                     DenseCRFRefiner(DenseCRFConfig(unary="soft")), AffinityRefiner(),
                                     CrossFusionRefiner()], ids=lambda r: f"{type(r).__name__}")
def test_each_refiner_beats_a_fixed_threshold(refiner, cases) -> None:
    samples, truths = [s for s, _ in cases], [t for _, t in cases]
    fixed = float(np.mean([iou(s.soft_mask > 0.5, t) for s, t in cases]))
    refined = refiner.refine(samples)
    assert all(r.mask.dtype == np.uint8 and set(np.unique(r.mask)) <= {0, 1} for r in refined)
    assert mean_iou(refined, truths) > fixed + 0.3, (mean_iou(refined, truths), fixed)
    assert all(s.mask is None for s in samples)  # inputs untouched


def test_adaptive_threshold_picks_the_gamma_that_matches_the_reference() -> None:
    soft = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    reference = soft > 0.42
    gamma, match = adaptive_gamma(soft, reference, (0.2, 0.4, 0.6))
    assert gamma == 0.4 and match == pytest.approx(iou(soft > 0.4, reference))
    flat = Sample(image=np.full((16, 16), 0.5, np.float32), soft_mask=np.full((16, 16), 0.3, np.float32))
    out = AdaptiveThresholdRefiner().refine([flat])[0]
    assert out.meta["threshold_source"] == "otsu" and out.mask.sum() == 0  # no affinity map: Otsu's fallback


def test_affinity_refinement_is_per_sample_seeded(cases) -> None:
    samples = [s for s, _ in cases]
    refiner = AffinityRefiner(AffinityConfig(affinity_steps=20))
    together = refiner.refine(samples)
    alone = refiner.refine([samples[1]])[0]
    assert np.array_equal(alone.mask, together[1].mask) and np.allclose(alone.soft_mask, together[1].soft_mask)


def test_method_2_is_affinity_then_crf(cases) -> None:
    samples, truths = [s for s, _ in cases], [t for _, t in cases]
    after = DenseCRFRefiner().refine(AffinityRefiner().refine(samples))
    assert mean_iou(after, truths) > 0.8
    fused = CrossFusionRefiner().refine(samples[:1])[0]
    assert fused.meta["fusion_stream"] in ("crf-then-affinity", "affinity-then-crf")
    assert len(fused.meta["fusion_scores"]) == 2


@pytest.mark.parametrize("config, bad", [(AffinityConfig, {"fg": 0.2, "bg": 0.4}), (AffinityConfig, {"radius": 0}),
                                         (DenseCRFConfig, {"confidence": 1.0}), (DenseCRFConfig, {"unary": "x"}),
                                         (AdaptiveThresholdConfig, {"gammas": (1.5,)}),
                                         (NoiseLearningConfig, {"keep": 0.0}),
                                         (AttentionIoUConfig, {"chains": ("x",)})])
def test_bad_refiner_and_filter_options_are_one_line_config_errors(config, bad: dict) -> None:
    from medsynth_core import build_config

    with pytest.raises(ConfigError) as err:
        build_config(config, bad, "test")
    assert "\n" not in str(err.value)


# --- noise learning --------------------------------------------------------------------------------------


def test_noise_learning_keeps_the_requested_fraction_ranked_by_loss(demo_dir: Path) -> None:
    pairs = list(open_dataset(demo_dir))
    noisy = [s.replace(mask=np.roll(s.mask, s.mask.shape[1] // 3, axis=1)) for s in pairs[:4]]
    candidates = [*noisy, *pairs[4:]]
    flt = NoiseLearningFilter(NoiseLearningConfig(keep=0.5, steps=30, size=32), name="noise-learning")
    verdicts = flt.judge(candidates)
    kept = [v for v in verdicts if v.keep]
    assert len(kept) == math.ceil(0.5 * len(candidates))
    assert max(v.score for v in kept) <= min(v.score for v in verdicts if not v.keep)
    assert not any(v.keep for v in verdicts[:4])  # the shifted masks rank last
    assert NoiseLearningFilter.scope == "set"


# --- offline, end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    """The small base trained offline on the demo set, then grounded (a few seconds of CPU)."""
    out = tmp_path_factory.mktemp("train") / "sd-attention"
    gen = SDAttentionGenerator(SDAttentionConfig(**TINY_TRAIN), name="sd-attention")
    return gen.fit(open_dataset(demo_dir), out)


def test_training_writes_a_resumable_checkpoint(trained: Path, demo_dir: Path) -> None:
    card = read_checkpoint_card(trained, expected="sd-attention")
    assert card["base"] == "grounded" and card["resolution"] == 32 and card["labels"] == {"background": 0, "lung": 1}
    rows = (trained / "loss.csv").read_text().splitlines()
    assert rows[0] == "stage,step,loss" and any(r.startswith("grounding,") for r in rows)
    before = (trained / "grounded" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    gen = SDAttentionGenerator(SDAttentionConfig(**TINY_TRAIN), name="sd-attention")
    gen.fit(open_dataset(demo_dir), trained)  # finished: nothing to redo
    assert (trained / "grounded" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="was trained with base_widths"):
        SDAttentionGenerator(SDAttentionConfig(**{**TINY_TRAIN, "base_widths": (16, 16)}),
                             name="sd-attention").fit(open_dataset(demo_dir), trained)


def test_attention_of_real_images_finds_the_lungs(trained: Path, demo_dir: Path) -> None:
    gen = SDAttentionGenerator(SDAttentionConfig(**TINY_TRAIN), name="sd-attention")
    gen.load(trained)
    pairs = list(open_dataset(demo_dir))
    soft = gen.real_attention([s.image for s in pairs], (50, 200), list(range(len(pairs))))
    assert all(m.shape == s.mask.shape for m, s in zip(soft, pairs))
    masks = refine_chain("otsu", [Sample(image=s.image, soft_mask=m) for s, m in zip(pairs, soft)])
    score = np.mean([iou(m, s.mask > 0) for m, s in zip(masks, pairs)])
    full = np.mean([iou(np.ones_like(s.mask, bool), s.mask > 0) for s in pairs])
    assert score > REAL_IOU_FLOOR and score > full + 0.3, (score, full)


def test_method2_pipeline_runs_offline_with_a_report(trained: Path, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", str(ROOT / "examples" / "diffmask" / "method2.toml"), "--data", str(demo_dir), "--out", str(out),
        "-n", "4", "--device", "cpu", "--checkpoint", str(trained), "--set", f"attention-iou.checkpoint={trained}",
        "--set", "generator.sampling_steps=3", "--set", "affinity.affinity_steps=20",
        "--set", "noise-learning.steps=5", "--set", "noise-learning.size=32",
        "--set", "noise-learning.keep=0.5"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 4 and sum(r["kept"] for r in records) == 2
    assert all("noise-learning" in r["scores"] for r in records)
    assert [p["name"] for p in records[0]["provenance"]] == ["sd-attention", "affinity", "densecrf"]
    kept = next(r for r in records if r["kept"])
    assert (out / kept["mask"]).is_file() and (out / "report.md").is_file()
    report = json.loads((out / "report.json").read_text())
    assert "attention-iou/method2" in json.dumps(report) and "mask-stats" in json.dumps(report)


def test_attention_iou_evaluator_scores_every_chain(trained: Path, demo_dir: Path) -> None:
    registry = default_registry()
    evaluator = registry.create("evaluator", "attention-iou", {"checkpoint": str(trained), "max_images": 4,
                                                               "chains": ["fixed", "otsu", "method2"]},
                                context=Context())
    real = open_dataset(demo_dir)
    metrics = {m.name: m for m in evaluator.evaluate(real, real)}
    assert set(metrics) == {"attention-iou/full-mask", "attention-iou/fixed", "attention-iou/otsu",
                            "attention-iou/method2"}
    assert metrics["attention-iou/otsu"].value > metrics["attention-iou/full-mask"].value
    assert registry.create("evaluator", "attention-iou").unavailable()
    assert set(CHAINS) >= {"adaptive-threshold", "affinity", "densecrf", "method1", "method2"}


def test_two_processes_train_sd_attention_with_grounding(demo_dir: Path, tmp_path: Path) -> None:
    """`medsynth train sd-attention --processes 2`: the small base, then grounding, data parallel on the CPU."""
    out = tmp_path / "ck"
    command = [sys.executable, "-m", "medsynth_cli", "-q", "train", "sd-attention", "--data", str(demo_dir), "--out",
               str(out), "--processes", "2", "--device", "cpu", "--resolution", "32", "--base-widths", "16,32",
               "--base-steps", "2", "--grounding-steps", "2", "--batch-size", "2", "--checkpoint-every", "1"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    card = read_checkpoint_card(out, expected="sd-attention")
    assert card["step"] == 4 and card["base"] == "grounded" and card["resolution"] == 32  # 2 base + 2 grounding
    rows = [tuple(r.split(",")[:2]) for r in (out / "loss.csv").read_text().splitlines()[1:]]
    assert rows == [("base", "1"), ("base", "2"), ("grounding", "1"), ("grounding", "2")]  # logged once
    assert not (out / "base-train").exists() and not (out / "grounding-train").exists()
    gen = SDAttentionGenerator(SDAttentionConfig(sampling_steps=2), context=Context(device="cpu"),
                               name="sd-attention")
    gen.load(out)
    samples = gen.generate([Condition()] * 2, [1, 2])
    for s in samples:
        s.check("test")
        assert s.image.shape == (32, 32) and s.soft_mask.shape == (32, 32) and np.isfinite(s.soft_mask).all()
