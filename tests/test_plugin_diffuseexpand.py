"""DiffuseExpand: training of Stages I-II, two-phase guided sampling, the Dice filter, examples."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from typer.testing import CliRunner

import medsynth_plugins.diffuseexpand as plugin
from medsynth_cli.app import app
from medsynth_core import (
    CheckpointError,
    Condition,
    ConfigError,
    Registry,
    Sample,
    build_pipeline,
    default_registry,
    load_torch,
    make_plugin_manager,
    open_dataset,
    parse_pipeline,
    read_checkpoint_card,
    sample_seed,
)
from medsynth_plugins.common.segmenter import dice_score
from medsynth_plugins.diffuseexpand.dice_filter import DiceFilter, DiceFilterConfig
from medsynth_plugins.diffuseexpand.generator import DiffuseExpandConfig, DiffuseExpandGenerator
from medsynth_plugins.diffuseexpand.masks import DiffuseExpandMasksConfig, DiffuseExpandMaskSource
from medsynth_plugins.diffuseexpand.networks import (
    NoisySegmenter,
    adapt_pretrained,
    build_denoiser,
    decode_masks,
    encode_masks,
)
from medsynth_plugins.diffuseexpand.sampling import log_likelihood
from medsynth_plugins.diffuseexpand.store import Bundle
from medsynth_plugins.diffuseexpand.training import Trainer, training_set

# diffusers' DPM-Solver builds its sigmas through a torch -> numpy path that numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "diffuseexpand"
TINY = {"size": 32, "block-channels": "8,16", "segmenter-channels": "8,16", "batch-size": 4,
        "train-timesteps": 50, "save-every": 1}
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def train(demo: Path, out: Path, steps: int, *extra: object, **changes: object):
    options = {**TINY, **{k.replace("_", "-"): v for k, v in changes.items()}}
    flags = [x for key, value in options.items() for x in (f"--{key}", value)]
    return invoke("-q", "train", "diffuseexpand", "--data", demo, "--out", out, "--device", "cpu",
                  "--steps", steps, *flags, *extra)


@pytest.fixture(scope="module")
def checkpoint(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diffuseexpand") / "ck"
    result = train(demo_dir, out, 2)
    assert result.exit_code == 0, result.output
    return out


def tiny_bundle(segmenter: torch.nn.Module | None = None, timesteps: int = 50) -> Bundle:
    torch.manual_seed(0)
    denoiser = build_denoiser(1, 32, (8, 16), 1, False).eval()
    segmenter = segmenter or NoisySegmenter(in_channels=1, classes=2, block_channels=(8, 16), sample_size=32).eval()
    return Bundle(denoiser, segmenter, dict(DDPMScheduler(num_train_timesteps=timesteps).config), [0, 1], 1, 32)


def generator(bundle: Bundle, **options) -> DiffuseExpandGenerator:
    gen = DiffuseExpandGenerator(DiffuseExpandConfig(**options), name="diffuseexpand")
    gen.bundle = bundle
    return gen


def half_mask(size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 2] = 1
    return mask


def test_hooks_register_the_four_stages() -> None:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="diffuseexpand")
    registry = Registry(pm)
    assert registry.get("generator", "diffuseexpand").cls is DiffuseExpandGenerator
    assert registry.get("mask_source", "diffuseexpand-masks").cls is DiffuseExpandMaskSource
    assert registry.get("filter", "dice-filter").cls is DiceFilter


def test_masks_encode_to_values_and_back() -> None:
    index = torch.tensor([[[0, 1], [2, 1]]])
    values = encode_masks(index, classes=3, channels=3)
    assert values.shape == (1, 3, 2, 2) and set(values.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(decode_masks(values + 0.2, classes=3), index)
    assert torch.equal(decode_masks(encode_masks(index.clamp(max=1), 2, 1) * 0.1, 2), index.clamp(max=1))


def test_one_training_step_changes_both_networks(demo_dir: Path) -> None:
    data = training_set(open_dataset(demo_dir), 32)
    assert data.images.min() >= -1 and data.images.max() <= 1 and set(data.masks.unique().tolist()) == {0, 1}
    bundle = tiny_bundle()
    trainer = Trainer(bundle.denoiser, bundle.segmenter, DDPMScheduler(num_train_timesteps=50), data, lr=1e-3,
                      batch_size=4, cond_drop=0.1, device="cpu", seed=0)
    parts = {"denoiser": bundle.denoiser, "segmenter": bundle.segmenter.unet, "type head": bundle.segmenter.head}
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in parts.items()}
    losses = trainer.step()
    assert all(np.isfinite([losses.diffusion, losses.segmentation, losses.type]))
    for name, module in parts.items():
        changed = any(not torch.equal(a, b) for a, b in zip(before[name], module.parameters()))
        assert changed, f"{name} did not change"


def test_train_checkpoints_and_resume_continues_the_count_as_if_never_stopped(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ck"
    assert train(demo_dir, out, 2).exit_code == 0
    assert read_checkpoint_card(out, expected="diffuseexpand")["step"] == 2
    resumed = train(demo_dir, out, 3, "--resume")
    assert resumed.exit_code == 0, resumed.output
    card = read_checkpoint_card(out)
    assert card["step"] == 3 and card["latest"] == "step-000003"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["step-000003"]
    with (out / "loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(float(r["diffusion"]) > 0 for r in rows)
    assert train(demo_dir, tmp_path / "straight", 3).exit_code == 0
    resumed_unet = UNet2DModel.from_pretrained(out / "step-000003" / "denoiser").state_dict()
    straight_unet = UNet2DModel.from_pretrained(tmp_path / "straight" / "step-000003" / "denoiser").state_dict()
    assert all(torch.allclose(resumed_unet[k], straight_unet[k], atol=1e-6) for k in straight_unet)
    changed = train(demo_dir, out, 4, "--resume", size=64)
    assert changed.exit_code == 2 and "size" in changed.stderr


def test_masks_from_noise_are_binary_and_seeded(checkpoint: Path) -> None:
    source = DiffuseExpandMaskSource(DiffuseExpandMasksConfig(checkpoint=str(checkpoint), solver_steps=4))
    seeds = [sample_seed(0, i) for i in range(3)]
    masks = [c.mask for c in source.conditions([0, 1, 2], seeds)]
    assert all(m.shape == (32, 32) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1} for m in masks)
    again = source.conditions([2], seeds[2:])[0].mask
    assert (again == masks[2]).mean() > 0.99  # the same seed gives the same mask whatever the batch


def test_images_have_the_mask_size_and_lie_in_0_1(checkpoint: Path, demo_dir: Path) -> None:
    gen = DiffuseExpandGenerator(DiffuseExpandConfig(solver_steps=4), name="diffuseexpand")
    gen.load(checkpoint)
    real = open_dataset(demo_dir)
    conditions = [Condition(mask=real[i].mask) for i in range(2)]
    for sampler, batch in (("dpm-solver++", 2), ("ddpm", 1)):  # ddpm: all 50 training timesteps of TINY
        gen.config = DiffuseExpandConfig(solver_steps=4, sampler=sampler)
        samples = gen.generate(conditions[:batch], [1, 2][:batch])
        for s in samples:
            assert s.image.shape == (64, 64) and s.image.dtype == np.float32
            assert s.image.min() >= 0.0 and s.image.max() <= 1.0 and s.image.std() > 0
            Sample(image=s.image, mask=conditions[0].mask).check("test")


def test_a_sample_does_not_depend_on_its_batch() -> None:
    gen = generator(tiny_bundle(), solver_steps=5, cfg_scale=2.0, tau=0.5)
    conditions = [Condition(mask=np.roll(half_mask(), k, axis=1)) for k in range(3)]
    batch = gen.generate(conditions, [7, 8, 9])
    alone = gen.generate(conditions[1:2], [8])[0]
    assert np.allclose(batch[1].image, alone.image, atol=1e-4)
    assert not np.allclose(batch[0].image, batch[1].image, atol=1e-2)


class BrightSegmenter(torch.nn.Module):
    """A hand-built segmenter: foreground where the input is bright, so its target is known."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 4.0 * x[:, :1], torch.zeros(x.shape[0])


