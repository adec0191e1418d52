"""diffusegen: clustered image+mask DDPMs, RePaint inpainting and diffusion styling, on tiny models."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medsynth_plugins.diffusegen as diffusegen
from medsynth_cli.app import app
from medsynth_core import (
    CheckpointError,
    Condition,
    ConfigError,
    Context,
    Dataset,
    PipelineError,
    Registry,
    Sample,
    load_torch,
    make_plugin_manager,
    open_dataset,
    read_checkpoint_card,
    read_image,
    sample_seed,
)
from medsynth_plugins.common.features import INCEPTION_ENV
from medsynth_plugins.diffusegen.bundle import DiffusionBundle
from medsynth_plugins.diffusegen.clustering import Clusters, cluster_pairs
from medsynth_plugins.diffusegen.ddpm4 import DDPM4Config, DDPM4Generator
from medsynth_plugins.diffusegen.diffusion import jump_schedule
from medsynth_plugins.diffusegen.repaint import RePaintConfig, RePaintGenerator, dilate
from medsynth_plugins.diffusegen.style import DiffusionStyleConfig, DiffusionStyleRefiner
from medsynth_plugins.diffusegen.unet import build_unet

TINY = {"size": 16, "block_out_channels": (8, 16), "layers_per_block": 1, "attention_resolutions": (),
        "attention_head_dim": 8, "norm_num_groups": 4, "batch_size": 2, "inference_steps": 4}
TINY_FLAGS = ["--size", "16", "--block-out-channels", "8,16", "--layers-per-block", "1", "--attention-resolutions",
              "", "--attention-head-dim", "8", "--norm-num-groups", "4", "--batch-size", "2"]


def tiny_unet(planes: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_unet(size=16, planes=planes, learn_sigma=True, block_out_channels=(8, 16), layers_per_block=1,
                      attention_resolutions=(), attention_head_dim=8, norm_num_groups=4, resblock_updown=True,
                      dropout=0.0)


def tiny_bundle(channels: int = 1, stems=("a",)) -> DiffusionBundle:
    return DiffusionBundle.in_memory({0: tiny_unet(channels + 1)}, channels=channels,
                                     clusters=Clusters.single(list(stems)))


def rgb_pairs(n: int = 6, size: int = 24) -> Dataset:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        image = rng.uniform(0, 1, (size, size, 3)).astype(np.float32)
        mask = np.zeros((size, size), np.uint8)
        mask[4 + i % 4:14, 6:16] = 1
        samples.append(Sample(image=image, mask=mask, meta={"stem": f"p{i}"}))
    return Dataset.from_samples(samples)


def test_hook_registers_the_components() -> None:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(diffusegen, name="diffusegen")
    registry = Registry(pm)
    assert registry.get("generator", "ddpm4").cls is DDPM4Generator
    assert registry.get("generator", "repaint").cls is RePaintGenerator
    assert registry.get("refiner", "diffusion-style").cls is DiffusionStyleRefiner


def test_four_channel_model_trains_a_step_and_samples_pairs(tmp_path: Path) -> None:
    config = DDPM4Config(per_cluster=False, steps=1, **TINY)
    DDPM4Generator(config, name="ddpm4").fit(rgb_pairs(), tmp_path / "ck")
    card = read_checkpoint_card(tmp_path / "ck", expected="ddpm4")
    assert card["model"]["planes"] == 4 and card["step"] == 1 and card["complete"]
    from diffusers import UNet2DModel

    trained = UNet2DModel.from_pretrained(str(tmp_path / "ck" / "models" / "all"))
    assert trained.config.in_channels == 4 and trained.config.out_channels == 8  # learned variance doubles it
    torch.manual_seed(config.seed * 1009)  # the initial weights of model 0
    initial = build_unet(planes=4, learn_sigma=True, resblock_updown=True, dropout=0.0,
                         **{k: v for k, v in TINY.items() if k not in ("batch_size", "inference_steps")})
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), trained.parameters()))

    gen = DDPM4Generator(config, name="ddpm4")
    gen.load(tmp_path / "ck")
    seeds = [sample_seed(0, i) for i in range(3)]
    pairs = gen.generate([Condition()] * 3, seeds)
    for s in pairs:
        assert s.image.shape == (16, 16, 3) and s.image.dtype == np.float32
        assert s.soft_mask.shape == (16, 16) and 0 <= s.soft_mask.min() <= s.soft_mask.max() <= 1
        s.check("ddpm4")
    alone = gen.generate([Condition()], seeds[1:2])[0]
    assert np.abs(alone.image - pairs[1].image).max() < 1e-4  # sample i does not depend on its batch
    assert np.abs(pairs[0].image - pairs[1].image).max() > 1e-3


@pytest.mark.parametrize("scheduler", ["ddim", "dpm-solver++"])
def test_other_samplers_make_pairs(scheduler: str) -> None:
    gen = DDPM4Generator(DDPM4Config(scheduler=scheduler, **TINY), name="ddpm4")
    gen.use(tiny_bundle(channels=1))
    pairs = gen.generate([Condition(), Condition()], [3, 4])
    assert all(s.image.shape == (16, 16) and s.soft_mask.shape == (16, 16) for s in pairs)
    assert all(np.isfinite(s.image).all() for s in pairs)


def test_train_per_cluster_resume_info_and_run(demo_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ck = tmp_path / "ck"
    base = ["-q", "train", "ddpm4", "--data", str(demo_dir), "--out", str(ck), *TINY_FLAGS, "--clusters", "2",
            "--min-cluster-size", "4", "--features", "random-cnn"]
    result = runner.invoke(app, [*base, "--steps", "1"])
    assert result.exit_code == 0, result.output
    card = read_checkpoint_card(ck, expected="ddpm4")
    assert card["clustering"]["k"] == 2 and sum(card["clustering"]["sizes"]) == 12
    assert sorted(card["models"]) == ["cluster-00", "cluster-01"] and card["step"] == 2
    assert set(card["assignments"]) == {p.stem for p in (demo_dir / "images").iterdir()}

    resumed = runner.invoke(app, [*base, "--steps", "2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert read_checkpoint_card(ck)["step"] == 4
    assert json.loads((ck / "clusters.json").read_text())["assignments"] == card["assignments"]
    rows = (ck / "loss.csv").read_text().splitlines()
    assert rows[0] == "model,step,loss,mse,vb" and len(rows) == 5

    changed = runner.invoke(app, [*base, "--steps", "3", "--resume", "--size", "32"])
    assert changed.exit_code == 2 and "size" in changed.stderr

    info = runner.invoke(app, ["info", str(ck), "--json"])
    assert json.loads(info.stdout)["assignments"] == card["assignments"]

    run = runner.invoke(app, ["-q", "run", "--generator", "ddpm4", "--refiner", "threshold", "--evaluator",
                              "mask-stats", "--checkpoint", str(ck), "--data", str(demo_dir), "--out",
                              str(tmp_path / "run"), "-n", "2", "--set", "generator.inference_steps=3"])
    assert run.exit_code == 0, run.output
    records = [json.loads(line) for line in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["meta"]["cluster"] in (0, 1) for r in records)
    assert (tmp_path / "run" / "report.json").is_file()


def test_repaint_changes_only_the_dilated_lesion() -> None:
    rng = np.random.default_rng(1)
    image = rng.uniform(0.2, 0.8, (40, 40)).astype(np.float32)
    mask = np.zeros((40, 40), np.uint8)
    mask[15:23, 14:24] = 1
    gen = RePaintGenerator(RePaintConfig(dilation=64, inference_steps=10, skip_steps=0, jump_length=2,
                                         jump_n_sample=2), bundle=tiny_bundle(channels=1, stems=["case"]))
    region = dilate(mask, gen.dilation_px(mask.shape))
    assert gen.dilation_px(mask.shape) == 10 and region.sum() > mask.sum()
    condition = Condition(mask=mask, image=image, meta={"source": "case"})
    out = gen.generate([condition, condition], [7, 8])
    for s in out:
        s.check("repaint")
        assert np.array_equal(s.image[~region], image[~region])
        assert np.array_equal(s.soft_mask[~region], mask[~region].astype(np.float32))
        assert np.abs(s.image[region] - image[region]).mean() > 0.02
        assert s.meta["reference"] is image and s.meta["cluster"] == 0
    assert np.abs(out[0].image - out[1].image)[region].max() > 1e-3  # each seed inpaints differently
    again = gen.generate([condition], [8])[0]
    assert np.abs(again.image - out[1].image).max() < 1e-4


def test_jump_schedule_is_repaints() -> None:
    from diffusers import RePaintScheduler

    sched = RePaintScheduler()
    sched.set_timesteps(50, jump_length=10, jump_n_sample=5)
    assert [t * 20 for t in jump_schedule(50, 10, 5)] == sched.timesteps.tolist()
    assert max(jump_schedule(30, 10, 5)) == 29


def test_style_refiner_lowers_its_own_loss() -> None:
    size = 16
    yy, xx = np.mgrid[0:size, 0:size] / size
    target = (0.3 + 0.4 * xx).astype(np.float32)
    source = target.copy()
    source[5:11, 5:11] = 0.95  # an inpainted patch that does not match its surroundings
    mask = np.zeros((size, size), np.uint8)
    mask[6:10, 6:10] = 1
    sample = Sample(image=source, mask=mask, meta={"seed": 5, "cluster": 0, "reference": target})
    bundle = tiny_bundle(channels=1)
    guided = DiffusionStyleRefiner(DiffusionStyleConfig(inference_steps=20, skip_steps=10), bundle=bundle)
    plain = DiffusionStyleRefiner(DiffusionStyleConfig(inference_steps=20, skip_steps=10, **{
        f"lambda_{k}": 0.0 for k in ("zecon", "vgg", "mse", "sty", "l2", "sem", "rng")}), bundle=bundle)
    styled = guided.refine([sample])[0]
    unguided = plain.refine([sample])[0]
    styled.check("diffusion-style")
    assert "reference" not in styled.meta and np.array_equal(styled.mask, mask)
    sources, targets = guided.tensors([sample])

    def score(result: Sample) -> float:
        as_model = guided.tensors([result.replace(meta={"reference": target})])[0][:, :1]
        return float(guided.objective(0, as_model, sources, targets, [5])[0])

    assert score(styled) < score(unguided)


def test_clustering_separates_two_kinds_of_pairs() -> None:
    rng = np.random.default_rng(0)
    images, masks = [], []
    for i in range(12):
        dark = i % 2 == 0
        base = 0.15 if dark else 0.75
        images.append(np.clip(base + rng.normal(0, 0.05 if dark else 0.2, (32, 32)), 0, 1).astype(np.float32))
        mask = np.zeros((32, 32), np.uint8)
        r = 3 if dark else 12
        mask[16 - r:16 + r, 16 - r:16 + r] = 1
        masks.append(mask)
    stems = [f"s{i}" for i in range(12)]
    found = cluster_pairs(stems, images, masks, k=2, extractor="random-cnn")
    labels = [found.assignments[s] for s in stems]
    assert len(set(labels[0::2])) == 1 and len(set(labels[1::2])) == 1 and labels[0] != labels[1]
    assert found.predict([images[0], images[1]], [masks[0], masks[1]]) == [labels[0], labels[1]]


class _TinyInceptionLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.fc = torch.nn.Linear(8, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class _TinyInception(torch.nn.Module):
    """clean-fid's TorchScript interface (``layers`` maps 299 px input to N x 2048), at a fraction of the size."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _TinyInceptionLayers()

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((img - 128) / 128)


