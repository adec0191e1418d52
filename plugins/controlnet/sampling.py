"""Drawing images with a ControlNet: diffusers' StableDiffusionControlNetPipeline for latent bases, the
plain loop of ``sd_base.denoise`` with the ControlNet's residuals for pixel-space bases."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medsynth_plugins.common.sd_base import SDBase, denoise, initial_noise, make_scheduler, step_generators


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: scheduler, steps, guidance and how strongly the mask steers."""

    scheduler: str = "dpm++"
    steps: int = 25
    guidance: float = 3.0
    conditioning_scale: float = 1.0


class ControlNetSampler:
    """A base and a ControlNet ready to draw images for condition images and prompts."""

    def __init__(self, base: SDBase, controlnet: Any, dtype: torch.dtype = torch.float32) -> None:
        self.base, self.controlnet, self.dtype = base, controlnet, dtype
        self._pipe = None

    @property
    def device(self) -> torch.device:
        return self.base.unet.device

    @torch.no_grad()
    def sample(self, conditions: torch.Tensor, prompts: Sequence[str], negatives: Sequence[str],
               seeds: Sequence[int], size: int, options: SamplingOptions) -> torch.Tensor:
        """N x C x size x size images in [0, 1]; image ``k`` depends on ``seeds[k]`` alone (not on the batch)."""
        self.controlnet.eval()
        conditions = conditions.to(self.device, self.dtype)
        scheduler = make_scheduler(options.scheduler, self.base.scheduler.config)
        if self.base.latent:
            return self._pipeline(scheduler, conditions, prompts, negatives, seeds, size, options)
        embeddings = self.base.encode_prompts(prompts, self.device)
        negative = self.base.encode_prompts(negatives, self.device) if options.guidance > 1.0 else None

        def residuals(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> dict[str, Any]:
            cond = conditions.repeat(len(x) // len(conditions), 1, 1, 1)  # guidance doubles the batch
            down, mid = self.controlnet(x, t, encoder_hidden_states=context.to(self.dtype), controlnet_cond=cond,
                                        conditioning_scale=options.conditioning_scale, return_dict=False)
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        return denoise(self.base, scheduler, embeddings=embeddings, negative=negative, size=size, seeds=seeds,
                       steps=options.steps, guidance=options.guidance, residuals=residuals, dtype=self.dtype)

    def _pipeline(self, scheduler, conditions, prompts, negatives, seeds, size, options) -> torch.Tensor:
        from diffusers import StableDiffusionControlNetPipeline

        base = self.base
        pipe = StableDiffusionControlNetPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            controlnet=self.controlnet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        gens = step_generators(seeds)
        cells = size // base.vae_factor
        # our own per-sample noise, drawn on the CPU: the same images on any device and in any batch
        latents = initial_noise((base.unet.config.in_channels, cells, cells), gens).to(self.device, self.dtype)
        out = pipe(prompt=list(prompts), negative_prompt=list(negatives), image=conditions, height=size, width=size,
                   num_inference_steps=options.steps, guidance_scale=options.guidance,
                   controlnet_conditioning_scale=options.conditioning_scale, generator=gens, latents=latents,
                   output_type="pt")
        return out.images.float().clamp(0, 1)
