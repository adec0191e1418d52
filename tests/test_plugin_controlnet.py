"""The controlnet plugin and the shared SD base helpers, on tiny random models built in code."""

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

from medsynth_cli.app import app
from medsynth_core import (
    CheckpointError,
    Condition,
    ConfigError,
    Context,
    Dataset,
    Sample,
    default_registry,
    open_dataset,
    read_checkpoint_card,
    read_image,
    sample_seed,
)
from medsynth_plugins.common.sd_base import (
    SmallBaseRecipe,
    StepCheckpoints,
    build_small_base,
    build_tokenizer,
    denoise,
    label_words,
    load_sd_base,
    make_scheduler,
    mask_prompt,
    resolve_precision,
    sampling_dtype,
    save_sd_base,
    train_small_base,
)
from medsynth_plugins.controlnet import ControlNetGenerator
from medsynth_plugins.controlnet.conditions import PALETTE, colour_condition, condition_batch, grid, grid_tiles
from medsynth_plugins.controlnet.generator import ControlNetConfig
from medsynth_plugins.controlnet.sampling import ControlNetSampler, SamplingOptions
from medsynth_plugins.controlnet.training import ControlNetTrainer, embedding_channels

SIZE = 32
WORDS = ["a", "medical", "image", "with", "lung", "nodule", "and", "background"]
LABELS = {"background": 0, "lung": 1, "nodule": 2}
# the options of a training run small enough for a test
TINY = {"resolution": SIZE, "base-widths": "16,32", "base-steps": 3, "steps": 2, "batch-size": 2, "validate-every": 1,
        "validation-masks": 2, "sampling-steps": 2, "checkpoint-every": 1}
ZERO_CONVOLUTIONS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


def tiny(**changes: object) -> list[object]:
    """TINY (with ``changes``, underscores for dashes) as command-line options."""
    options = {**TINY, **{k.replace("_", "-"): v for k, v in changes.items()}}
    return [item for key, value in options.items() for item in (f"--{key}", value)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on shared cores OpenMP's spinning threads cost many times
    the work itself; restored for the tests that follow in the same worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- tiny components, as diffusers tests its pipelines -------------------------------------------------


def write_vocab(folder: Path) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary: byte tokens plus whole-word tokens for WORDS, and its merges."""
    from medsynth_plugins.common.sd_base import _byte_alphabet

    alphabet = _byte_alphabet()
    vocab = {t: i for i, t in enumerate([*alphabet, *(c + "</w>" for c in alphabet)])}
    merges: list[str] = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def tiny_components(tmp: Path, latent: bool = True) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = write_vocab(tmp / "vocab")
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, sample_size=SIZE) if latent else None
    channels = 4 if latent else 1
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2 if latent else SIZE, in_channels=channels, out_channels=channels,
        block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=(1, 2),
        norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stable-Diffusion-style folder written by diffusers' own StableDiffusionPipeline.save_pretrained."""
    from diffusers import StableDiffusionPipeline

    tmp = tmp_path_factory.mktemp("sd")
    pipe = StableDiffusionPipeline(**tiny_components(tmp), safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp / "tiny-sd")
    return tmp / "tiny-sd"


def pixel_base():
    from medsynth_plugins.common.sd_base import SDBase

    c = tiny_components(Path(__import__("tempfile").mkdtemp()), latent=False)
    return SDBase(c["unet"], c["text_encoder"], c["tokenizer"], c["scheduler"], None, source="test").freeze()


def controlnet_for(base):
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    return ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=embedding_channels(base.vae_factor))


def disc_mask(size: int = SIZE, centre: tuple[int, int] = (16, 16), radius: int = 8, value: int = 1) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius**2).astype(np.uint8) * np.uint8(value)


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- options, prompts, tokenizer and conditions --------------------------------------------------------


def test_plugin_registers_the_generator() -> None:
    info = default_registry().get("generator", "controlnet")
    assert info.cls is ControlNetGenerator and info.cls.trainable
    assert info.cls.requires == {"mask"} and info.cls.makes == frozenset()


@pytest.mark.parametrize("bad", [{"resolution": 20}, {"empty_prompt_rate": 1.5}, {"base_widths": (16,)},
                                 {"steps": 0}, {"lr": 0.0}, {"base": " "}, {"guidance_scale": -1.0}])