def test_clustering_uses_inception_when_weights_are_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    torch.manual_seed(0)
    weights = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_TinyInception()), str(weights))
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 1, (24, 24)).astype(np.float32) for _ in range(6)]
    masks = [(rng.uniform(0, 1, (24, 24)) > 0.7).astype(np.uint8) for _ in range(6)]
    stems = [f"s{i}" for i in range(6)]
    lines: list[str] = []
    found = cluster_pairs(stems, images, masks, k=2, weights=str(weights), log=lines.append)
    assert found.extractor == "inception" and found.weights == str(weights) and "InceptionV3" in lines[0]
    assert found.predict(images[:1], masks[:1]) == [found.assignments["s0"]]
    fallback = cluster_pairs(stems, images, masks, k=2, log=lines.append)
    assert fallback.extractor == "random-cnn" and "random CNN" in lines[1]


def test_bad_options_and_checkpoints_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="size"):
        DDPM4Config(size=30, block_out_channels=(8, 16, 32))
    with pytest.raises(ConfigError, match="norm_num_groups"):
        DDPM4Config(block_out_channels=(12, 24), norm_num_groups=8)
    with pytest.raises(ConfigError, match="model"):
        RePaintGenerator(RePaintConfig())
    with pytest.raises(CheckpointError, match="not a medsynth checkpoint"):
        RePaintGenerator(RePaintConfig(model=str(tmp_path)))
    (tmp_path / "checkpoint.json").write_text(json.dumps({"component": "augment"}))
    with pytest.raises(CheckpointError, match="augment"):
        DiffusionStyleRefiner(DiffusionStyleConfig(model=str(tmp_path)))
    refiner = DiffusionStyleRefiner(DiffusionStyleConfig(), bundle=tiny_bundle())
    with pytest.raises(PipelineError, match="reference"):
        refiner.refine([Sample(image=np.zeros((16, 16), np.float32), meta={"seed": 1})])