def test_guidance_with_tau_one_third_moves_samples_toward_the_target() -> None:
    segmenter = BrightSegmenter()
    target = half_mask()
    conditions = [Condition(mask=target) for _ in range(4)]
    seeds = [sample_seed(3, i) for i in range(4)]

    def agreement(**options) -> float:
        images = generator(tiny_bundle(segmenter), solver_steps=10, **options).generate(conditions, seeds)
        logits, _ = segmenter(torch.from_numpy(np.stack([s.image for s in images]))[:, None] * 2 - 1, None)
        return float(np.mean([dice_score((lg[0] > 0).numpy(), target) for lg in logits]))

    unguided, tau_1, tau_3 = agreement(guidance="none"), agreement(tau=1.0), agreement(tau=1 / 3)
    assert tau_3 > tau_1 > unguided and tau_3 > unguided + 0.08, (unguided, tau_1, tau_3)


def test_tau_one_equals_scale_one_and_tau_differs_from_s() -> None:
    segmenter = NoisySegmenter(in_channels=1, classes=2, block_channels=(8, 16), sample_size=32).eval()
    x = torch.randn(2, 1, 32, 32)
    t = torch.tensor([10, 40])
    target = torch.from_numpy(half_mask()).long()[None].expand(2, -1, -1)

    def value(form: str, tau: float = 1.0, scale: float = 1.0) -> torch.Tensor:
        return log_likelihood(segmenter, x, t, is_image=True, target=target, classes=2, form=form, tau=tau,
                              scale=scale)

    assert torch.allclose(value("tau"), value("scale"))
    assert torch.allclose(value("scale", scale=3.0), 3 * value("scale"))
    assert not torch.allclose(value("tau", tau=1 / 3), value("scale", scale=3.0))