def test_bad_options_are_one_line_config_errors(bad: dict) -> None:
    with pytest.raises(ConfigError) as err:
        ControlNetConfig(**bad)
    assert "\n" not in str(err.value) and next(iter(bad)) in str(err.value)


def test_option_choices_match_the_shared_helpers() -> None:
    import typing

    from medsynth_plugins.common import sd_base
    from medsynth_plugins.controlnet import generator

    assert set(typing.get_args(typing.get_type_hints(ControlNetConfig)["scheduler"])) == set(sd_base.SCHEDULERS)
    assert (generator.SMALL, generator.DEFAULT_TEMPLATE) == (sd_base.SMALL, sd_base.DEFAULT_TEMPLATE)


def test_prompt_names_the_classes_in_the_mask() -> None:
    both = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    assert mask_prompt(both, LABELS, "a chest x-ray with {labels}") == "a chest x-ray with lung and nodule"
    assert label_words(np.zeros((2, 2), np.uint8), LABELS) == ["background"]
    assert label_words(None, LABELS) == ["lung", "nodule"]


def test_small_tokenizer_has_word_tokens_and_reads_any_text(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tok = build_tokenizer(["a chest x-ray with {labels}", "lung", "nodule"])
    ids = tok("a chest x-ray with lung nodule").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == ["a</w>", "chest</w>", "x</w>", "-</w>", "ray</w>", "with</w>",
                                                  "lung</w>", "nodule</w>"]
    unknown = tok("pneumothorax!").input_ids
    assert len(unknown) > 3 and tok.unk_token_id not in unknown[1:-1]  # byte fallback, never <unk>
    base = build_small_base(SmallBaseRecipe(resolution=SIZE, widths=(16, 32), text_width=32, words=("lung",)))
    save_sd_base(base, tmp_path / "base")
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tmp_path / "base" / "tokenizer").iterdir()}
    again = CLIPTokenizer.from_pretrained(tmp_path / "base" / "tokenizer")
    assert again("a medical image with lung").input_ids == base.tokenizer("a medical image with lung").input_ids


def test_masks_become_colour_coded_conditions() -> None:
    mask = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    cond = colour_condition(mask)
    assert cond.shape == (2, 2, 3) and cond.dtype == np.float32
    assert np.array_equal(cond[0, 0], [0, 0, 0]) and np.array_equal(cond[0, 1], [1, 1, 1])  # binary: white on black
    assert len({tuple(PALETTE[v]) for v in range(256)}) == 256  # every label value its own colour
    batch = condition_batch([disc_mask(64, (32, 32), 16, value=2)], SIZE)
    assert batch.shape == (1, 3, SIZE, SIZE)
    colours = {tuple(c) for c in batch[0].permute(1, 2, 0).reshape(-1, 3).tolist()}
    assert colours == {tuple(PALETTE[0].tolist()), tuple(PALETTE[2].tolist())}  # nearest resize: no blended colours


def test_grid_tiles_read_back_what_grid_laid_out() -> None:
    tiles = [[np.full((8, 8), v, np.float32) for v in (0.1, 0.5)] for _ in range(3)]
    sheet = grid(tiles)
    assert [float(t.mean()) for t in grid_tiles(sheet, 8, 1)] == pytest.approx([0.5] * 3)


# --- loading: the path users with SD 1.5 folders take -------------------------------------------------------