def test_repaint_then_style_run_writes_pairs(demo_dir: Path, tmp_path: Path) -> None:
    config = DDPM4Config(per_cluster=False, steps=1, **TINY)
    DDPM4Generator(config, name="ddpm4").fit(open_dataset(demo_dir), tmp_path / "ck")
    run = CliRunner().invoke(app, [
        "-q", "run", "--generator", "repaint", "--mask-source", "real-pairs", "--refiner", "diffusion-style",
        "--refiner", "threshold", "--data", str(demo_dir), "--out", str(tmp_path / "run"), "-n", "2",
        "--set", f"generator.model={tmp_path / 'ck'}", "--set", "generator.inference_steps=10",
        "--set", "generator.skip_steps=4", "--set", f"diffusion-style.model={tmp_path / 'ck'}",
        "--set", "diffusion-style.inference_steps=5", "--set", "diffusion-style.skip_steps=2"])
    assert run.exit_code == 0, run.output
    records = [json.loads(line) for line in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    assert [r["meta"]["condition"]["source"] for r in records] == ["case_0000", "case_0001"]
    assert all("reference" not in r["meta"] and "loss" in r["meta"]["style"] for r in records)
    assert read_image(tmp_path / "run" / "images" / "000000.png").shape == (64, 64)
    model = str(tmp_path / "ck")  # one pipeline's generator and refiner share one copy of the models
    assert RePaintGenerator(RePaintConfig(model=model)).bundle is DiffusionStyleRefiner(
        DiffusionStyleConfig(model=model)).bundle


def _toy_styling_sample() -> Sample:
    image = np.full((16, 16), 0.4, np.float32)
    image[4:10, 4:10] = 0.9
    mask = np.zeros((16, 16), np.uint8)
    mask[5:9, 5:9] = 1
    return Sample(image=image, mask=mask, meta={"seed": 2, "cluster": 0, "reference": np.full((16, 16), 0.4,
                                                                                               np.float32)})


def test_style_loads_a_local_vit_and_says_what_stands_in(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=224, patch_size=32), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    lines: list[str] = []
    refiner = DiffusionStyleRefiner(DiffusionStyleConfig(vit_weights=str(tmp_path / "vit"), inference_steps=4,
                                                         skip_steps=2), bundle=tiny_bundle(),
                                    context=Context(log=lines.append))
    out = refiner.refine([_toy_styling_sample()])[0]
    out.check("diffusion-style")
    assert refiner.vit is not None and len(lines) == 1 and "VGG" in lines[0] and "ViT" not in lines[0]
    with pytest.raises(ConfigError, match="vit_weights"):
        DiffusionStyleRefiner(DiffusionStyleConfig(vit_weights=str(tmp_path / "missing")), bundle=tiny_bundle())


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MEDSYNTH_VGG19_WEIGHTS"), reason="needs MEDSYNTH_VGG19_WEIGHTS "
                    "(torchvision's vgg19-dcbb9e9d.pth)")
