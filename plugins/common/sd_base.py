"""Stable-Diffusion-style text-to-image bases: a local (or hub) SD folder, or a small one trained offline.

A *base* is what every SD-derived method needs: a ``UNet2DConditionModel``, a CLIP text encoder
and tokenizer, the training noise schedule and, for latent models, an ``AutoencoderKL``.

- :func:`load_sd_base` reads a diffusers folder laid out like Stable Diffusion 1.x/2.x
  (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``vae/``) with ``from_pretrained``
  on each part; a hub id works where the machine can reach the hub (or has it cached).
- :func:`train_small_base` builds and trains a small base on the user's own images and prompts, so
  SD-based methods run end to end with no weights at all: a tiny CLIP text model with a tokenizer
  whose vocabulary and merges are written beside it, a small UNet in pixel space or on the latents
  of a small VAE trained first. It saves the same layout, so :func:`load_sd_base` reads both.
- :func:`denoise` is the plain sampling loop (classifier-free guidance, any diffusers scheduler,
  optional extra residuals such as a ControlNet's) for bases that no diffusers pipeline covers,
  such as a pixel-space base.

Training helpers (:class:`StepCheckpoints`, :class:`LossLog`, :func:`diffusion_loss`,
:func:`training_accelerator`, :func:`train_step`) are shared by the methods that fine-tune on top
of a base. Every training loop goes through accelerate (``medsynth_core.training``): one process, or
several under ``medsynth train --processes N`` (data parallel, each process drawing its own batches),
mixed precision and gradient accumulation from the command's flags; only the main process writes.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_core import (
    CheckpointError,
    ConfigError,
    Context,
    Dataset,
    Progress,
    Sample,
    SilentProgress,
    torch_generator,
)
from medsynth_core.atomic import write_json_atomic
from medsynth_core.config import config_to_dict
from medsynth_core.training import make_accelerator, step_generator

from .images import image_batch

SMALL = "small"
DEFAULT_TEMPLATE = "a medical image with {labels}"
SCHEDULERS = ("dpm++", "dpm++-sde", "ddim", "ddpm", "euler", "euler-a", "unipc", "pndm")
_BASE_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler", "vae")
_TOKEN_LENGTH = 32
_TMP = ".tmp-"


@dataclass
class SDBase:
    """A text-to-image diffusion base: UNet, text encoder, tokenizer, noise schedule and optional VAE.

    ``vae`` is None for a pixel-space base, whose UNet works on images in [-1, 1] directly.
    ``source`` says where it was loaded from.
    """

    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    vae: Any = None
    source: str = ""

    @property
    def latent(self) -> bool:
        """Whether the UNet works on VAE latents (else on pixels)."""
        return self.vae is not None

    @property
    def vae_factor(self) -> int:
        """How many pixels one latent cell spans per side (1 in pixel space, 8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_channels(self) -> int:
        """Channels of the images the base makes (3 for SD, 1 for a grey small base)."""
        return int(self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels)

    @property
    def resolution(self) -> int:
        """The image size the UNet was built or trained for."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_factor

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this (the VAE factor times the UNet's downsampling)."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The networks of the base by part name."""
        parts = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.vae is not None:
            parts["vae"] = self.vae
        return parts

    def to(self, device: str, dtype: torch.dtype | None = None) -> SDBase:
        """Move every network to ``device`` (and ``dtype``); returns self."""
        for module in self.modules().values():
            move(module, device, dtype)
        return self

    def freeze(self) -> SDBase:
        """Eval mode and no gradients for every network; returns self."""
        for module in self.modules().values():
            module.requires_grad_(False).eval()
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device: str | torch.device) -> torch.Tensor:
        """Text embeddings (N x tokens x width) of ``prompts``, padded to the tokenizer's length."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    def to_model_space(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] as the UNet sees them: VAE latents times the scaling factor, or the images."""
        if self.vae is None:
            return images
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        latents = posterior.mean + posterior.std * noise  # sampled with our generator: seeded on any device
        return latents * self.vae.config.scaling_factor

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_model_space`: images in [-1, 1]."""
        if self.vae is None:
            return x
        return self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def save(self, folder: str | Path) -> Path:
        """Write the base as a diffusers folder (``model_index.json`` and one subfolder per part), atomically."""
        return save_sd_base(self, folder)


@contextmanager
def quiet_hub() -> Iterator[None]:
    """Hide transformers' and diffusers' own progress bars (weights loading, shard writing) for a block."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    shown = tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if shown[0]:
            tlog.enable_progress_bar()
        if shown[1]:
            dlog.enable_progress_bar()


def move(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``module.to(device)``, casting only when ``dtype`` differs (diffusers warns about needless casts)."""
    first = next(module.parameters(), None)
    if dtype is None or first is None or first.dtype == dtype:
        return module.to(device)
    return module.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Loading and saving


@quiet_hub()
def load_sd_base(source: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None) -> SDBase:
    """Load a Stable-Diffusion-style base from a diffusers folder or a hub id, with ``from_pretrained``.

    Raises CheckpointError (one line) for a missing folder, a folder that is not an SD-style
    pipeline, SDXL (two text encoders), or parts that fail to load.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    where = str(source)
    local = Path(source).expanduser()
    if local.exists() or where.startswith((".", "/", "~")) or where.count("/") != 1:
        if not local.is_dir():
            raise CheckpointError(f"{where}: base folder not found (give a diffusers Stable Diffusion folder "
                                  "with unet/, text_encoder/, tokenizer/, scheduler/ and vae/)")
        source = str(local)
    index = _model_index(str(source), where)
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise CheckpointError(f"{where}: SDXL bases are not supported; use a Stable Diffusion 1.x/2.x folder")
    missing = [p for p in ("unet", "text_encoder", "tokenizer", "scheduler") if not _has_part(index, p)]
    if missing:
        raise CheckpointError(f"{where}: not a Stable-Diffusion-style folder (no {', '.join(missing)} in "
                              "model_index.json)")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs) if _has_part(index, "vae") else None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{where}: cannot load the base ({_first_line(err)})") from None
    base = SDBase(unet, text_encoder, tokenizer, scheduler, vae, source=where)
    return base.to(device).freeze()


@quiet_hub()
def save_sd_base(base: SDBase, folder: str | Path) -> Path:
    """Write ``base`` as a diffusers folder that :func:`load_sd_base` (and, with a VAE, diffusers'
    ``StableDiffusionPipeline.from_pretrained``) reads; written beside ``folder`` and renamed into place."""
    import diffusers

    folder = Path(folder)
    tmp = folder.parent / f"{_TMP}{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in base.modules().items():
        module.save_pretrained(tmp / name)
    base.tokenizer.save_pretrained(tmp / "tokenizer")
    _write_bpe_files(base.tokenizer, tmp / "tokenizer")
    base.scheduler.save_pretrained(tmp / "scheduler")
    none = [None, None]
    index = {
        "_class_name": "StableDiffusionPipeline" if base.latent else "PixelSpaceDiffusion",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(base.scheduler).__name__],
        "vae": ["diffusers", "AutoencoderKL"] if base.latent else none,
        "safety_checker": none,
        "feature_extractor": none,
        "image_encoder": none,
        "requires_safety_checker": False,
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def _model_index(source: str, where: str) -> dict[str, Any]:
    if Path(source).is_dir():
        path = Path(source) / "model_index.json"
        if not path.is_file():
            raise CheckpointError(f"{where}: no model_index.json; not a diffusers pipeline folder")
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise CheckpointError(f"{path}: unreadable ({err})") from None
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(source))
    except Exception as err:  # hub errors come in many types; the user needs one line
        raise CheckpointError(f"{where}: not a local folder and not reachable as a hub id ({_first_line(err)})") \
            from None


def _has_part(index: dict[str, Any], part: str) -> bool:
    entry = index.get(part)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# Prompts and the small tokenizer


def label_words(mask: np.ndarray | None, labels: dict[str, int]) -> list[str]:
    """Names of the labels present in ``mask`` (background excluded), in label order.

    An empty mask gives the background's name; no mask at all gives every foreground name.
    """
    by_value = sorted((v, k) for k, v in labels.items())
    foreground = [(v, k) for v, k in by_value if v != 0]
    if mask is None:
        return [k for _, k in foreground] or ["image"]
    present = set(np.unique(mask).tolist())
    names = [k for v, k in foreground if v in present]
    return names or [next((k for v, k in by_value if v == 0), "background")]


def mask_prompt(mask: np.ndarray | None, labels: dict[str, int], template: str = DEFAULT_TEMPLATE) -> str:
    """The training prompt of a pair: ``template`` with ``{labels}`` replaced by its class words."""
    words = " and ".join(w.replace("_", " ") for w in label_words(mask, labels))
    return template.replace("{labels}", words)


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_tokenizer(words: Sequence[str], max_length: int = _TOKEN_LENGTH):
    """A CLIP tokenizer over bytes plus whole-word tokens for ``words``.

    Every text still tokenizes (unknown words fall back to byte tokens), while the class and
    prompt words the base is trained on are one token each, as in CLIP's own vocabulary.
    :func:`save_sd_base` writes the vocabulary and merges as CLIP's ``vocab.json`` and ``merges.txt``.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    byte_of = dict(zip(range(256), alphabet))
    for word in sorted({w for text in words for w in re.findall(r"[^\W\d_]+", text.lower())}):
        parts = [byte_of[b] for b in word.encode()]
        parts[-1] += "</w>"
        while len(parts) > 1:  # merge left to right, so the whole word ends as one token
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=max_length)


def _write_bpe_files(tokenizer: Any, folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP's own files) beside ``tokenizer.json`` when missing."""
    if (folder / "vocab.json").is_file() or not hasattr(tokenizer, "backend_tokenizer"):
        return
    model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {})
    if model.get("type") != "BPE":
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))


# ---------------------------------------------------------------------------------------------
# The small base


@dataclass(frozen=True)
class SmallBaseRecipe:
    """How to build and train the small offline base."""

    resolution: int = 64
    channels: int = 1
    latent: bool = False
    widths: tuple[int, ...] = (32, 64, 64)
    layers: int = 1
    text_width: int = 64
    text_layers: int = 2
    vae_widths: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    steps: int = 500
    vae_steps: int = 300
    batch_size: int = 8
    lr: float = 3e-4
    prompt_dropout: float = 0.1
    template: str = DEFAULT_TEMPLATE
    words: tuple[str, ...] = ()
    checkpoint_every: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.widths) < 2 or min(self.widths) < 1:
            raise ConfigError(f"small base widths must be 2 or more positive numbers, got {self.widths}")
        groups = self.norm_groups
        if any(w % groups for w in (*self.widths, *(self.vae_widths if self.latent else ()))):
            raise ConfigError(f"small base widths {self.widths} must share a divisor of at least 4")
        multiple = 2 ** (len(self.widths) - 1) * (2 ** (len(self.vae_widths) - 1) if self.latent else 1)
        if self.resolution % multiple:
            raise ConfigError(f"resolution must be a multiple of {multiple} for this small base, got {self.resolution}")
        if self.text_width % 4:
            raise ConfigError(f"small base text width must be a multiple of 4, got {self.text_width}")

    @property
    def norm_groups(self) -> int:
        """GroupNorm groups: the largest power of two up to 32 dividing every width."""
        widths = (*self.widths, *(self.vae_widths if self.latent else ()))
        g = 32
        while g > 4 and any(w % g for w in widths):
            g //= 2
        return g


def build_small_base(recipe: SmallBaseRecipe) -> SDBase:
    """A freshly initialised small base (seeded by ``recipe.seed``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer([recipe.template, *recipe.words, "background image and"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_width, intermediate_size=2 * recipe.text_width,
        num_hidden_layers=recipe.text_layers, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = None
    if recipe.latent:
        n = len(recipe.vae_widths)
        vae = AutoencoderKL(in_channels=recipe.channels, out_channels=recipe.channels,
                            latent_channels=recipe.latent_channels, block_out_channels=recipe.vae_widths,
                            layers_per_block=1, norm_num_groups=recipe.norm_groups,
                            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                            sample_size=recipe.resolution)
    n = len(recipe.widths)
    factor = 2 ** (len(recipe.vae_widths) - 1) if recipe.latent else 1
    in_channels = recipe.latent_channels if recipe.latent else recipe.channels
    # Self-attention over many cells is what costs on a CPU: attend (and read the prompt) only on
    # levels of at most 16 x 16 cells, and always on the deepest; heads of 32 channels.
    cells = [recipe.resolution // factor // 2**k for k in range(n)]
    attend = [c <= 16 or k == n - 1 for k, c in enumerate(cells)]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attend)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend))
    heads = tuple(max(1, w // 32) for w in recipe.widths)
    unet = UNet2DConditionModel(
        sample_size=recipe.resolution // factor, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=recipe.widths, layers_per_block=recipe.layers, down_block_types=down,
        up_block_types=up, cross_attention_dim=recipe.text_width, attention_head_dim=heads,
        norm_num_groups=recipe.norm_groups)
    if recipe.latent:  # Stable Diffusion's schedule for latents; cosine suits small pixel images
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, clip_sample=False)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    return SDBase(unet, text_encoder, tokenizer, scheduler, vae, source=SMALL)


@quiet_hub()
def train_small_base(dataset: Dataset, workdir: Path, recipe: SmallBaseRecipe, *, device: str = "cpu",
                     mixed_precision: str = "auto", progress: Progress | None = None,
                     log: Callable[[str], None] = print, labels: dict[str, int] | None = None,
                     accelerator: Any = None) -> Path:
    """Train the small base on every image of ``dataset`` with its mask's prompt; return ``workdir/base``.

    A latent recipe trains the VAE first (``vae_steps``), then the UNet and text encoder together
    (``steps``) with ``prompt_dropout`` of the prompts emptied for classifier-free guidance.
    Checkpoints go to ``workdir/base-train`` every ``checkpoint_every`` steps and training resumes
    from the newest; the finished base is written to ``workdir/base`` (already there: nothing to do).
    Losses are appended to ``workdir/loss.csv``. ``accelerator`` (see :func:`training_accelerator`)
    runs the steps, on every process of a data-parallel group; without one, a lone process on
    ``device`` with ``mixed_precision``.
    """
    out = workdir / "base"
    if (out / "model_index.json").is_file():
        return out
    acc = accelerator or training_accelerator(Context(device=device), mixed_precision, seed=recipe.seed)
    progress = progress or SilentProgress()
    labels = labels or dataset.labels
    samples = list(dataset)
    if not samples:
        raise ConfigError("cannot train a base: the dataset is empty")
    prompts = [mask_prompt(s.mask, labels, recipe.template) for s in samples]
    base = build_small_base(recipe)
    ckpts = StepCheckpoints(workdir / "base-train")
    loss_log = LossLog(workdir / "loss.csv")
    vae_steps = recipe.vae_steps if recipe.latent else 0
    total = vae_steps + recipe.steps
    step, state = 0, None
    latest = ckpts.latest()
    if latest is not None:
        step, state = _restore_small(base, latest)
        log(f"resuming the small base at step {step} from {latest}")
    acc.wait_for_everyone()  # every process has read the checkpoint before the main one writes the next
    device = acc.device
    base.to(device)
    images = _image_tensor(samples, recipe.resolution, recipe.channels)
    with progress.task("training the small base", total=total) as task:
        task.advance(step)
        if step < vae_steps:
            step = _train_vae(acc, base, images, recipe, step, state, ckpts, loss_log, task)
            state = None
        if step == vae_steps and recipe.latent and state is None:
            _set_latent_scale(base, images, device)
        trainable = [base.unet, base.text_encoder]
        for module in trainable:
            module.train().requires_grad_(True)
        if base.vae is not None:
            base.vae.requires_grad_(False).eval()
        optimiser = torch.optim.AdamW([p for m in trainable for p in m.parameters()], lr=recipe.lr, weight_decay=1e-2)
        if state is not None and step >= vae_steps:
            optimiser.load_state_dict(state["optimiser"])
            load_scaler(acc, state)
        unet, text_encoder, optimiser = acc.prepare(base.unet, base.text_encoder, optimiser)

        def loss_of(gen: torch.Generator) -> torch.Tensor:
            pick = torch.randint(len(samples), (min(recipe.batch_size, len(samples)),), generator=gen)
            drop = torch.rand(len(pick), generator=gen) < recipe.prompt_dropout
            batch_prompts = ["" if d else prompts[i] for i, d in zip(pick.tolist(), drop.tolist())]
            with torch.no_grad():
                clean = base.to_model_space(images[pick].to(device) * 2 - 1, gen)
            ids = base.tokenizer(batch_prompts, padding="max_length", max_length=base.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            emb = text_encoder(ids)[0]
            return diffusion_loss(base.scheduler, lambda x, t: unet(x, t, emb).sample, clean, gen)

        while step < total:
            value = train_step(acc, [unet, text_encoder], optimiser, recipe.seed, step, loss_of)
            step += 1
            if acc.is_main_process:
                loss_log.add("base", step, value)
            task.advance()
            task.show(loss=f"{value:.4f}")
            if step % recipe.checkpoint_every == 0 or step == total:
                if acc.is_main_process:
                    _save_small(base, ckpts, step, optimiser, acc.scaler)
                    loss_log.flush()
                acc.wait_for_everyone()
        acc.free_memory()
    base.freeze()
    if acc.is_main_process:
        save_sd_base(base, out)
        shutil.rmtree(workdir / "base-train", ignore_errors=True)
    acc.wait_for_everyone()
    return out


def _image_tensor(samples: Sequence[Sample], size: int, channels: int) -> torch.Tensor:
    return image_batch([s.image for s in samples], size, channels)


class _VAELoss(torch.nn.Module):
    """The VAE's training loss as one forward pass, so that data parallel sees encode and decode together."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x)
        recon = self.vae.decode(z).sample
        # L1 keeps edges sharper than L2; the tiny KL weight only keeps the latents bounded (as in LDM)
        return F.l1_loss(recon.float(), x.float()) + 1e-6 * posterior.kl().mean()


def _train_vae(acc: Any, base: SDBase, images: torch.Tensor, recipe: SmallBaseRecipe, step: int,
               state: dict[str, Any] | None, ckpts: StepCheckpoints, loss_log: LossLog, task: Any) -> int:
    """The small base's VAE stage, from ``step`` to ``recipe.vae_steps``; returns the step reached."""
    vae = base.vae.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=recipe.lr)
    if state is not None:
        optimiser.load_state_dict(state["optimiser"])
        load_scaler(acc, state)
    model, optimiser = acc.prepare(_VAELoss(vae), optimiser)

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(images), (min(recipe.batch_size, len(images)),), generator=gen)
        return model(images[pick].to(acc.device) * 2 - 1, gen)

    while step < recipe.vae_steps:
        value = train_step(acc, [model], optimiser, recipe.seed, step, loss_of)
        step += 1
        if acc.is_main_process:
            loss_log.add("vae", step, value)
        task.advance()
        task.show(loss=f"{value:.4f}")
        if step % recipe.checkpoint_every == 0 or step == recipe.vae_steps:
            vae.eval()
            if step == recipe.vae_steps:
                _set_latent_scale(base, images, acc.device)
            if acc.is_main_process:
                _save_small(base, ckpts, step, optimiser if step < recipe.vae_steps else None, acc.scaler)
                loss_log.flush()
            acc.wait_for_everyone()
            vae.train()
    acc.free_memory()
    vae.eval().requires_grad_(False)
    return step


@torch.no_grad()
def _set_latent_scale(base: SDBase, images: torch.Tensor, device: str | torch.device) -> None:
    """Scale latents to unit variance, as SD's 0.18215 does for its VAE."""
    latents = torch.cat([base.vae.encode(images[i:i + 16].to(device) * 2 - 1).latent_dist.mean
                         for i in range(0, len(images), 16)])
    base.vae.register_to_config(scaling_factor=float(1.0 / latents.float().std().clamp_min(1e-3)))


def _save_small(base: SDBase, ckpts: StepCheckpoints, step: int, optimiser, scaler) -> None:
    def write(folder: Path) -> None:
        for name, module in base.modules().items():
            module.save_pretrained(folder / name)
        state = {"step": step, "optimiser": optimiser.state_dict() if optimiser is not None else None,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        torch.save(state, folder / "state.pt")

    ckpts.save(step, write)


def _restore_small(base: SDBase, folder: Path) -> tuple[int, dict[str, Any] | None]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        base.unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        base.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
        if base.vae is not None:
            base.vae = AutoencoderKL.from_pretrained(folder / "vae")
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{folder}: cannot resume the small base ({_first_line(err)})") from None
    return int(state["step"]), state if state.get("optimiser") is not None else None


# ---------------------------------------------------------------------------------------------
# Training helpers shared by methods that fine-tune on a base


def diffusion_loss(scheduler, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], clean: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """The denoising loss: noise ``clean`` at random timesteps and regress the model on the noise
    (or on the velocity for v-prediction bases such as SD 2.x)."""
    noise = torch.randn(clean.shape, generator=generator).to(clean)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
    steps = steps.to(clean.device)
    noisy = scheduler.add_noise(clean, noise, steps)
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ConfigError(f"prediction type {kind!r} is not supported for training; use epsilon or v_prediction")
    target = scheduler.get_velocity(clean, noise, steps) if kind == "v_prediction" else noise
    return F.mse_loss(model(noisy, steps).float(), target.float())


def resolve_precision(mixed_precision: str, device: str | torch.device) -> str:
    """A plugin's ``mixed_precision`` option as accelerate's mode: ``auto`` is fp16 on CUDA, and mixed
    precision is CUDA-only (``no`` elsewhere). ``medsynth train --mixed-precision`` overrides it."""
    cuda = str(device).startswith("cuda")
    if not cuda:
        return "no"
    return "fp16" if mixed_precision == "auto" else mixed_precision


def sampling_dtype(mixed_precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype of networks that only run forward (sampling, frozen parts) for a ``mixed_precision`` option."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(resolve_precision(mixed_precision, device),
                                                               torch.float32)


def training_accelerator(context: Any, mixed_precision: str = "auto", seed: int | None = None) -> Any:
    """The ``accelerate.Accelerator`` of one training run: the command's flags (``--mixed-precision``,
    ``--grad-accum``, ``--processes``) over the plugin's own ``mixed_precision`` option."""
    return make_accelerator(context, mixed_precision=resolve_precision(mixed_precision, context.device), seed=seed)


def frozen_dtype(accelerator: Any) -> torch.dtype:
    """The dtype of the frozen networks under ``accelerator``: half precision on a GPU in mixed precision,
    else float32 (the trained networks always keep float32 master weights)."""
    if accelerator.device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)


def backward_step(accelerator: Any, loss: torch.Tensor, optimiser, modules: Sequence[torch.nn.Module]) -> None:
    """Backpropagate one micro-batch (scaled under fp16, averaged over accumulation and processes);
    on the micro-batch that completes a step, clip to norm 1 and step the optimiser."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        accelerator.clip_grad_norm_(params, 1.0)
    optimiser.step()  # a prepared optimiser steps (and zeroes) only when the gradients are complete
    optimiser.zero_grad(set_to_none=True)


def train_step(accelerator: Any, models: Sequence[torch.nn.Module], optimiser, seed: int, step: int,
               loss_of: Callable[[torch.Generator], torch.Tensor]) -> float:
    """One optimiser step of a prepared model: ``--grad-accum`` micro-batches on every process.

    ``loss_of(generator)`` draws a micro-batch with ``generator`` and returns its loss. Each
    (step, micro-batch, process) has its own generator from :func:`step_generator`, so processes see
    different batches, a resumed run draws what an uninterrupted one would, and N processes draw
    the micro-batches one process draws with ``--grad-accum N``. Returns the mean loss of the step
    over all micro-batches and processes.
    """
    accum, world = accelerator.gradient_accumulation_steps, accelerator.num_processes
    total = torch.zeros((), device=accelerator.device)
    for micro in range(accum):
        gen = step_generator(seed, step, micro * world + accelerator.process_index)
        with accelerator.accumulate(*models):
            with accelerator.autocast():
                loss = loss_of(gen)
            backward_step(accelerator, loss, optimiser, models)
        total += loss.detach().float()
    return float(accelerator.reduce(total / accum, "mean"))


def load_scaler(accelerator: Any, state: dict[str, Any]) -> None:
    """Restore the fp16 gradient scaler saved in a checkpoint's ``state``, when both have one."""
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])


class StepCheckpoints:
    """Numbered checkpoint folders (``step-000100``), each written whole or not at all; the newest ``keep`` stay.

    A folder is written under a temporary name and renamed, so a kill never leaves a half
    checkpoint that :meth:`latest` would pick.
    """

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root, self.keep = Path(root), keep

    def folders(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)]
        return sorted(found, key=self.step_of)

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        found = self.folders()
        return found[-1] if found else None

    @staticmethod
    def step_of(folder: Path) -> int:
        """The training step of a checkpoint folder."""
        return int(folder.name.split("-")[1])

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Call ``write(folder)`` on a temporary folder, rename it to ``step-NNNNNN`` and prune old ones."""
        target = self.root / f"step-{step:06d}"
        tmp = self.root / f"{_TMP}{target.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in self.folders()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target


@dataclass
class LossLog:
    """Training losses appended to a CSV (``stage,step,loss``) when a checkpoint is written.

    Rows wait in memory until :meth:`flush`, called right after each checkpoint, so a resumed
    run never logs a step twice.
    """

    path: Path
    rows: list[tuple[str, int, float]] = field(default_factory=list)

    def add(self, stage: str, step: int, loss: float) -> None:
        """Remember one step's loss."""
        self.rows.append((stage, step, loss))

    def flush(self) -> None:
        """Append the remembered rows to the file."""
        if not self.rows:
            return
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["stage", "step", "loss"])
            writer.writerows((s, k, f"{v:.6g}") for s, k, v in self.rows)
        self.rows.clear()


# ---------------------------------------------------------------------------------------------
# Sampling


def make_scheduler(name: str, config: Any):
    """A sampling scheduler by short name, configured from the base's noise schedule.

    ``dpm++`` is DPM-Solver++ (2M), the default of most SD front ends: good images in 20-25 steps.
    """
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    config = dict(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "dpm++-sde":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++")
    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
               "euler-a": EulerAncestralDiscreteScheduler, "unipc": UniPCMultistepScheduler, "pndm": PNDMScheduler}
    if name not in classes:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return classes[name].from_config(config)


def step_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: the same noise on any device and in any batch."""
    return [torch_generator(s, "cpu") for s in seeds]


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Per-sample starting noise, N x ``shape``, drawn on the CPU from each sample's own generator."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


@torch.no_grad()
def denoise(base: SDBase, scheduler, *, embeddings: torch.Tensor, negative: torch.Tensor | None, size: int,
            seeds: Sequence[int], steps: int, guidance: float,
            residuals: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, Any]] | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sample N images (N x C x size x size in [0, 1]) from ``base``, one seed per image.

    Classifier-free guidance runs when ``guidance > 1`` and ``negative`` embeddings are given.
    ``residuals(x, t, embeddings)`` may return extra UNet keyword arguments for the batch it is
    given (a ControlNet's ``down_block_additional_residuals`` and ``mid_block_additional_residual``).
    """
    device = embeddings.device
    gens = step_generators(seeds)
    channels = base.unet.config.in_channels
    cells = size // base.vae_factor
    x = initial_noise((channels, cells, cells), gens).to(device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    guided = guidance > 1.0 and negative is not None
    context = torch.cat([negative, embeddings]) if guided else embeddings
    step_kwargs = {"generator": gens} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        model_in = scheduler.scale_model_input(model_in, t).to(dtype)
        extra = residuals(model_in, t, context) if residuals is not None else {}
        out = base.unet(model_in, t, context.to(dtype), **extra).sample.float()
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    images = base.from_model_space(x).float() if base.latent else x
    return (images / 2 + 0.5).clamp(0, 1)


def check_size(base: SDBase, size: int, option_name: str = "resolution") -> None:
    """ConfigError unless ``size`` suits the base's down-sampling."""
    multiple = base.size_multiple
    if size % multiple:
        up = math.ceil(size / multiple) * multiple
        raise ConfigError(f"{option_name} {size} does not suit base {base.source!r}: use a multiple of {multiple} "
                          f"(e.g. {up})")


# Options of controlnet and sd-attention that fix the networks a training folder holds
ARCHITECTURE = ("base", "resolution", "small_base", "base_widths", "prompt_template", "seed")
RUN_FILE = "train-options.json"


def check_resumable(workdir: Path, cfg: Any, write: bool = True) -> None:
    """Record the options that fix the networks (when ``write``); refuse to resume with different ones."""
    chosen = {k: v for k, v in config_to_dict(cfg).items() if k in ARCHITECTURE}
    path = workdir / RUN_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        for key, value in chosen.items():
            if key in before and before[key] != value:
                raise ConfigError(f"{workdir}: was trained with {key} = {before[key]!r}, not {value!r}; resume with "
                                  "the same value or choose another --out")
        return
    if write:
        write_json_atomic(path, chosen)