def test_from_pretrained_round_trips_a_saved_sd_folder(sd_folder: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    base = load_sd_base(sd_folder)
    original = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(base, name).state_dict(), getattr(original, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert base.latent and base.vae_factor == 2 and base.resolution == SIZE and base.image_channels == 3
    assert not any(p.requires_grad for m in base.modules().values() for p in m.parameters())
    # our writer makes a folder diffusers reads back as a Stable Diffusion pipeline
    save_sd_base(base, tmp_path / "copy")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "copy", safety_checker=None)
    assert torch.equal(again.unet.conv_in.weight, base.unet.conv_in.weight)


def test_bad_bases_are_one_line_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="base folder not found"):
        load_sd_base(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_sd_base(tmp_path / "empty")
    (tmp_path / "empty" / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(CheckpointError, match="text_encoder"):
        load_sd_base(tmp_path / "empty")


# --- training -----------------------------------------------------------------------------------------------


class _StopAfter:
    """A progress whose tasks raise KeyboardInterrupt after ``n`` steps in all: a kill mid-training."""

    def __init__(self, n: int) -> None:
        self.left = n

    def task(self, description: str, total: int | None = None):
        from contextlib import nullcontext

        outer = self

        class Task:
            def advance(self, n: int = 1) -> None:
                outer.left -= n
                if outer.left < 0:
                    raise KeyboardInterrupt

            def show(self, **fields) -> None:
                pass

        return nullcontext(Task())


def test_small_latent_base_trains_its_vae_first_and_resumes_after_a_kill(demo_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    recipe = SmallBaseRecipe(resolution=SIZE, latent=True, widths=(16, 32), vae_widths=(8, 16), text_width=32,
                             vae_steps=2, steps=2, batch_size=2, checkpoint_every=1, words=("lung",))
    data = open_dataset(demo_dir)
    with pytest.raises(KeyboardInterrupt):
        train_small_base(data, tmp_path, recipe, progress=_StopAfter(3))  # killed in the last step, before saving
    assert StepCheckpoints(tmp_path / "base-train").latest().name == "step-000003"
    folder = train_small_base(data, tmp_path, recipe)
    rows = [(r["stage"], int(r["step"])) for r in csv.DictReader((tmp_path / "loss.csv").read_text().splitlines())]
    assert rows == [("vae", 1), ("vae", 2), ("base", 3), ("base", 4)]  # each step logged once across the kill
    base = load_sd_base(folder)
    assert base.latent and base.image_channels == 1 and base.resolution == SIZE
    assert base.vae.config.scaling_factor != pytest.approx(0.18215)  # latents scaled to unit variance for this data
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)  # a genuine SD folder
    assert pipe.vae.config.latent_channels == 4 and not (tmp_path / "base-train").exists()
    sampler = ControlNetSampler(base, controlnet_for(base))
    out = sampler.sample(condition_batch([disc_mask()], SIZE), ["a medical image with lung"], [""], [0], SIZE,
                         SamplingOptions(steps=2))
    assert out.shape == (1, 1, SIZE, SIZE)


def test_step_checkpoints_are_whole_or_absent_and_pruned(tmp_path: Path) -> None:
    ckpts = StepCheckpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpts.save(step, lambda folder, step=step: (folder / "w.txt").write_text(str(step)))
    with pytest.raises(RuntimeError):
        ckpts.save(4, lambda folder: (_ for _ in ()).throw(RuntimeError("killed")))
    assert [p.name for p in ckpts.folders()] == ["step-000002", "step-000003"]
    assert (ckpts.latest() / "w.txt").read_text() == "3"


def _pairs(n: int = 4) -> list[Sample]:
    out = []
    for k in range(n):
        mask = disc_mask(centre=(10 + 4 * k, 16), radius=6)
        out.append(Sample(image=(0.2 + 0.6 * mask).astype(np.float32), mask=mask))
    return out


def test_one_training_step_changes_the_controlnet_and_leaves_the_base_frozen(sd_folder: Path) -> None:
    base = load_sd_base(sd_folder)
    controlnet = controlnet_for(base)
    unet = base.unet.state_dict()
    copied = [k for k in controlnet.state_dict() if k in unet and controlnet.state_dict()[k].shape == unet[k].shape]
    assert copied and all(torch.equal(controlnet.state_dict()[k], unet[k]) for k in copied)  # a copy of the encoder
    zero = {k: v.clone() for k, v in controlnet.state_dict().items() if k.startswith(ZERO_CONVOLUTIONS)}
    assert zero and all(not v.any() for v in zero.values())  # zero convolutions
    frozen = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in base.modules().items()}
    samples = _pairs()
    prompts = [mask_prompt(s.mask, LABELS) for s in samples]
    trainer = ControlNetTrainer(base, controlnet, samples, prompts, SIZE, lr=1e-3, batch_size=2, empty_prompt_rate=0.5,
                                seed=0)
    loss = trainer.step()
    assert np.isfinite(loss) and loss > 0
    after = controlnet.state_dict()
    assert any(after[k].any() for k in zero)  # the zero convolutions learn first
    for name, module in base.modules().items():
        assert all(torch.equal(v, frozen[name][k]) for k, v in module.state_dict().items()), name


def test_gradient_checkpointing_gives_the_same_step(sd_folder: Path) -> None:
    samples = _pairs(2)
    prompts = [mask_prompt(s.mask, LABELS) for s in samples]
    results = []
    for checkpointing in (False, True):
        base = load_sd_base(sd_folder)
        controlnet = controlnet_for(base)
        trainer = ControlNetTrainer(base, controlnet, samples, prompts, SIZE, lr=1e-3, batch_size=2,
                                    empty_prompt_rate=0.0, seed=0,
                                    gradient_checkpointing=checkpointing)
        results.append((trainer.step(), controlnet.controlnet_mid_block.weight.detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_mixed_precision_is_for_cuda_only() -> None:
    assert resolve_precision("auto", "cpu") == resolve_precision("fp16", "cpu") == "no"  # CPU autocast: only slower
    assert (resolve_precision("auto", "cuda"), resolve_precision("bf16", "cuda:1")) == ("fp16", "bf16")
    assert sampling_dtype("auto", "cpu") == torch.float32 and sampling_dtype("auto", "cuda") == torch.float16
    assert sampling_dtype("bf16", "cuda:1") == torch.bfloat16


def test_a_fresh_controlnet_changes_nothing_and_a_trained_one_follows_the_mask() -> None:
    base = pixel_base()
    controlnet = controlnet_for(base)
    sampler = ControlNetSampler(base, controlnet)
    options = SamplingOptions(steps=3, guidance=2.0)
    masks = [disc_mask(centre=(10, 10), radius=6), disc_mask(centre=(22, 22), radius=6)]
    seeds = [7, 7]
    prompts, negatives = ["a medical image with lung"] * 2, [""] * 2

    def draw() -> torch.Tensor:
        return sampler.sample(condition_batch(masks, SIZE), prompts, negatives, seeds, SIZE, options)

    fresh = draw()
    scheduler = make_scheduler("dpm++", base.scheduler.config)
    plain = denoise(base, scheduler, embeddings=base.encode_prompts(prompts, "cpu"),
                    negative=base.encode_prompts(negatives, "cpu"), size=SIZE, seeds=seeds, steps=3, guidance=2.0)
    assert torch.allclose(fresh, plain, atol=1e-6)  # zero convolutions: exactly the base, whatever the mask
    assert torch.allclose(fresh[0], fresh[1], atol=1e-6)
    samples = [Sample(image=(0.1 + 0.8 * m).astype(np.float32), mask=m) for m in masks]
    trainer = ControlNetTrainer(base, controlnet, samples, ["a medical image with lung"] * 2, SIZE, lr=3e-3,
                                batch_size=2, empty_prompt_rate=0.0, seed=0)
    for _ in range(3):
        trainer.step()
    trained = draw()
    assert (trained[0] - trained[1]).abs().mean() > 1e-3  # now the mask steers the image


def test_sampling_is_sized_seeded_per_sample_and_prompt_driven(sd_folder: Path) -> None:
    base = load_sd_base(sd_folder)
    controlnet = controlnet_for(base)
    with torch.no_grad():  # give the zero convolutions some weight so that the condition reaches the UNet
        for name, p in controlnet.named_parameters():
            if name.startswith(ZERO_CONVOLUTIONS):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    sampler = ControlNetSampler(base, controlnet)
    opts = SamplingOptions(steps=2, guidance=3.0)
    conds = condition_batch([disc_mask(), disc_mask(radius=4)], SIZE)
    both = sampler.sample(conds, ["a medical image with lung"] * 2, ["", ""], [1, 2], SIZE, opts)
    assert both.shape == (2, 3, SIZE, SIZE) and float(both.min()) >= 0 and float(both.max()) <= 1
    alone = sampler.sample(conds[1:], ["a medical image with lung"], [""], [2], SIZE, opts)
    assert torch.allclose(alone[0], both[1], atol=1e-4)  # sample k depends on its own seed only
    other_seed = sampler.sample(conds[1:], ["a medical image with lung"], [""], [3], SIZE, opts)
    other_prompt = sampler.sample(conds[1:], ["a medical image with nodule"], [""], [2], SIZE, opts)
    assert (other_seed[0] - alone[0]).abs().max() > 1e-3
    assert (other_prompt[0] - alone[0]).abs().max() > 1e-3
    euler_a = sampler.sample(conds[1:], ["a medical image with lung"], [""], [2], SIZE,
                             SamplingOptions(scheduler="euler-a", steps=2))
    assert euler_a.shape == (1, 3, SIZE, SIZE)


# --- the generator: train, load, generate --------------------------------------------------------------------


def test_fit_on_an_sd_folder_then_generate_at_the_mask_size(sd_folder: Path, tmp_path: Path) -> None:
    pairs = [Sample(image=s.image, mask=np.where(s.mask > 0, 2, 0).astype(np.uint8)) for s in _pairs()]
    dataset = Dataset.from_samples(pairs, labels=LABELS)
    config = ControlNetConfig(base=str(sd_folder), steps=1, batch_size=2, validate_every=0, sampling_steps=2)
    trainer = ControlNetGenerator(config, name="controlnet")
    assert trainer.fit(dataset, tmp_path / "ck") == tmp_path / "ck"
    card = read_checkpoint_card(tmp_path / "ck", expected="controlnet")
    assert card["base"] == str(sd_folder.resolve()) and card["resolution"] == SIZE and card["channels"] == 1
    gen = ControlNetGenerator(ControlNetConfig(sampling_steps=2), name="controlnet")
    gen.load(tmp_path / "ck")
    big = disc_mask(48, (24, 24), 12, value=2)
    out = gen.generate([Condition(mask=big), Condition(mask=disc_mask(value=2), prompt="lung")], [5, 6])
    assert out[0].image.shape == (48, 48) and out[1].image.shape == (SIZE, SIZE)  # grey, as the training images
    assert all(s.image.dtype == np.float32 and 0 <= s.image.min() <= s.image.max() <= 1 for s in out)
    assert out[0].meta["prompt"] == "a medical image with nodule" and out[1].meta["prompt"] == "lung"
    again = gen.generate([Condition(mask=big)], [5])
    assert np.abs(again[0].image - out[0].image).max() < 1e-4


def test_load_refuses_other_checkpoints_and_missing_bases(tmp_path: Path) -> None:
    gen = ControlNetGenerator(ControlNetConfig(), name="controlnet")
    with pytest.raises(CheckpointError, match="not a medsynth checkpoint"):
        gen.load(tmp_path)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"component": "ddpm"}))
    with pytest.raises(CheckpointError, match="'ddpm'"):
        gen.load(tmp_path)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"component": "controlnet", "latest": None}))
    with pytest.raises(CheckpointError, match="no trained ControlNet"):
        gen.load(tmp_path)


