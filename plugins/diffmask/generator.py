"""The sd-attention generator: text-to-image with a Stable-Diffusion-style base, soft masks from cross-attention."""

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
    numpy_rng,
    option,
    read_checkpoint_card,
)

if TYPE_CHECKING:
    from .attention import AttentionOptions

SMALL = "small"  # sd_base.SMALL; not imported here so that `medsynth list` never imports torch
TEMPLATE = "a chest x-ray with {labels}"
Scheduler = Literal["dpm++", "dpm++-sde", "ddim", "ddpm", "euler", "euler-a", "unipc", "pndm"]  # sd_base.SCHEDULERS
Place = Literal["down", "mid", "up"]


@dataclass(frozen=True)
class SDAttentionConfig:
    """Options of the sd-attention generator: the base, its training, prompts, sampling and attention."""

    base: str = option(
        SMALL, "'small': train a small text-conditioned base on your images (offline, CPU-sized); else a local "
               "Stable-Diffusion-style diffusers folder (e.g. SD 1.5) or a hub id, used as is. At run time 'small' "
               "means the base the checkpoint names.")
    resolution: int = option(
        0, "Image size in px; 0: 64 for the small base, the base's own size (512 for SD 1.5) otherwise, and at "
           "run time the checkpoint's.")
    small_base: Literal["pixel", "latent"] = option(
        "pixel", "Small base in pixel space, or on the latents of a small VAE trained first (larger images).")
    base_widths: tuple[int, ...] = option((32, 64, 64), "UNet channel widths of the small base, one per level.")
    base_steps: int = option(1000, "Training steps of the small base (its UNet and text encoder).")
    vae_steps: int = option(500, "Training steps of the small base's VAE (latent small base only).")
    base_lr: float = option(3e-4, "Learning rate of the small base and of grounding.")
    batch_size: int = option(8, "Training batch size.")
    grounding_steps: int | None = option(
        None, "Steps fine-tuning the base with a token-grounding loss on the real masks, so that the class word's "
              "cross-attention covers the class (see docs/diffmask.md); None: 300 for the small base, 0 for a "
              "given base (used as is, as in the paper).")
    grounding_weight: float = option(1.0, "Weight of the grounding loss beside the denoising loss.")
    prompt_template: str = option(
        TEMPLATE, "Prompt template; {labels} becomes the class words (dataset.json label names). The training "
                  "prompt of the small base, and the sampling prompt unless 'prompt' or a prompt bank is given.")
    checkpoint_every: int = option(250, "Write a resumable checkpoint every this many steps (and at the end).")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option(
        "auto", "Mixed precision on CUDA ('auto': fp16 on CUDA, full precision on CPU); also the sampling dtype.")
    seed: int = option(0, "Training seed.")
    prompt: str = option("", "Sampling prompt; empty: the condition's prompt, else a prompt-bank entry, else the "
                             "template with the class words.")
    prompt_bank: tuple[str, ...] = option(
        (), "Retrieval-style prompts (DiffuMask): each sample draws one with its own seed. Every prompt must "
            "contain the token words.")
    prompt_bank_file: str = option("", "A text file of more bank prompts, one per line ('#' starts a comment).")
    tokens: tuple[str, ...] = option(
        (), "Prompt words whose cross-attention makes the soft mask; empty: the foreground class names.")
    negative_prompt: str = option("", "Negative prompt (used with guidance_scale > 1).")
    guidance_scale: float = option(3.0, "Classifier-free guidance; <= 1 turns it off (7.5 is usual for SD 1.5).")
    scheduler: Scheduler = option("dpm++", "Sampling scheduler; 'dpm++' is DPM-Solver++ (2M).")
    sampling_steps: int = option(25, "Denoising steps.")
    attention_places: tuple[Place, ...] = option(
        ("down", "mid", "up"), "UNet parts whose cross-attention layers are read.")
    attention_resolutions: tuple[int, ...] = option(
        (), "Attention map sizes (cells per side) that are read, e.g. 8,16,32,64 at 512 px; empty: all.")
    attention_steps: tuple[float, float] = option(
        (0.0, 1.0), "The (from, to) fraction of the denoising steps whose maps are averaged, 0 = the noisiest.")

    def __post_init__(self) -> None:
        if not self.base.strip():
            raise ConfigError("base must be 'small', a folder or a hub id, got ''")
        if self.resolution < 0 or self.resolution % 8:
            raise ConfigError(f"resolution must be 0 (automatic) or a positive multiple of 8, got {self.resolution}")
        if len(self.base_widths) < 2 or any(w < 4 or w % 4 for w in self.base_widths):
            raise ConfigError(f"base_widths must be 2 or more multiples of 4, got {self.base_widths}")
        for name in ("base_steps", "vae_steps", "batch_size", "checkpoint_every", "sampling_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grounding_steps is not None and self.grounding_steps < 0:
            raise ConfigError(f"grounding_steps must be >= 0 (or None), got {self.grounding_steps}")
        if not self.base_lr > 0 or self.grounding_weight < 0:
            raise ConfigError(f"base_lr must be > 0 and grounding_weight >= 0, got {self.base_lr} and "
                              f"{self.grounding_weight}")
        if "{labels}" not in self.prompt_template:
            raise ConfigError(f"prompt_template must contain {{labels}}, got {self.prompt_template!r}")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not self.attention_places:
            raise ConfigError("attention_places must name at least one of down, mid, up")
        if any(r < 1 for r in self.attention_resolutions):
            raise ConfigError(f"attention_resolutions must be positive, got {self.attention_resolutions}")
        lo, hi = self.attention_steps
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"attention_steps must be (from, to) with 0 <= from < to <= 1, got "
                              f"{self.attention_steps}")
        if self.prompt_bank_file and not Path(self.prompt_bank_file).expanduser().is_file():
            raise ConfigError(f"prompt_bank_file {self.prompt_bank_file!r}: file not found")

    def attention(self) -> AttentionOptions:
        """The attention-reading options."""
        from .attention import AttentionOptions

        return AttentionOptions(self.attention_places, self.attention_resolutions, self.attention_steps)

    def grounding(self) -> int:
        """Grounding steps with the automatic default resolved."""
        if self.grounding_steps is not None:
            return self.grounding_steps
        return 300 if self.base == SMALL else 0


