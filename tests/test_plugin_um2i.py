"""UM2I plugin: unsupervised masks, their GAN, the multi-task generator, semi-supervision, montages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsynth_cli.app import app
from medsynth_core import (
    CheckpointError,
    Condition,
    ConfigError,
    Dataset,
    PipelineError,
    Registry,
    Sample,
    make_plugin_manager,
    open_dataset,
    read_checkpoint_card,
    read_image,
    read_mask,
)
from medsynth_plugins import um2i
from medsynth_plugins.um2i.editing import EditOptions, apply_edit, patch_mask
from medsynth_plugins.um2i.generator import STATE, UM2IConfig, UM2IGenerator
from medsynth_plugins.um2i.montage import choose_slices, main, make_montages
from medsynth_plugins.um2i.networks import (
    MultiTaskGenerator,
    NetArch,
    load_vgg,
    masked_segmentation_loss,
)
from medsynth_plugins.um2i.sources import SlicUMConfig, SlicUMSource, UMGeneratorConfig, UMGeneratorSource
from medsynth_plugins.um2i.stylegan import GanTraining, StyleArch, gan_step, new_gan_state, schedule
from medsynth_plugins.um2i.superpixels import (
    count_levels,
    mean_per_superpixel,
    superpixel_labels,
    unsupervised_mask,
)

TINY = dict(size=32, ngf=4, down=1, residual=1, ndf=4, d_layers=1, batch_size=2, supervised_steps=3, semi_steps=2,
            checkpoint_every=2, vum_steps=3, vum_latent=8, vum_mapping_layers=1, vum_channels=4,
            vum_max_channels=8, vum_batch_size=4, um_segments=64)


def stripes(values: tuple[int, ...] = (20, 80, 140, 220), size: int = 64) -> np.ndarray:
    """Vertical bands of known 0-255 intensities."""
    img = np.zeros((size, size), np.float32)
    width = size // len(values)
    for k, v in enumerate(values):
        img[:, k * width:(k + 1) * width] = v / 255
    return img


def weights(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    """A tiny UM2I checkpoint (with its UM GAN) trained with a quarter of the masks hidden."""
    out = tmp_path_factory.mktemp("um2i") / "ck"
    UM2IGenerator(UM2IConfig(**TINY, labelled_fraction=0.75), name="um2i").fit(open_dataset(demo_dir), out)
    return out


def test_plugin_registers_its_components() -> None:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(um2i, name="um2i")
    registry = Registry(pm)
    assert registry.get("mask_source", "slic-um").cls is um2i.SlicUMSource
    assert registry.get("mask_source", "um-generator").cls is um2i.UMGeneratorSource
    assert registry.get("generator", "um2i").cls is um2i.UM2IGenerator


# ------------------------------------------------------------------ unsupervised masks
def test_unsupervised_mask_gives_the_expected_levels_and_fewer_for_a_larger_gap() -> None:
    img = stripes()  # 20, 80, 140, 220 on the 0-255 scale
    levels = {t: count_levels(unsupervised_mask(img, segments=64, gap=t, compactness=0.1)) for t in (10, 50, 100, 150)}
    assert levels == {10: 4, 50: 4, 100: 3, 150: 2}  # int(v / t) * t: {20,80,140,220} {0,50,100,200} ...
    um = unsupervised_mask(img, segments=64, gap=50, compactness=0.1)
    assert um.dtype == np.float32 and um.shape == img.shape
    assert sorted(np.unique(np.round(um * 255)).tolist()) == [0, 50, 100, 200]


def test_felzenszwalb_superpixels_and_colour_images() -> None:
    img = stripes()
    assert count_levels(unsupervised_mask(img, gap=50, method="felzenszwalb")) == 4
    colour = np.stack([img, img[:, ::-1], np.full_like(img, 0.5)], axis=-1)
    um = unsupervised_mask(colour, segments=64, gap=50, compactness=0.1)
    assert um.shape == colour.shape and count_levels(um) > 1
    assert unsupervised_mask(colour, segments=64, gap=50, colour=False).ndim == 2


def test_mean_per_superpixel_matches_algorithm_1_loop() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((32, 32)).astype(np.float32)
    labels = superpixel_labels(img, segments=16)
    expected = img.astype(np.float64).copy()
    for m in np.unique(labels):  # lines 2-5 of Algorithm 1, as written
        expected[labels == m] = img[labels == m].mean()
    assert np.allclose(mean_per_superpixel(img, labels), expected, atol=1e-6)


def test_slic_um_source_puts_the_um_in_the_image_and_keeps_the_real_mask(demo_dir: Path) -> None:
    source = SlicUMSource(SlicUMConfig(segments=128, gap=50))
    dataset = open_dataset(demo_dir)
    source.fit(dataset)
    conds = source.conditions([0, 1, 12], [5, 6, 7])
    assert conds[0].image.shape == (64, 64) and conds[0].image.dtype == np.float32
    assert np.array_equal(conds[0].mask, dataset[0].mask)  # the real label, never the UM
    assert np.array_equal(conds[2].image, conds[0].image)  # cycles through the 12 real images
    assert conds[0].meta["gap"] == 50 and conds[0].meta["levels"] >= 2
    assert np.allclose(np.round(conds[0].image * 255) % 50, 0)


def test_edit_paints_a_patch_at_a_um_level() -> None:
    um = np.zeros((40, 40), np.float32)
    opts = EditOptions(edit_shape="disc", edit_size=0.2, edit_center=(0.5, 0.5), edit_intensity=0.7)
    edited, record = apply_edit(um, opts, gap=50, rng=np.random.default_rng(0))
    disc = patch_mask((40, 40), "disc", 0.2, (0.5, 0.5))
    assert np.all(edited[disc] == pytest.approx(150 / 255)) and np.all(edited[~disc] == 0)  # 0.7*255=178 -> 150
    assert record["pixels"] == int(disc.sum()) and um.max() == 0
    square = patch_mask((40, 40), "square", 0.1, (0.5, 0.5))
    ellipse = patch_mask((40, 40), "ellipse", 0.2, (0.5, 0.5), aspect=0.5)
    assert square.sum() < disc.sum() and 0 < ellipse.sum() < disc.sum()
    jittered = replace(opts, edit_jitter=0.2)
    a = apply_edit(um, jittered, 50, np.random.default_rng(1))[1]["center"]
    assert a == apply_edit(um, jittered, 50, np.random.default_rng(1))[1]["center"]
    assert a != apply_edit(um, jittered, 50, np.random.default_rng(2))[1]["center"]
    assert apply_edit(um, EditOptions(), 50, np.random.default_rng(0)) == (um, None)


@pytest.mark.parametrize(("cls", "options", "word"), [
    (SlicUMConfig, {"gap": 0}, "gap"), (SlicUMConfig, {"edit_size": 2.0}, "edit_size"),
    (UMGeneratorConfig, {"psi": -1}, "psi"), (UM2IConfig, {"size": 48}, "size"),
    (UM2IConfig, {"labelled_fraction": 0}, "labelled_fraction"), (UM2IConfig, {"down": 7}, "down")])
def test_bad_options_are_one_line_errors(cls: type, options: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word) as err:
        cls(**options)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ losses and networks
def test_segmentation_loss_ignores_unconfident_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    trusted = torch.zeros(2, 8, 8)
    trusted[:, :4] = 1  # only the top half is confident
    loss = masked_segmentation_loss(logits, target, trusted)
    loss.backward()
    assert logits.grad[..., 4:, :].abs().max() == 0 and logits.grad[..., :4, :].abs().max() > 0
    changed = logits.detach().clone()
    changed[..., 4:, :] = torch.randn(2, 3, 4, 8) * 10  # anything at untrusted pixels
    assert masked_segmentation_loss(changed, target, trusted) == pytest.approx(loss.item())
    assert masked_segmentation_loss(logits, target, torch.zeros(2, 8, 8)).item() == 0.0
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 20
    assert masked_segmentation_loss(perfect, target, trusted) < loss


def test_a_um2i_training_step_changes_every_network(demo_dir: Path, tmp_path: Path) -> None:
    gen = UM2IGenerator(UM2IConfig(**TINY))
    data = gen._training_data(open_dataset(demo_dir), tmp_path)
    nets = gen._networks(gen._arch(data), "cpu")
    before = {k: weights(nets[k]) for k in ("g", "d_image", "d_seg")}
    losses = gen._step(nets, None, data, {"step": 0, "pseudo": None}, "feature-matching")
    assert all(np.isfinite(v) for k, v in losses.items() if isinstance(v, float))
    for key, w in before.items():
        assert not torch.equal(w, weights(nets[key])), key


def test_pseudo_labelled_pixels_count_only_where_trusted(demo_dir: Path, tmp_path: Path) -> None:
    gen = UM2IGenerator(UM2IConfig(**{**TINY, "batch_size": 12}, labelled_fraction=0.5))
    data = gen._training_data(open_dataset(demo_dir), tmp_path)
    assert len(data.labelled) == 6 and len(data.unlabelled) == 6
    trusted = torch.zeros(6, 32, 32, dtype=torch.bool)
    trusted[:, :16] = True  # top half confident; flips are horizontal, so it stays on top
    pseudo = {"indices": data.unlabelled, "labels": torch.ones(6, 32, 32, dtype=torch.uint8), "trusted": trusted}
    batch = gen._batch(data, {"pseudo": pseudo}, torch.Generator().manual_seed(0))
    lab, weight = batch["labelled"], batch["weight"]
    assert lab.any() and (~lab).any()
    assert bool((weight[lab] == 1).all())
    assert bool((weight[~lab][:, :16] == 1).all()) and bool((weight[~lab][:, 16:] == 0).all())
    assert bool((batch["target"][~lab] == 1).all())


def test_a_um_gan_step_changes_generator_and_discriminator() -> None:
    arch = StyleArch(size=16, channels=1, latent=8, mapping_layers=1, base_channels=4, max_channels=8)
    settings = GanTraining(steps=10, batch_size=4, progressive=False)
    state = new_gan_state(arch, settings, "cpu")
    g, d = weights(state["g"]), weights(state["d"])
    losses = gan_step(state, torch.rand(6, 1, 16, 16) * 2 - 1, settings)
    assert np.isfinite(losses["d"]) and np.isfinite(losses["g"]) and state["step"] == 1
    assert not torch.equal(g, weights(state["g"])) and not torch.equal(d, weights(state["d"]))
    out = state["g"](torch.randn(2, 8))
    assert out.shape == (2, 1, 16, 16)
    assert state["g"](torch.randn(2, 8), level=1, alpha=0.5).shape == (2, 1, 8, 8)


def test_progressive_schedule_grows_and_fades_in() -> None:
    levels = [schedule(s, 100, 4, True) for s in range(100)]
    assert levels[0] == (1, 1.0) and levels[-1] == (4, 1.0)
    assert [lv for lv, _ in levels] == sorted(lv for lv, _ in levels)
    assert any(0 < a < 1 for _, a in levels) and schedule(0, 100, 4, False) == (4, 1.0)


def test_vgg_loss_loads_a_torchvision_state_dict(tmp_path: Path) -> None:
    import torchvision

    with torch.device("meta"):
        shapes = torchvision.models.vgg16(weights=None).features.state_dict()
    torch.manual_seed(0)
    torch.save({f"features.{k}": torch.randn(v.shape) * 0.05 for k, v in shapes.items()}, tmp_path / "vgg16.pth")
    vgg = load_vgg(tmp_path / "vgg16.pth")
    assert vgg.arch == "vgg16"
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    assert float(vgg(x, x)) == 0.0 and float(vgg(x, x.flip(-1))) > 0
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="vgg16"):
        load_vgg(tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_vgg(tmp_path / "missing.pth")


# ------------------------------------------------------------------ training, loading, generating
def test_training_hides_masks_pseudo_labels_and_writes_a_checkpoint(trained: Path) -> None:
    card = read_checkpoint_card(trained, expected="um2i")
    assert card["step"] == 5 and card["labelled"] == 9 and card["unlabelled"] == 3 and len(card["hidden_masks"]) == 3
    assert card["perceptual"] == "feature-matching"
    assert set(card["um_gan"]) >= {"ms_ssim_generated", "ms_ssim_real", "pixel_std_generated", "pixel_std_real"}
    assert json.loads((trained / "um-gan.json").read_text())["step"] == 3
    state = torch.load(trained / STATE, weights_only=False)
    assert len(state["pseudo"]["indices"]) == 3 and state["pseudo"]["trusted"].dtype == torch.bool
    log = (trained / "loss.csv").read_text().splitlines()
    assert log[0].startswith("step,stage") and len(log) == 6 and ",feature-matching," in log[1]
    assert [line.split(",")[1] for line in log[1:]] == ["1", "1", "1", "2", "2"]


def test_training_resumes_from_its_checkpoint(trained: Path, demo_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(trained, tmp_path / "ck"))
    more = UM2IGenerator(UM2IConfig(**{**TINY, "semi_steps": 4, "vum_steps": 4}, labelled_fraction=0.75), name="um2i")
    more.fit(open_dataset(demo_dir), folder)
    assert read_checkpoint_card(folder)["step"] == 7
    assert len((folder / "loss.csv").read_text().splitlines()) == 8  # 7 steps, none logged twice
    assert json.loads((folder / "um-gan.json").read_text())["step"] == 4
    other = UM2IGenerator(UM2IConfig(**{**TINY, "ngf": 8}, labelled_fraction=0.75), name="um2i")
    with pytest.raises(CheckpointError, match="same options"):
        other.fit(open_dataset(demo_dir), folder)
    fewer = UM2IGenerator(UM2IConfig(**TINY, labelled_fraction=0.5), name="um2i")
    with pytest.raises(CheckpointError, match="hidden masks"):
        fewer.fit(open_dataset(demo_dir), folder)


def test_generate_returns_image_and_mask_of_the_condition_size(trained: Path) -> None:
    gen = UM2IGenerator(UM2IConfig(), name="um2i")
    gen.load(trained)
    um = unsupervised_mask(stripes(size=48), segments=64)
    samples = gen.generate([Condition(image=um), Condition(image=np.zeros((40, 56), np.float32))], [1, 2])
    assert [s.image.shape for s in samples] == [(48, 48), (40, 56)]
    for s in samples:
        s.check("um2i")
        assert s.mask.dtype == np.uint8 and set(np.unique(s.mask)) <= {0, 1}
        assert s.soft_mask.shape == s.image.shape[:2]
    again = gen.generate([Condition(image=um)], [9])[0]
    assert np.array_equal(again.image, samples[0].image)  # the UM decides the pair, whatever the batch
    with pytest.raises(PipelineError, match="slic-um"):
        gen.generate([Condition(mask=np.zeros((8, 8), np.uint8))], [0])


def test_load_refuses_other_checkpoints(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="condition"):
        UM2IGenerator(UM2IConfig(condition="mask"), name="um2i").load(trained)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"component": "augment"}))
    with pytest.raises(CheckpointError, match="augment"):
        UM2IGenerator(UM2IConfig(), name="um2i").load(tmp_path)


def test_um_generator_draws_seeded_masks_on_the_um_levels(trained: Path) -> None:
    source = UMGeneratorSource(UMGeneratorConfig(checkpoint=trained, edit_shape="square", edit_intensity=1.0))
    conds = source.conditions([0, 1, 2], [11, 12, 13])
    alone = source.conditions([1], [12])[0]
    assert np.array_equal(alone.image, conds[1].image)  # a sample depends on its seed only
    assert conds[0].image.shape == (32, 32) and conds[0].mask is None
    assert np.allclose(np.round(conds[0].image * 255) % 50, 0)
    assert conds[0].meta["edit"]["level"] == pytest.approx(250 / 255, abs=1e-4)
    assert not np.array_equal(conds[0].image, conds[2].image)
    with pytest.raises(ConfigError, match="checkpoint"):
        UMGeneratorSource(UMGeneratorConfig())


def test_um_generator_needs_a_um_gan(demo_dir: Path, tmp_path: Path) -> None:
    UM2IGenerator(UM2IConfig(**{**TINY, "supervised_steps": 1, "semi_steps": 0, "vum_steps": 0}),
                  name="um2i").fit(open_dataset(demo_dir), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no UM GAN"):
        UMGeneratorSource(UMGeneratorConfig(checkpoint=tmp_path / "ck"))


def test_m2i_control_paints_images_for_real_masks(demo_dir: Path, tmp_path: Path) -> None:
    gen = UM2IGenerator(UM2IConfig(**{**TINY, "condition": "mask", "semi_steps": 0}), name="um2i")
    assert gen.requires == frozenset({"mask"})
    gen.fit(open_dataset(demo_dir), tmp_path / "ck")
    assert not (tmp_path / "ck" / "um-gan.pt").exists()
    gen.load(tmp_path / "ck")
    real = open_dataset(demo_dir)[0]
    sample = gen.generate([Condition(mask=real.mask)], [0])[0]
    assert np.array_equal(sample.mask, real.mask) and sample.image.shape == real.mask.shape


def test_semi_supervision_can_train_on_images_without_masks(demo_copy: Path, tmp_path: Path) -> None:
    for path in sorted((demo_copy / "masks").iterdir())[:6]:
        path.unlink()
    dataset = open_dataset(demo_copy, require_masks=False)
    gen = UM2IGenerator(UM2IConfig(**{**TINY, "vum_steps": 0}, confidence="discriminator",
                                   confidence_threshold=0.0), name="um2i")
    gen.fit(dataset, tmp_path / "ck")
    state = torch.load(tmp_path / "ck" / STATE, weights_only=False)
    assert len(state["pseudo"]["indices"]) == 6 and bool(state["pseudo"]["trusted"].all())
    with pytest.raises(ConfigError, match="no labelled"):
        gen.fit(Dataset.from_samples([Sample(image=np.zeros((32, 32), np.float32))]), tmp_path / "none")


def test_multitask_generator_shapes() -> None:
    net = MultiTaskGenerator(NetArch(in_channels=3, image_channels=3, classes=4, ngf=4, down=2, residual=1)).eval()
    image, logits = net(torch.zeros(2, 3, 32, 32))
    assert image.shape == (2, 3, 32, 32) and logits.shape == (2, 4, 32, 32) and image.abs().max() <= 1


def test_cli_train_then_run_v2um2i(demo_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "labelled_fraction": 0.75}.items()]
    result = runner.invoke(app, ["-q", "train", "um2i", "--data", str(demo_dir), "--out", str(tmp_path / "ck"),
                                 "--device", "cpu", *flags])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["-q", "run", "--generator", "um2i", "--mask-source", "um-generator",
                                 "--checkpoint", str(tmp_path / "ck"), "--set", f"mask_source.checkpoint={tmp_path}/ck",
                                 "--evaluator", "mask-stats", "--data", str(demo_dir), "--out", str(tmp_path / "run"),
                                 "-n", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "run" / "images").iterdir())) == 3 and (tmp_path / "run" / "report.json").is_file()
    mask = read_mask(tmp_path / "run" / "masks" / "000000.png")
    assert mask.shape == (32, 32)


# ------------------------------------------------------------------ training through accelerate
def _train(demo: Path, out: Path, *extra: str, **options: object) -> None:
    """`medsynth train um2i` in a fresh interpreter (CPU only, one thread per process)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "labelled_fraction": 0.75, **options}.items()]
    command = [sys.executable, "-m", "medsynth_cli", "-q", "train", "um2i", "--data", str(demo), "--out", str(out),
               "--device", "cpu", *flags, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _adam_steps(optimiser_state: dict) -> set[int]:
    """The optimiser steps Adam counted, over its parameters."""
    return {int(s["step"]) for s in optimiser_state["state"].values()}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    """A tiny checkpoint trained by two CPU processes (accelerate launch, gloo)."""
    out = tmp_path_factory.mktemp("um2i-ddp") / "ck"
    _train(demo_dir, out, "--processes", "2")
    return out


def test_two_processes_train_a_checkpoint_that_makes_pairs(two_processes: Path, demo_dir: Path) -> None:
    card = read_checkpoint_card(two_processes, expected="um2i")
    assert card["step"] == 5 and card["processes"] == 2 and card["um_gan"]["step"] == 3
    state = torch.load(two_processes / STATE, weights_only=False)
    assert _adam_steps(state["opt_g"]) == {5} and len(state["pseudo"]["indices"]) == 3
    log = (two_processes / "loss.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2", "3", "4", "5"]  # one row per step, main only
    assert len((two_processes / "um-gan-loss.csv").read_text().splitlines()) == 4
    source = SlicUMSource(SlicUMConfig(segments=64))
    source.fit(open_dataset(demo_dir))
    gen = UM2IGenerator(UM2IConfig(), name="um2i")
    gen.load(two_processes)
    samples = gen.generate(source.conditions([0, 1], [0, 1]), [0, 1])
    for s in samples:
        s.check("um2i")
        assert s.image.shape == (64, 64) and set(np.unique(s.mask)) <= {0, 1}
    masks = UMGeneratorSource(UMGeneratorConfig(checkpoint=two_processes)).conditions([0, 1], [3, 4])
    assert masks[0].image.shape == (32, 32) and not np.array_equal(masks[0].image, masks[1].image)


def test_two_processes_resume_from_the_saved_step(two_processes: Path, demo_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(two_processes, tmp_path / "ck"))
    before = torch.load(folder / STATE, weights_only=False)
    # mark the logged steps (last column -1): a run that started over would drop and rewrite them
    for name in ("loss.csv", "um-gan-loss.csv"):
        lines = (folder / name).read_text().splitlines()
        marked = [line.rsplit(",", 1)[0] + ",-1" for line in lines[1:]]
        (folder / name).write_text("\n".join([lines[0], *marked]) + "\n")
    _train(demo_dir, folder, "--processes", "2", "--resume", semi_steps=4, vum_steps=5)
    assert read_checkpoint_card(folder)["step"] == 7
    after = torch.load(folder / STATE, weights_only=False)
    assert _adam_steps(after["opt_g"]) == {7}  # the optimiser state went on from step 5
    assert not torch.equal(before["g"]["image_head.1.weight"], after["g"]["image_head.1.weight"])
    log = (folder / "loss.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2", "3", "4", "5", "6", "7"]
    assert all(line.endswith(",-1") for line in log[1:6]) and not log[6].endswith(",-1")
    gan_log = (folder / "um-gan-loss.csv").read_text().splitlines()
    assert len(gan_log) == 6 and gan_log[3].endswith(",-1") and not gan_log[4].endswith(",-1")
    assert json.loads((folder / "um-gan.json").read_text())["step"] == 5


def test_gradient_accumulation_in_one_process(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--grad-accum 2`: each of N steps is one optimiser update over 2 batches (2N batches in all)."""
    from medsynth_core import training
    from medsynth_plugins.um2i import generator as module

    drawn: list[tuple[int, int]] = []
    step_generator = training.step_generator

    def recording(seed: int, step: int, rank: int = 0, device: str = "cpu") -> torch.Generator:
        drawn.append((step, rank))
        return step_generator(seed, step, rank, device)

    monkeypatch.setattr(training, "step_generator", recording)
    monkeypatch.setattr(module, "step_generator", recording)
    runner = CliRunner()
    options = {**TINY, "supervised_steps": 4, "semi_steps": 0, "checkpoint_every": 4, "vum_steps": 4}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    result = runner.invoke(app, ["-q", "train", "um2i", "--data", str(demo_dir), "--out", str(tmp_path / "ck"),
                                 "--device", "cpu", "--grad-accum", "2", *flags])
    assert result.exit_code == 0, result.output
    assert read_checkpoint_card(tmp_path / "ck")["step"] == 4
    state = torch.load(tmp_path / "ck" / STATE, weights_only=False)
    gan = torch.load(tmp_path / "ck" / "um-gan.pt", weights_only=False)["training"]
    # micro-batch m of step s from step_generator(seed, s, m): the UM2I networks', then the UM GAN's
    assert drawn == [(s, m) for s in range(4) for m in range(2)] * 2
    assert _adam_steps(state["opt_g"]) == _adam_steps(state["opt_d"]) == {4}  # one update per step
    assert max(_adam_steps(gan["opt_g"])) == max(_adam_steps(gan["opt_d"])) == 4 and gan["step"] == 4
    assert len((tmp_path / "ck" / "loss.csv").read_text().splitlines()) == 5


def test_one_process_accumulating_two_batches_trains_what_two_processes_do(two_processes: Path, demo_dir: Path,
                                                                           tmp_path: Path) -> None:
    """`--grad-accum 2` in one process draws the batches of two processes and averages their gradients
    (and batch-norm statistics) the same way: the same networks, up to rounding."""
    from medsynth_core import Context
    from medsynth_core.training import EXTRAS_KEY, TrainingSettings

    context = Context(extras={EXTRAS_KEY: TrainingSettings(grad_accum=2)})
    UM2IGenerator(UM2IConfig(**TINY, labelled_fraction=0.75), name="um2i", context=context).fit(
        open_dataset(demo_dir), tmp_path / "ck")
    one, two = (torch.load(f / STATE, weights_only=False) for f in (tmp_path / "ck", two_processes))
    one_gan, two_gan = (torch.load(f / "um-gan.pt", weights_only=False)["training"]
                        for f in (tmp_path / "ck", two_processes))
    assert torch.equal(one["pseudo"]["trusted"], two["pseudo"]["trusted"])
    for a, b in ((one, two), (one_gan, two_gan)):
        for key in ("g", "d_image", "d_seg") if a is one else ("g", "d", "g_ema"):
            for name, tensor in a[key].items():
                assert torch.allclose(tensor.double(), b[key][name].double(), rtol=0, atol=1e-6), (key, name)
    assert _adam_steps(one["opt_g"]) == {5}


def test_a_resumed_run_trains_what_an_uninterrupted_one_does(demo_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after a checkpoint in each training, resumed twice: the same networks, bit for bit."""
    from medsynth_core import Context
    from medsynth_core.training import EXTRAS_KEY, TrainingSettings
    from medsynth_plugins.um2i import generator as module

    # 2 batches per step; saves after steps 2, 4 and 6 (stage 1 ends after 3); the UM GAN saves at 2 and 4
    options = {**TINY, "semi_steps": 3, "vum_steps": 4}

    def fit(out: Path) -> None:
        context = Context(extras={EXTRAS_KEY: TrainingSettings(grad_accum=2)})
        UM2IGenerator(UM2IConfig(**options), name="um2i", context=context).fit(open_dataset(demo_dir), out)

    fit(tmp_path / "whole")
    append = module._append_log

    class Killed(Exception):
        pass

    def dies_at(name: str, step: int):  # the process dies after logging this step, before saving
        def log(path: Path, fields: tuple, row: dict) -> None:
            append(path, fields, row)
            if path.name == name and row["step"] == step:
                raise Killed

        return log

    for name, step in (("loss.csv", 5), ("um-gan-loss.csv", 3)):
        monkeypatch.setattr(module, "_append_log", dies_at(name, step))
        with pytest.raises(Killed):
            fit(tmp_path / "killed")
    monkeypatch.setattr(module, "_append_log", append)
    fit(tmp_path / "killed")
    for file, keys in ((STATE, ("g", "d_image", "d_seg")), ("um-gan.pt", ("g_ema",))):
        whole, resumed = (torch.load(tmp_path / f / file, weights_only=False) for f in ("whole", "killed"))
        for key in keys:
            assert all(torch.equal(whole[key][k], resumed[key][k]) for k in whole[key]), (file, key)
    assert (tmp_path / "whole" / "loss.csv").read_text() == (tmp_path / "killed" / "loss.csv").read_text()


# ------------------------------------------------------------------ CT montages
def _write_volume(folder: Path, stem: str, depth: int, lung: range) -> None:
    import nibabel as nib

    # each slice's HU encodes its index, so the montage shows which slices were picked
    hu = np.broadcast_to(-1500 + np.arange(depth) * 50.0, (12, 12, depth)).astype(np.float32).copy()
    mask = np.zeros((12, 12, depth), np.uint8)
    mask[2:10, 2:10, lung.start:lung.stop] = 1
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(folder / "images" / f"{stem}.nii.gz"))
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(folder / "masks" / f"{stem}.nii.gz"))


def test_make_montages_tiles_four_slices_from_the_lung_range(tmp_path: Path) -> None:
    _write_volume(tmp_path / "vol", "a", depth=30, lung=range(6, 26))
    _write_volume(tmp_path / "vol", "b", depth=10, lung=range(4, 6))  # too few lung slices
    result = make_montages(tmp_path / "vol", tmp_path / "out", seed=3)
    assert result.written == ["a"] and "b" in result.skipped
    picked = result.slices["a"]
    assert all(6 <= k < 26 for k in picked) and picked == sorted(picked, reverse=True)  # superior first
    groups = np.array_split(np.arange(6, 26), 4)[::-1]
    assert all(k in g for k, g in zip(picked, groups))
    image = read_image(tmp_path / "out" / "images" / "a.png")
    assert image.shape == (24, 24)
    assert image[0, 0] == pytest.approx(min(1.0, picked[0] * 50 / 1600), abs=1 / 255)  # HU window -1500..100
    dataset = open_dataset(tmp_path / "out")
    assert dataset[0].mask.shape == (24, 24) and dataset[0].mask.max() == 1
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["montage"]["window"] == [-1500, 100]
    assert choose_slices(np.array([0, 0.2, 0.3, 0.2, 0.5, 0.0]), 0.1, 2, "middle", 0) == [4, 3, 2, 1]


def test_montage_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_volume(tmp_path / "vol", "a", depth=12, lung=range(0, 12))
    assert main([str(tmp_path / "vol"), str(tmp_path / "out"), "--tile-size", "16", "--pick", "middle",
                 "--label", "lung=1"]) == 0
    assert read_image(tmp_path / "out" / "images" / "a.png").shape == (32, 32)
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["labels"] == {"background": 0, "lung": 1}
    assert main([str(tmp_path / "vol"), str(tmp_path / "out")]) == 2  # not empty
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