def test_offline_end_to_end_train_resume_and_run(demo_dir: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    result = invoke("-q", "train", "controlnet", "--data", demo_dir, "--out", ck, "--device", "cpu", *tiny())
    assert result.exit_code == 0, result.output
    card = read_checkpoint_card(ck, expected="controlnet")
    assert card["step"] == 2 and card["base"] == "base" and (ck / "base" / "model_index.json").is_file()
    assert {p.name for p in (ck / "validation").iterdir()} == {"step-000000.png", "step-000001.png",
                                                               "step-000002.png", "progress.png"}
    progress = read_image(ck / "validation" / "progress.png")
    assert progress.shape[1] == 2 + 4 * (SIZE + 2)  # condition + one column per validation (the paper's Fig. 2)
    # resuming continues where training stopped, logging every step once
    more = invoke("-q", "train", "controlnet", "--data", demo_dir, "--out", ck, "--device", "cpu", "--resume",
                  *tiny(steps=3, validate_every=0))
    assert more.exit_code == 0, more.output
    rows = list(csv.DictReader((ck / "loss.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows if r["stage"] == "controlnet"] == [1, 2, 3]
    assert [int(r["step"]) for r in rows if r["stage"] == "base"] == [1, 2, 3]
    changed = invoke("-q", "train", "controlnet", "--data", demo_dir, "--out", ck, "--device", "cpu", "--resume",
                     *tiny(base_widths="16,16"))
    assert changed.exit_code == 2 and "base_widths" in changed.stderr
    # a run with real masks produces pairs whose masks are the conditioning masks, and a report
    run = invoke("-q", "run", "--generator", "controlnet", "--mask-source", "real-masks", "--evaluator", "mask-stats",
                 "--checkpoint", ck, "--data", demo_dir, "--out", tmp_path / "run", "-n", 3, "--device", "cpu",
                 "--batch-size", 2, "--set", "generator.sampling_steps=2")
    assert run.exit_code == 0, run.output
    out = open_dataset(tmp_path / "run")
    real = open_dataset(demo_dir)
    assert len(out) == 3 and (tmp_path / "run" / "report.md").is_file()
    for k, pair in enumerate(out):
        assert pair.image.shape == real[k].mask.shape and np.array_equal(pair.mask > 0, real[k].mask > 0)
    records = [json.loads(line) for line in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    assert records[0]["seed"] == sample_seed(0, 0) and records[0]["meta"]["prompt"] == "a medical image with lung"


def test_train_with_a_missing_base_fails_in_one_line_and_writes_nothing(demo_dir: Path, tmp_path: Path) -> None:
    result = invoke("-q", "train", "controlnet", "--data", demo_dir, "--out", tmp_path / "ck", "--base",
                    tmp_path / "no-such-sd15")
    assert result.exit_code == 2 and "base folder not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "ck").exists()


def test_generate_before_load_is_a_pipeline_error() -> None:
    from medsynth_core import PipelineError

    gen = ControlNetGenerator(ControlNetConfig(), context=Context(), name="controlnet")
    with pytest.raises(PipelineError, match="load"):
        gen.generate([Condition(mask=disc_mask())], [0])


# --- training through accelerate: several processes, gradient accumulation, resume ---------------------------


def train_command(demo: Path, out: Path, *flags: object, **changes: object) -> list[str]:
    """``medsynth train controlnet`` on the CPU with the TINY options (``changes`` applied) and ``flags``."""
    return [sys.executable, "-m", "medsynth_cli", "-q", "train", "controlnet", "--data", str(demo), "--out", str(out),
            "--device", "cpu", *(str(a) for a in (*tiny(**changes), *flags))]


def run_quietly(command: list[str]) -> None:
    """Run a training command in one OpenMP thread per process; fail with its output when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def controlnet_weights(ck: Path, step: int) -> dict[str, torch.Tensor]:
    """The ControlNet weights of checkpoint ``step`` in ``ck``."""
    from safetensors.torch import load_file

    return load_file(ck / "checkpoints" / f"step-{step:06d}" / "controlnet" / "diffusion_pytorch_model.safetensors")


def loss_rows(ck: Path) -> list[tuple[str, int, float]]:
    return [(r["stage"], int(r["step"]), float(r["loss"]))
            for r in csv.DictReader((ck / "loss.csv").read_text().splitlines())]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


@pytest.fixture(scope="module")
def two_processes(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 small-base steps and 2 ControlNet steps trained by two CPU processes (accelerate, gloo)."""
    out = tmp_path_factory.mktemp("ddp") / "ck"
    run_quietly(train_command(demo_dir, out, "--processes", 2))
    return out


@pytest.fixture(scope="module")
def accumulated(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same training for 3 ControlNet steps in one process, two micro-batches per step."""
    out = tmp_path_factory.mktemp("accum") / "ck"
    run_quietly(train_command(demo_dir, out, "--grad-accum", 2, steps=3, validate_every=0))
    return out


def test_two_processes_train_a_checkpoint_that_generates(two_processes: Path) -> None:
    card = read_checkpoint_card(two_processes, expected="controlnet")
    assert card["step"] == 2 and card["latest"] == "checkpoints/step-000002" and card["base"] == "base"
    assert torch.load(two_processes / "checkpoints" / "step-000002" / "state.pt", weights_only=False)["step"] == 2
    # only the main process logs and draws: every step once, one grid per validation
    assert [(stage, step) for stage, step, _ in loss_rows(two_processes)] == [
        ("base", 1), ("base", 2), ("base", 3), ("controlnet", 1), ("controlnet", 2)]
    assert {p.name for p in (two_processes / "validation").iterdir()} == {
        "step-000000.png", "step-000001.png", "step-000002.png", "progress.png"}
    trained = controlnet_weights(two_processes, 2)
    assert any(trained[k].any() for k in trained if k.startswith(ZERO_CONVOLUTIONS))  # the zero convolutions learnt
    gen = ControlNetGenerator(ControlNetConfig(sampling_steps=2), context=Context(device="cpu"), name="controlnet")
    gen.load(two_processes)
    masks = [disc_mask(48, (20, 24), 10), disc_mask(SIZE, (16, 12), 6)]
    pairs = gen.generate([Condition(mask=m) for m in masks], [3, 4])
    assert [p.image.shape for p in pairs] == [(48, 48), (SIZE, SIZE)]
    assert all(np.isfinite(p.image).all() and 0 <= p.image.min() <= p.image.max() <= 1 for p in pairs)


def test_gradient_accumulation_in_one_process_trains_what_two_processes_train(two_processes: Path,
                                                                                accumulated: Path) -> None:
    """Micro-batch k of a step is drawn as process k would draw it, and both average the same gradients."""
    assert read_checkpoint_card(accumulated, expected="controlnet")["step"] == 3
    assert [row[:2] for row in loss_rows(accumulated)][-3:] == [("controlnet", 1), ("controlnet", 2),
                                                                ("controlnet", 3)]
    ddp, accum = loss_rows(two_processes), loss_rows(accumulated)[:5]
    assert [r[:2] for r in ddp] == [r[:2] for r in accum]
    assert [r[2] for r in ddp] == pytest.approx([r[2] for r in accum], rel=1e-5)  # the mean over both batches
    assert same_weights(controlnet_weights(two_processes, 2), controlnet_weights(accumulated, 2))
    from safetensors.torch import load_file

    unet = "base/unet/diffusion_pytorch_model.safetensors"
    assert same_weights(load_file(two_processes / unet), load_file(accumulated / unet))  # the small base too


def test_two_processes_resume_where_they_stopped(two_processes: Path, accumulated: Path, demo_dir: Path,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "ck"
    shutil.copytree(two_processes, out)
    run_quietly(train_command(demo_dir, out, "--processes", 2, "--resume", steps=3, validate_every=0))
    assert read_checkpoint_card(out, expected="controlnet")["step"] == 3
    # neither the base nor the ControlNet starts again: one more step, logged once
    assert [row[:2] for row in loss_rows(out)] == [("base", 1), ("base", 2), ("base", 3), ("controlnet", 1),
                                                   ("controlnet", 2), ("controlnet", 3)]
    assert same_weights(controlnet_weights(out, 2), controlnet_weights(two_processes, 2))
    after = controlnet_weights(out, 3)
    assert not same_weights(after, controlnet_weights(out, 2))
    # exactly where an uninterrupted run gets (the accumulated run trains what two processes do)
    assert same_weights(after, controlnet_weights(accumulated, 3))


def test_gradient_accumulation_steps_once_for_all_micro_batches() -> None:
    from medsynth_core.training import EXTRAS_KEY, TrainingSettings, step_generator
    from medsynth_plugins.common.sd_base import training_accelerator

    base = pixel_base()
    controlnet = controlnet_for(base)
    samples = _pairs()
    accelerator = training_accelerator(Context(extras={EXTRAS_KEY: TrainingSettings(grad_accum=2)}))
    trainer = ControlNetTrainer(base, controlnet, samples, [mask_prompt(s.mask, LABELS) for s in samples], SIZE,
                                lr=1e-3, batch_size=2, empty_prompt_rate=0.5, seed=5, accelerator=accelerator)
    with torch.no_grad():
        micro = [float(trainer._loss(step_generator(5, 0, k))) for k in (0, 1)]
    before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    loss = trainer.step()
    assert micro[0] != pytest.approx(micro[1]) and loss == pytest.approx(sum(micro) / 2, rel=1e-5)
    assert {float(s["step"]) for s in trainer.optimiser.state_dict()["state"].values()} == {1.0}  # one Adam step
    assert not all(torch.equal(v, before[k]) for k, v in controlnet.state_dict().items())
    assert trainer.state_dict()["step"] == 1