@pytest.fixture(scope="module")
def dice_filter(demo_dir: Path) -> DiceFilter:
    flt = DiceFilter(DiceFilterConfig(steps=60, size=32, eta=0.2, relabel_below=0.6))
    flt.fit(open_dataset(demo_dir))
    return flt


def test_filter_keeps_a_matching_pair_and_drops_a_shifted_one(demo_dir: Path, dice_filter: DiceFilter) -> None:
    real = open_dataset(demo_dir)[1]
    shifted = np.roll(real.mask, 24, axis=1)
    strict = DiceFilter(DiceFilterConfig(eta=0.2), name="dice-filter")
    strict.segmenter, strict.values = dice_filter.segmenter, dice_filter.values
    kept, dropped = strict.judge([real, real.replace(mask=shifted)])
    assert kept.keep and not dropped.keep and kept.score < 0.2 < dropped.score


def test_filter_relabels_between_the_two_bounds(demo_dir: Path, dice_filter: DiceFilter) -> None:
    real = open_dataset(demo_dir)[2]
    nudged = np.roll(real.mask, 4, axis=1)
    verdict = dice_filter.judge([real.replace(mask=nudged)])[0]
    assert verdict.keep and verdict.note == "relabelled" and 0.2 <= verdict.score < 0.6
    assert dice_score(verdict.sample.mask, real.mask) > dice_score(nudged, real.mask)
    assert verdict.sample.mask.dtype == np.uint8 and set(np.unique(verdict.sample.mask)) <= {0, 1}


