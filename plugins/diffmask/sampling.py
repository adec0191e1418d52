"""Sampling with the attention store attached: diffusers' StableDiffusionPipeline for latent bases, the plain
loop of ``sd_base.denoise`` for pixel-space ones; and attention of real images."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_plugins.common.images import image_batch
from medsynth_plugins.common.sd_base import SDBase, denoise, initial_noise, make_scheduler, step_generators

from .attention import AttentionOptions, AttentionStore, real_image_attention, record_attention, token_positions


@torch.no_grad()
def sample_with_attention(base: SDBase, prompts: Sequence[str], negatives: Sequence[str], words: Sequence[str],
                          seeds: Sequence[int], size: int, *, scheduler: str, steps: int, guidance: float,
                          options: AttentionOptions, dtype: torch.dtype = torch.float32
                          ) -> tuple[np.ndarray, np.ndarray, AttentionStore]:
    """Images (N x C x size x size in [0, 1]), their soft masks (N x size x size, eq. 2) for ``prompts``, and
    the store that accumulated them.

    Sample ``k`` depends on ``seeds[k]`` alone: its starting noise comes from its own generator, and the
    UNet treats batch items independently.
    """
    sched = make_scheduler(scheduler, base.scheduler.config)
    sched.set_timesteps(steps)
    calls = len(sched.timesteps)
    device = base.unet.device
    cells = size // base.vae_factor
    positions = [token_positions(base.tokenizer, p, words) for p in prompts]
    store = AttentionStore(positions, (cells, cells), calls, options)
    with record_attention(base.unet, store):
        if base.latent:
            images = _pipeline(base, sched, prompts, negatives, seeds, size, steps, guidance, dtype)
        else:
            embeddings = base.encode_prompts(list(prompts), device).to(dtype)
            negative = base.encode_prompts(list(negatives), device).to(dtype) if guidance > 1.0 else None
            images = denoise(base, sched, embeddings=embeddings, negative=negative, size=size, seeds=seeds,
                             steps=steps, guidance=guidance, dtype=dtype)
    soft = store.soft_masks((size, size))
    return images.float().cpu().numpy(), soft.cpu().numpy().astype(np.float32), store


def _pipeline(base: SDBase, scheduler, prompts, negatives, seeds, size, steps, guidance, dtype) -> torch.Tensor:
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        # small bases keep diffusers' default steps_offset 0; the pipeline warns about it at length
        warnings.filterwarnings("ignore", message=r"(?s).*steps_offset", category=FutureWarning)
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=base.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gens = step_generators(seeds)
    cells = size // base.vae_factor
    # per-sample noise drawn on the CPU: the same images on any device and in any batch
    latents = initial_noise((base.unet.config.in_channels, cells, cells), gens).to(base.unet.device, dtype)
    out = pipe(prompt=list(prompts), negative_prompt=list(negatives) if guidance > 1.0 else None, height=size,
               width=size, num_inference_steps=steps, guidance_scale=guidance, generator=gens, latents=latents,
               output_type="pt")
    return out.images.float().clamp(0, 1)


def real_soft_masks(base: SDBase, images: Sequence[np.ndarray], prompts: Sequence[str], words: Sequence[str],
                    timesteps: Sequence[int], seeds: Sequence[int], size: int, options: AttentionOptions,
                    batch_size: int = 16) -> list[np.ndarray]:
    """Attention soft masks of real images (float H x W arrays in [0, 1]), each at its image's own size."""
    out: list[np.ndarray] = []
    channels = base.image_channels
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        x = image_batch(chunk, size, channels)
        soft = real_image_attention(base, x, prompts[start:start + batch_size], words, timesteps,
                                    seeds[start:start + batch_size], options)
        for image, mask in zip(chunk, soft):
            h, w = image.shape[:2]
            t = torch.from_numpy(mask)[None, None]
            out.append(F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy())
    return out