def test_style_loads_local_vgg19_weights() -> None:
    refiner = DiffusionStyleRefiner(DiffusionStyleConfig(vgg_weights=os.environ["MEDSYNTH_VGG19_WEIGHTS"],
                                                         inference_steps=4, skip_steps=2), bundle=tiny_bundle())
    assert refiner.vgg is not None and len(refiner.vgg) == 6  # up to conv2_1
    refiner.refine([_toy_styling_sample()])[0].check("diffusion-style")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(INCEPTION_ENV), reason=f"needs {INCEPTION_ENV}")
def test_clustering_with_inception_weights(demo_dir: Path) -> None:
    pairs = list(open_dataset(demo_dir))
    found = cluster_pairs([s.meta["stem"] for s in pairs], [s.image for s in pairs], [s.mask for s in pairs], k=3)
    assert found.extractor == "inception" and sum(found.sizes()) == len(pairs)
    assert found.predict([pairs[0].image], [pairs[0].mask]) == [found.assignments[pairs[0].meta["stem"]]]


# ---- training through accelerate: two CPU processes (gloo), resume, gradient accumulation -----------------------
PARALLEL_FLAGS = ["--size", "32", "--block-out-channels", "8,16", "--layers-per-block", "1", "--attention-resolutions",
                  "", "--attention-head-dim", "8", "--norm-num-groups", "4", "--batch-size", "2", "--save-every", "1",
                  "--clusters", "2", "--min-cluster-size", "4", "--features", "random-cnn"]