def test_a_pretrained_unet_starts_stage_one_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                      norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"))
    rgb.save_pretrained(tmp_path / "rgb")
    grey = adapt_pretrained(UNet2DModel.from_pretrained(tmp_path / "rgb"), channels=1, size=16).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 500])
    with torch.no_grad():
        theirs = rgb.eval()(x.repeat(1, 3, 1, 1), t).sample.mean(1, keepdim=True)
        ours = grey(torch.cat([x, torch.randn_like(x)], 1), t, class_labels=torch.tensor([0, 1])).sample
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_bad_options_and_checkpoints_give_one_line_errors(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tau"):
        DiffuseExpandConfig(tau=0.0)
    with pytest.raises(ConfigError, match="relabel_below"):
        DiceFilterConfig(eta=0.2, relabel_below=0.1)
    with pytest.raises(ConfigError, match="checkpoint"):
        DiffuseExpandMasksConfig(checkpoint=str(tmp_path / "missing"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoint.json").write_text(json.dumps({"component": "augment"}))
    with pytest.raises(CheckpointError, match="augment"):
        DiffuseExpandGenerator(name="diffuseexpand").load(tmp_path / "other")
    with pytest.raises(CheckpointError, match="not found"):
        DiffuseExpandGenerator(name="diffuseexpand").load(tmp_path / "nowhere")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_pipelines_build(path: Path, checkpoint: Path) -> None:
    raw = tomllib.loads(path.read_text())
    raw["generator"]["checkpoint"] = str(checkpoint)
    raw["mask_source"]["checkpoint"] = str(checkpoint)
    pipeline = build_pipeline(parse_pipeline(raw, str(path)), default_registry())
    assert pipeline.generator.name == "diffuseexpand"


def test_train_then_run_makes_filtered_pairs_and_a_report(checkpoint: Path, demo_dir: Path, tmp_path: Path) -> None:
    result = invoke("-q", "run", EXAMPLES / "cf_cg_cs.toml", "--data", demo_dir, "--out", tmp_path / "run", "-n", 3,
                    "--device", "cpu", "--set", f"generator.checkpoint={checkpoint}",
                    "--set", f"mask_source.checkpoint={checkpoint}", "--set", "generator.solver_steps=3",
                    "--set", "mask_source.solver_steps=3", "--set", "dice-filter.steps=3",
                    "--set", "dice-filter.size=32", "--set", "dice-filter.eta=1.0",
                    "--set", "dice-filter.relabel_below=none")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    assert sum(r["kept"] for r in records) == 3 and all("dice-filter" in r["scores"] for r in records)
    assert (tmp_path / "run" / "report.md").is_file()


# ---- training through accelerate: two CPU processes (gloo), resume, gradient accumulation -----------------------
def train_processes(demo: Path, out: Path, steps: int, *extra: str) -> None:
    """``medsynth train diffuseexpand`` as two processes under accelerate launch (gloo on the CPU)."""
    flags = [str(x) for key, value in TINY.items() for x in (f"--{key}", value)]
    cmd = [sys.executable, "-m", "medsynth_cli", "-q", "train", "diffuseexpand", "--data", str(demo), "--out", str(out),
           "--processes", "2", "--device", "cpu", "--steps", str(steps), *flags, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def denoiser_weights(ck: Path) -> dict[str, torch.Tensor]:
    card = read_checkpoint_card(ck, expected="diffuseexpand")
    return UNet2DModel.from_pretrained(ck / card["latest"] / "denoiser").state_dict()


def updates(ck: Path) -> dict[str, int]:
    """How many Adam updates each network's saved optimiser state has seen."""
    state = load_torch(ck / read_checkpoint_card(ck)["latest"] / "training.pt")
    return {key: int(state[key]["state"][0]["step"]) for key in ("opt_denoiser", "opt_segmenter")}


def logged(ck: Path) -> list[dict[str, str]]:
    with (ck / "loss.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def two_process_checkpoint(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diffuseexpand-parallel") / "ck"
    train_processes(demo_dir, out, 2)
    return out


def test_two_processes_train_on_their_own_batches_and_the_checkpoint_samples(
        two_process_checkpoint: Path, demo_dir: Path, tmp_path: Path) -> None:
    ck = two_process_checkpoint
    card = read_checkpoint_card(ck, expected="diffuseexpand")
    assert card["step"] == 2 and card["latest"] == "step-000002"
    assert [int(r["step"]) for r in logged(ck)] == [1, 2]  # written once, by the main process
    assert updates(ck) == {"opt_denoiser": 2, "opt_segmenter": 2}
    # one process draws the batches of rank 0 only; two average them with rank 1's, so the weights differ
    assert train(demo_dir, tmp_path / "one", 2).exit_code == 0
    ours, single = denoiser_weights(ck), denoiser_weights(tmp_path / "one")
    assert max(float((ours[k] - single[k]).abs().max()) for k in ours) > 1e-5

    gen = DiffuseExpandGenerator(DiffuseExpandConfig(solver_steps=3), name="diffuseexpand")
    gen.load(ck)
    mask = open_dataset(demo_dir)[0].mask
    for s in gen.generate([Condition(mask=mask)] * 2, [1, 2]):
        Sample(image=s.image, mask=mask).check("diffuseexpand")
        assert s.image.shape == mask.shape and 0.0 <= s.image.min() <= s.image.max() <= 1.0
    source = DiffuseExpandMaskSource(DiffuseExpandMasksConfig(checkpoint=str(ck), solver_steps=3))
    masks = [c.mask for c in source.conditions([0, 1], [sample_seed(0, 0), sample_seed(0, 1)])]
    assert all(m.shape == (32, 32) and set(np.unique(m)) <= {0, 1} for m in masks)


def test_two_process_resume_continues_from_the_saved_step(two_process_checkpoint: Path, demo_dir: Path,
                                                          tmp_path: Path) -> None:
    ck = Path(shutil.copytree(two_process_checkpoint, tmp_path / "ck"))
    before_rows, before = logged(ck), denoiser_weights(ck)
    train_processes(demo_dir, ck, 3, "--resume")
    card = read_checkpoint_card(ck, expected="diffuseexpand")
    assert card["step"] == 3 and card["latest"] == "step-000003"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step-000003"]
    rows = logged(ck)
    assert rows[:2] == before_rows and [int(r["step"]) for r in rows] == [1, 2, 3]  # steps 1-2 are not redone
    assert updates(ck) == {"opt_denoiser": 3, "opt_segmenter": 3}
    after = denoiser_weights(ck)
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_gradient_accumulation_averages_batches_and_resumes_exactly(demo_dir: Path, tmp_path: Path) -> None:
    for name, steps, accum, extra in (("accum1", 2, 1, ()), ("accum2", 2, 2, ()), ("stopped", 1, 2, ()),
                                      ("stopped", 2, 2, ("--resume",))):
        result = train(demo_dir, tmp_path / name, steps, "--grad-accum", accum, *extra)
        assert result.exit_code == 0, result.output
    ck = tmp_path / "accum2"
    assert read_checkpoint_card(ck)["step"] == 2
    assert updates(ck) == {"opt_denoiser": 2, "opt_segmenter": 2}  # two steps of two batches: two updates each
    initial = tiny_bundle().denoiser.state_dict()  # the same seed and widths as a fresh training
    ours, plain = denoiser_weights(ck), denoiser_weights(tmp_path / "accum1")
    assert any(not torch.equal(initial[k], ours[k]) for k in ours)
    # the second batch of each step counts: the updates differ from those of the first batch alone
    assert max(float((ours[k] - plain[k]).abs().max()) for k in plain) > 1e-5
    resumed = denoiser_weights(tmp_path / "stopped")
    assert all(torch.equal(resumed[k], ours[k]) for k in ours)  # bit for bit the uninterrupted training
