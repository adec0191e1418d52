"""The ControlNet generator: options, training entry point, loading and generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from medsynth_core import (
    CheckpointError,
    Condition,
    ConfigError,
    Dataset,
    Generator,
    PipelineError,
    Sample,
    option,
    read_checkpoint_card,
)

if TYPE_CHECKING:
    import torch

    from .sampling import SamplingOptions

# torch, diffusers and the sd_base helpers load on first use, so that `medsynth list` stays quick
SMALL = "small"  # sd_base.SMALL
DEFAULT_TEMPLATE = "a medical image with {labels}"  # sd_base.DEFAULT_TEMPLATE
Scheduler = Literal["dpm++", "dpm++-sde", "ddim", "ddpm", "euler", "euler-a", "unipc", "pndm"]  # sd_base.SCHEDULERS


@dataclass(frozen=True)
class ControlNetConfig:
    """Options of the ControlNet generator: the base, training, and sampling."""

    base: str = option(
        SMALL, "'small': train a small text-conditioned base on your images first (offline, CPU-sized); else a "
               "local Stable-Diffusion-style diffusers folder (e.g. SD 1.5) or a hub id. At run time 'small' means "
               "the base the checkpoint was trained on.")
    resolution: int = option(
        0, "Image size in px for training and sampling; 0: 64 for the small base, the base's own size (512 for "
           "SD 1.5) otherwise, and at run time the checkpoint's.")
    small_base: Literal["pixel", "latent"] = option(
        "pixel", "Small base in pixel space, or on the latents of a small VAE trained first (for larger images).")
    base_widths: tuple[int, ...] = option((32, 64, 64), "UNet channel widths of the small base, one per level.")
    base_steps: int = option(1000, "Training steps of the small base (its UNet and text encoder).")
    vae_steps: int = option(500, "Training steps of the small base's VAE (latent small base only).")
    base_lr: float = option(3e-4, "Learning rate of the small base.")
    prompt_template: str = option(
        DEFAULT_TEMPLATE, "Training prompt of a pair; {labels} becomes the names of the mask's classes "
                          "(dataset.json labels), e.g. 'a chest x-ray with lung and nodule'.")
    steps: int = option(1000, "ControlNet training steps.")
    batch_size: int = option(8, "Training batch size.")
    lr: float = option(1e-4, "ControlNet learning rate (1e-5 for Stable Diffusion 1.5, as in the ControlNet paper).")
    empty_prompt_rate: float = option(
        0.5, "Share of training prompts replaced by the empty prompt (0.5 in the ControlNet paper), so the mask "
             "alone must carry the layout.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option(
        "auto", "Mixed precision on CUDA ('auto': fp16 on CUDA, full precision on CPU); also the sampling dtype.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass: less memory, slower.")
    checkpoint_every: int = option(250, "Write a resumable checkpoint every this many steps (and at the end).")
    validate_every: int = option(
        100, "Save a validation grid (condition | real | generated) every this many steps; 0: never.")
    validation_masks: int = option(4, "Masks shown in each validation grid.")
    seed: int = option(0, "Training seed (initialisation, batches, noise).")
    prompt: str = option("", "Sampling prompt; empty: the condition's prompt, else the training prompt of the "
                             "mask's classes.")
    negative_prompt: str = option("", "Negative prompt (used with guidance_scale > 1).")
    scheduler: Scheduler = option("dpm++", "Sampling scheduler; 'dpm++' is DPM-Solver++ (2M).")
    sampling_steps: int = option(25, "Denoising steps when sampling.")
    guidance_scale: float = option(
        3.0, "Classifier-free guidance; <= 1 turns it off (7.5 is usual for Stable Diffusion 1.5).")
    conditioning_scale: float = option(1.0, "Weight of the ControlNet's residuals: how strongly the mask steers.")

    def __post_init__(self) -> None:
        if not self.base.strip():
            raise ConfigError("base must be 'small', a folder or a hub id, got ''")
        if self.resolution < 0 or self.resolution % 8:
            raise ConfigError(f"resolution must be 0 (automatic) or a positive multiple of 8, got {self.resolution}")
        if len(self.base_widths) < 2 or any(w < 4 or w % 4 for w in self.base_widths):
            raise ConfigError(f"base_widths must be 2 or more multiples of 4, got {self.base_widths}")
        for name in ("base_steps", "vae_steps", "steps", "batch_size", "checkpoint_every", "validation_masks",
                     "sampling_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("base_lr", "lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.empty_prompt_rate <= 1.0:
            raise ConfigError(f"empty_prompt_rate must be in [0, 1], got {self.empty_prompt_rate}")
        for name in ("validate_every", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.guidance_scale < 0 or self.conditioning_scale < 0:
            raise ConfigError("guidance_scale and conditioning_scale must be >= 0, got "
                              f"{self.guidance_scale} and {self.conditioning_scale}")

    def sampling(self) -> SamplingOptions:
        """The sampling options as the sampler takes them."""
        from .sampling import SamplingOptions

        return SamplingOptions(self.scheduler, self.sampling_steps, self.guidance_scale, self.conditioning_scale)


class ControlNetGenerator(Generator):
    """ControlNet on a Stable-Diffusion-style base: images drawn for masks (colour-coded) and a prompt."""

    Config = ControlNetConfig
    trainable = True
    requires = frozenset({"mask"})
    makes = frozenset()  # the conditioning mask is the pair's mask
    recipe = {  # CPU-sized: a small 64 px base and its ControlNet, about 7 CPU-minutes of training
        "train": {"base_steps": 300, "steps": 200, "validate_every": 0},
        "mask_source": {"name": "real-masks", "order": "cycle"},
    }

    def fit(self, dataset: Dataset, workdir: Path) -> Path:
        from .training import train

        return train(self, dataset, Path(workdir))

    def networks(self) -> list[Any]:
        """The base UNet and the ControlNet, once loaded."""
        sampler = getattr(self, "_sampler", None)
        return [] if sampler is None else [sampler.base.unet, sampler.controlnet]

    def load(self, checkpoint: Path) -> None:
        from medsynth_plugins.common.sd_base import quiet_hub

        with quiet_hub():
            self._load(Path(checkpoint))

    def _load(self, checkpoint: Path) -> None:
        from diffusers import ControlNetModel

        from medsynth_plugins.common.sd_base import check_size, load_sd_base, sampling_dtype

        from .sampling import ControlNetSampler

        card = read_checkpoint_card(checkpoint, expected=self.name)
        latest = card.get("latest")
        if not latest or not (checkpoint / latest / "controlnet").is_dir():
            raise CheckpointError(f"{checkpoint}: holds no trained ControlNet yet; finish `medsynth train {self.name}`")
        missing = [key for key in ("base", "resolution", "channels", "labels", "config") if key not in card]
        if missing:
            raise CheckpointError(f"{checkpoint / 'checkpoint.json'}: damaged (no {', '.join(missing)})")
        device = self.context.device
        dtype = sampling_dtype(self.config.mixed_precision, device)
        base_ref = card["base"] if self.config.base == SMALL else self.config.base
        base_path = checkpoint / base_ref if base_ref == "base" else base_ref
        base = load_sd_base(base_path, device=device, dtype=dtype)
        try:
            controlnet = ControlNetModel.from_pretrained(checkpoint / latest / "controlnet", torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"{checkpoint / latest}: cannot load the ControlNet ({reason})") from None
        for key in ("block_out_channels", "cross_attention_dim", "in_channels"):
            if list(np.atleast_1d(controlnet.config[key])) != list(np.atleast_1d(base.unet.config[key])):
                raise CheckpointError(f"{checkpoint}: the ControlNet does not fit base {base.source!r} ({key} "
                                      f"{controlnet.config[key]} vs {base.unet.config[key]}); use the base it was "
                                      "trained on")
        self._size = self.config.resolution or int(card["resolution"])
        check_size(base, self._size)
        self._labels = {str(k): int(v) for k, v in card["labels"].items()}
        self._channels = int(card["channels"])
        self._template = card["config"].get("prompt_template", DEFAULT_TEMPLATE)
        self._sampler = ControlNetSampler(base, controlnet.to(device).eval(), dtype)

    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        if not hasattr(self, "_sampler"):
            raise PipelineError(f"{self.name}: call load(checkpoint) before generate()")
        if any(c.mask is None for c in conditions):
            raise PipelineError(f"{self.name}: every condition needs a mask; use a mask source such as 'real-masks'")
        from .conditions import condition_batch

        prompts = [self.prompt_for(c) for c in conditions]
        negatives = [self.config.negative_prompt] * len(conditions)
        images = self._sampler.sample(condition_batch([c.mask for c in conditions], self._size), prompts, negatives,
                                      seeds, self._size, self.config.sampling())
        return [Sample(image=self._to_image(img, c.mask.shape), meta={"prompt": p})
                for img, c, p in zip(images, conditions, prompts)]

    def prompt_for(self, condition: Condition) -> str:
        """The condition's own prompt, else the ``prompt`` option, else the training prompt of its mask."""
        from medsynth_plugins.common.sd_base import mask_prompt

        return condition.prompt or self.config.prompt or mask_prompt(condition.mask, self._labels, self._template)

    def _to_image(self, image: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
        """C x S x S in [0, 1] -> float32 at the mask's size, grey when the training images were grey."""
        import torch.nn.functional as F

        if tuple(image.shape[-2:]) != tuple(shape):
            shrinking = image.shape[-2] > shape[0] or image.shape[-1] > shape[1]
            image = F.interpolate(image[None].float(), size=tuple(shape), mode="bilinear", align_corners=False,
                                  antialias=shrinking)[0]
        arr = image.float().cpu().numpy()
        if self._channels == 1:
            arr = arr.mean(axis=0)
        else:
            arr = np.moveaxis(arr[:3] if len(arr) >= 3 else np.repeat(arr[:1], 3, axis=0), 0, -1)
        return np.clip(arr, 0.0, 1.0).astype(np.float32)