MODELS = ("cluster-00", "cluster-01")


def _train_processes(demo: Path, out: Path, steps: int, *extra: str) -> None:
    """``medsynth train ddpm4`` as two processes under accelerate launch (gloo on the CPU)."""
    cmd = [sys.executable, "-m", "medsynth_cli", "-q", "train", "ddpm4", "--data", str(demo), "--out", str(out),
           "--processes", "2", "--device", "cpu", "--steps", str(steps), *PARALLEL_FLAGS, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def _weights(ck: Path, model: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(ck / "models" / model / "diffusion_pytorch_model.safetensors")


def _updates(ck: Path, model: str) -> int:
    """How many AdamW updates the model's saved optimiser state has seen."""
    return int(load_torch(ck / "models" / model / "train_state.pt")["optimizer"]["state"][0]["step"])


def _loss_rows(ck: Path) -> list[tuple[str, int]]:
    return [(r["model"], int(r["step"])) for r in csv.DictReader((ck / "loss.csv").open())]


@pytest.fixture(scope="module")
def two_process_ddpm4(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddpm4-parallel") / "ck"
    _train_processes(demo_dir, out, 2)
    return out


def test_two_processes_train_ddpm4_on_their_own_batches_and_the_checkpoint_samples(
        two_process_ddpm4: Path, demo_dir: Path, tmp_path: Path) -> None:
    ck = two_process_ddpm4
    card = read_checkpoint_card(ck, expected="ddpm4")
    assert card["complete"] and card["clustering"]["k"] == 2
    assert {name: m["step"] for name, m in card["models"].items()} == dict.fromkeys(MODELS, 2)
    assert card["step"] == 4  # the steps of both cluster models
    assert _loss_rows(ck) == [(m, s) for m in MODELS for s in (1, 2)]  # written once, by the main process
    assert all(_updates(ck, m) == 2 for m in MODELS)
    # one process draws the batches of rank 0 only; two average them with rank 1's, so the weights differ
    alone = CliRunner().invoke(app, ["-q", "train", "ddpm4", "--data", str(demo_dir), "--out", str(tmp_path / "one"),
                                     "--device", "cpu", "--steps", "2", *PARALLEL_FLAGS])
    assert alone.exit_code == 0, alone.output
    ours, single = _weights(ck, "cluster-00"), _weights(tmp_path / "one", "cluster-00")
    assert max(float((ours[k] - single[k]).abs().max()) for k in ours) > 1e-5

    gen = DDPM4Generator(DDPM4Config(inference_steps=4), name="ddpm4")
    gen.load(ck)
    pairs = gen.generate([Condition(), Condition()], [sample_seed(0, 0), sample_seed(0, 1)])
    for s in pairs:
        s.check("ddpm4")
        assert s.image.shape == (32, 32) and s.soft_mask.shape == (32, 32) and np.isfinite(s.image).all()


def test_two_process_resume_continues_from_the_saved_step(two_process_ddpm4: Path, demo_dir: Path,
                                                          tmp_path: Path) -> None:
    ck = Path(shutil.copytree(two_process_ddpm4, tmp_path / "ck"))
    before = _weights(ck, "cluster-01")
    _train_processes(demo_dir, ck, 3, "--resume")
    card = read_checkpoint_card(ck, expected="ddpm4")
    assert card["step"] == 6 and card["complete"]
    assert {name: m["step"] for name, m in card["models"].items()} == dict.fromkeys(MODELS, 3)
    # steps 1-2 of each model are not trained again: one more row each, one more optimiser update each
    assert _loss_rows(ck) == [*((m, s) for m in MODELS for s in (1, 2)), *((m, 3) for m in MODELS)]
    assert all(_updates(ck, m) == 3 for m in MODELS)
    after = _weights(ck, "cluster-01")
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_gradient_accumulation_averages_batches_and_resumes_exactly(demo_dir: Path, tmp_path: Path) -> None:
    def train(out: str, steps: int, accum: int, *extra: str) -> Path:
        result = CliRunner().invoke(app, ["-q", "train", "ddpm4", "--data", str(demo_dir), "--out", str(tmp_path / out),
                                          "--device", "cpu", "--steps", str(steps), "--per-cluster", "false",
                                          "--grad-accum", str(accum), *PARALLEL_FLAGS, *extra])
        assert result.exit_code == 0, result.output
        return tmp_path / out

    plain, accumulated = train("accum1", 2, 1), train("accum2", 2, 2)
    assert read_checkpoint_card(accumulated, expected="ddpm4")["step"] == 2
    assert _updates(accumulated, "all") == 2  # two steps of two batches each: two optimiser updates, not four
    torch.manual_seed(0)  # the initial weights of model 0 for seed 0 (seed * 1009 + index)
    initial = build_unet(size=32, planes=2, learn_sigma=True, block_out_channels=(8, 16), layers_per_block=1,
                         attention_resolutions=(), attention_head_dim=8, norm_num_groups=4, resblock_updown=True,
                         dropout=0.0).state_dict()
    ours, theirs = _weights(accumulated, "all"), _weights(plain, "all")
    assert any(not torch.equal(initial[k], ours[k]) for k in ours)
    # the second batch of each step counts: the updates differ from those of the first batch alone
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) > 1e-5
    stopped = train("stopped", 1, 2)
    train("stopped", 2, 2, "--resume")
    resumed = _weights(stopped, "all")
    assert all(torch.equal(resumed[k], ours[k]) for k in ours)  # bit for bit the uninterrupted training


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm-solver++"])
def test_every_sampler_keeps_an_untrained_model_in_range(scheduler: str) -> None:
    """An untrained model's x0 predictions stray far out of [-1, 1]; every sampler clips them, so the
    pairs stay pictures rather than saturated noise."""
    from medsynth_plugins.diffusegen.ddpm4 import sample_pairs

    torch.manual_seed(3)
    unet = build_unet(size=16, planes=2, learn_sigma=False, block_out_channels=(8, 16), layers_per_block=1,
                      attention_resolutions=(), attention_head_dim=8, norm_num_groups=4, resblock_updown=True,
                      dropout=0.0)
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(4)  # an exaggerated untrained network
    bundle = DiffusionBundle.in_memory({0: unet}, channels=1, clusters=Clusters.single(["a"]))
    pairs = sample_pairs(bundle, 0, [0, 1], scheduler, 10)
    assert torch.isfinite(pairs).all()
    assert float(pairs.abs().max()) <= 1.0 + 1e-5


def test_cluster_models_loaded_on_demand_are_tuned_by_the_run(demo_dir: Path, tmp_path: Path) -> None:
    """ddpm4 loads its cluster models lazily; [run] channels_last reaches them through Generator.tune."""
    from medsynth_core import Context
    from medsynth_core.roles import NETWORK_TUNER

    generator = DDPM4Generator(DDPM4Config(**TINY), context=Context())
    generator.use(tiny_bundle(channels=1))
    generator.context.extras[NETWORK_TUNER] = lambda net: net.to(memory_format=torch.channels_last)
    unet = generator.bundle.unet(0)
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