def read_bank(config: SDAttentionConfig) -> list[str]:
    """The prompt bank: the option's prompts, then the file's lines (blank lines and '#' comments skipped)."""
    bank = [p.strip() for p in config.prompt_bank if p.strip()]
    if config.prompt_bank_file:
        for line in Path(config.prompt_bank_file).expanduser().read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                bank.append(line)
    return bank


class SDAttentionGenerator(Generator):
    """Stable-Diffusion-style text-to-image whose class-word cross-attention (eq. 2) is the sample's soft mask."""

    Config = SDAttentionConfig
    trainable = True
    requires: frozenset[str] = frozenset()
    makes = frozenset({"soft_mask"})
    recipe = {  # CPU-sized DiffMask: small base + grounding, attention masks thresholded then CRF-refined
        "train": {"base_steps": 200, "grounding_steps": 200},
        "generator": {"sampling_steps": 20},
        "refiners": [{"name": "adaptive-threshold"}, {"name": "densecrf"}],
    }

    def fit(self, dataset: Dataset, workdir: Path) -> Path:
        from .training import train

        return train(self, dataset, Path(workdir))

    def networks(self) -> list[Any]:
        """The base UNet, once loaded."""
        base = getattr(self, "base", None)
        return [] if base is None or isinstance(base, str) else [base.unet]

    def load(self, checkpoint: Path) -> None:
        from medsynth_plugins.common.sd_base import check_size, load_sd_base, sampling_dtype

        checkpoint = Path(checkpoint)
        card = read_checkpoint_card(checkpoint, expected=self.name)
        device = self.context.device
        dtype = sampling_dtype(self.config.mixed_precision, device)
        base_ref = card.get("base")
        if self.config.base != SMALL:
            base_ref = self.config.base
        if not base_ref:
            raise CheckpointError(f"{checkpoint}: names no base; finish `medsynth train {self.name}`")
        inside = checkpoint / base_ref
        self.base = load_sd_base(inside if inside.is_dir() else base_ref, device=device, dtype=dtype)
        self.dtype = dtype
        self.size = self.config.resolution or int(card.get("resolution") or self.base.resolution)
        check_size(self.base, self.size)
        self.labels = {str(k): int(v) for k, v in card.get("labels", {"background": 0, "foreground": 1}).items()}
        self.channels = int(card.get("channels", self.base.image_channels))
        self.template = self.config.prompt_template
        self.bank = read_bank(self.config)
        self.words = list(self.config.tokens) or self.class_words()
        for prompt in [*self.bank, *([self.config.prompt] if self.config.prompt else [])]:
            self._check_prompt(prompt)

    def class_words(self) -> list[str]:
        """The foreground class names, as written in prompts."""
        from medsynth_plugins.common.sd_base import label_words

        return [w.replace("_", " ") for w in label_words(None, self.labels)]

    def _check_prompt(self, prompt: str) -> None:
        from .attention import token_positions

        token_positions(self.base.tokenizer, prompt, self.words)

    def prompt_for(self, condition: Condition, seed: int) -> str:
        """The condition's prompt, else ``prompt``, else a bank prompt drawn with the seed, else the template."""
        if condition.prompt:
            return condition.prompt
        if self.config.prompt:
            return self.config.prompt
        if self.bank:
            return self.bank[int(numpy_rng(seed).integers(len(self.bank)))]
        return self.template.replace("{labels}", " and ".join(self.class_words()))

    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        if not hasattr(self, "base"):
            raise PipelineError(f"{self.name}: call load(checkpoint) before generate()")
        from .sampling import sample_with_attention

        prompts = [self.prompt_for(c, s) for c, s in zip(conditions, seeds)]
        images, soft, _ = sample_with_attention(
            self.base, prompts, [self.config.negative_prompt] * len(prompts), self.words, seeds, self.size,
            scheduler=self.config.scheduler, steps=self.config.sampling_steps,
            guidance=self.config.guidance_scale, options=self.config.attention(), dtype=self.dtype)
        out = []
        for image, mask, prompt in zip(images, soft, prompts):
            out.append(Sample(image=to_image(image, self.channels), soft_mask=np.ascontiguousarray(mask),
                              meta={"prompt": prompt}))
        return out

    def real_attention(self, images: Sequence[np.ndarray], timesteps: Sequence[int], seeds: Sequence[int],
                       prompts: Sequence[str] | None = None) -> list[np.ndarray]:
        """Soft masks of real images from the loaded base's attention (each at its image's size).

        The images are resized to the generator's size, noised to each of ``timesteps`` and denoised once
        with the prompt (default: the template with the class words); see
        :func:`attention.real_image_attention`.
        """
        if not hasattr(self, "base"):
            raise PipelineError(f"{self.name}: call load(checkpoint) before real_attention()")
        from .sampling import real_soft_masks

        prompts = list(prompts) if prompts is not None else [self.prompt_for(Condition(), s) for s in seeds]
        for prompt in set(prompts):
            self._check_prompt(prompt)
        return real_soft_masks(self.base, images, prompts, self.words, timesteps, seeds, self.size,
                               self.config.attention())


def to_image(image: Any, channels: int) -> np.ndarray:
    """C x H x W array in [0, 1] -> float32 H x W (grey) or H x W x 3."""
    arr = np.asarray(image, dtype=np.float32)
    if channels == 1:
        arr = arr.mean(axis=0)
    else:
        arr = np.moveaxis(arr[:3] if len(arr) >= 3 else np.repeat(arr[:1], 3, 0), 0, -1)
    return np.clip(arr, 0.0, 1.0).astype(np.float32)
