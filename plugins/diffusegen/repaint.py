"""``repaint``: regenerate the lesion region of real pairs with a ddpm4 model and RePaint's resampling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from medsynth_core import Condition, ConfigError, Context, Generator, PipelineError, Sample, option, torch_generator

from .bundle import DiffusionBundle
from .diffusion import (
    BETA_END,
    BETA_START,
    TRAIN_STEPS,
    Schedule,
    image_to_numpy,
    jump_schedule,
    match_channels,
    pairs_to_tensor,
    resize_planes,
    soft_mask_to_numpy,
)

REFERENCE = "reference"  # sample.meta key: the real image a sample was made from, for refiners that need it
PAPER_SIZE = 256


@dataclass(frozen=True)
class RePaintConfig:
    """Options of the repaint generator."""

    model: str | None = option(None, "Folder of a ddpm4 checkpoint (`medsynth train ddpm4 --out FOLDER`); required.")
    dilation: int = option(20, "Grow the lesion mask by this many px at 256 px (scaled to each image's size) "
                               "and regenerate inside it (the paper: 20).")
    inference_steps: int = option(200, "Respaced diffusion steps (the paper: timestep_respacing 200).")
    skip_steps: int = option(80, "Start this many steps into the chain, from the noised real pair (the paper's "
                                 "skip_timesteps 80); 0 starts from pure noise.")
    jump_length: int = option(10, "RePaint jump length j (the paper: 10).")
    jump_n_sample: int = option(5, "RePaint resamplings r per jump (the paper: 5).")
    eta: float = option(1.0, "Noise of each reverse step: 1 = DDPM, as RePaint; 0 = deterministic DDIM.")
    max_models_in_memory: int = option(4, "Cluster models kept loaded at once.")

    def __post_init__(self) -> None:
        if self.dilation < 0:
            raise ConfigError(f"dilation must be >= 0, got {self.dilation}")
        if not 1 <= self.inference_steps <= TRAIN_STEPS:
            raise ConfigError(f"inference_steps must be 1-{TRAIN_STEPS}, got {self.inference_steps}")
        if not 0 <= self.skip_steps < self.inference_steps:
            raise ConfigError(f"skip_steps must be in [0, inference_steps), got {self.skip_steps}")
        if self.jump_length < 1 or self.jump_n_sample < 1:
            raise ConfigError(f"jump_length and jump_n_sample must be >= 1, got {self.jump_length}, "
                              f"{self.jump_n_sample}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"eta must lie in [0, 1], got {self.eta}")
        if self.max_models_in_memory < 1:
            raise ConfigError(f"max_models_in_memory must be >= 1, got {self.max_models_in_memory}")


class RePaintGenerator(Generator):
    """Inpaint the dilated lesion of real pairs, image and mask together, keeping everything outside it.

    For each real pair (mask source ``real-pairs``) the lesion mask is dilated by ``dilation`` px
    and the diffusion model of the pair's cluster regenerates image and mask inside that region
    with RePaint (Lugmayr et al.): known pixels are re-noised from the real pair at every step and
    the chain jumps back ``jump_length`` steps ``jump_n_sample - 1`` times. Outside the region the
    pair is the real one, pixel for pixel. Three samples per real pair, as in the paper, are
    ``real-pairs`` with ``order = "cycle"`` and ``n`` = 3 x pairs. Each sample keeps its real image
    in ``meta["reference"]`` for the ``diffusion-style`` refiner.
    """

    Config = RePaintConfig
    requires = frozenset({"mask", "image"})
    makes = frozenset({"soft_mask"})

    def __init__(self, config: RePaintConfig | None = None, *, context: Context | None = None, name: str = "",
                 bundle: DiffusionBundle | None = None) -> None:
        super().__init__(config, context=context, name=name)
        if bundle is None and self.config.model is None:
            raise ConfigError(f"{self.name}: option 'model' must name a ddpm4 checkpoint folder "
                              "(`medsynth train ddpm4 --out FOLDER`)")
        self.bundle = bundle or DiffusionBundle.shared(Path(self.config.model), device=self.context.device,
                                                     max_models=self.config.max_models_in_memory)
        self.bundle.on_load = self.tune  # cluster models load on demand

    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        bundle = self.bundle
        for c in conditions:
            if c.image is None or c.mask is None:
                raise PipelineError(f"{self.name}: needs conditions with an image and a mask "
                                    "(mask source 'real-pairs')")
        regions = [dilate(c.mask, self.dilation_px(c.mask.shape)) for c in conditions]
        clusters = bundle.clusters_of([c.meta.get("source") for c in conditions], [c.image for c in conditions],
                                      [c.mask for c in conditions])
        out: list[Sample | None] = [None] * len(conditions)
        todo = [i for i, r in enumerate(regions) if r.any()]
        for i in set(range(len(conditions))) - set(todo):  # no lesion: nothing to regenerate
            c = conditions[i]
            out[i] = Sample(image=c.image.astype(np.float32), soft_mask=(c.mask > 0).astype(np.float32),
                            meta={"cluster": clusters[i], "inpainted_fraction": 0.0, REFERENCE: c.image})
        for cluster in sorted({clusters[i] for i in todo}):
            idx = [i for i in todo if clusters[i] == cluster]
            x = self.inpaint(cluster, [conditions[i] for i in idx], [regions[i] for i in idx], [seeds[i] for i in idx])
            for k, i in enumerate(idx):
                out[i] = self._compose(conditions[i], regions[i], x[k:k + 1], cluster)
        return out  # type: ignore[return-value]

    def dilation_px(self, shape: tuple[int, ...]) -> int:
        """The dilation radius at an image's own size (the option is given at 256 px)."""
        return int(round(self.config.dilation * min(shape[:2]) / PAPER_SIZE))

    @torch.no_grad()
    def inpaint(self, cluster: int, conditions: Sequence[Condition], regions: Sequence[np.ndarray],
                seeds: Sequence[int]) -> torch.Tensor:
        """RePaint in model space; returns B x planes x size x size in [-1, 1] (CPU)."""
        from diffusers import RePaintScheduler
        from diffusers.utils.torch_utils import randn_tensor

        cfg, bundle = self.config, self.bundle
        device = torch.device(bundle.device)
        unet = bundle.unet(cluster)
        known_pair = pairs_to_tensor([c.image for c in conditions], [c.mask for c in conditions], bundle.size,
                                     bundle.channels).to(device)
        # a model pixel is regenerated if any part of it lies in the region, so the region is fully covered
        region = resize_planes(torch.stack([torch.from_numpy(r.astype(np.float32)) for r in regions])[:, None],
                               (bundle.size, bundle.size))
        keep = (region <= 0).float().to(device)
        sched = RePaintScheduler(num_train_timesteps=TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END,
                                 beta_schedule="linear", eta=cfg.eta, clip_sample=True)
        sched.set_timesteps(cfg.inference_steps, cfg.jump_length, cfg.jump_n_sample)
        ratio = TRAIN_STEPS // cfg.inference_steps
        times = [t * ratio for t in jump_schedule(cfg.inference_steps - cfg.skip_steps, cfg.jump_length,
                                                  cfg.jump_n_sample)]
        gens = [torch_generator(s) for s in seeds]
        x = randn_tensor(tuple(known_pair.shape), generator=gens, device=device)
        if cfg.skip_steps:
            x = Schedule().q_sample(known_pair, times[0], x)
        t_last = times[0] + 1
        for t in times:
            if t < t_last:
                eps = unet(x, t).sample[:, :bundle.planes]
                x = sched.step(eps, t, x, known_pair, keep, generator=gens).prev_sample
            else:
                x = sched.undo_step(x, t_last, generator=gens)
            t_last = t
        return x.float().cpu()

    def _compose(self, condition: Condition, region: np.ndarray, x: torch.Tensor, cluster: int) -> Sample:
        bundle = self.bundle
        h, w = condition.mask.shape
        x = resize_planes(x, (h, w))[0]
        image = match_channels(image_to_numpy(x[:bundle.channels], bundle.channels), condition.image)
        inside = region[..., None] if image.ndim == 3 else region
        # outside the region the pair is the real one, bit for bit
        image = np.where(inside, image, condition.image).astype(np.float32)
        soft = np.where(region, soft_mask_to_numpy(x[bundle.channels]), (condition.mask > 0).astype(np.float32))
        return Sample(image=image, soft_mask=soft.astype(np.float32),
                      meta={"cluster": cluster, "inpainted_fraction": round(float(region.mean()), 4),
                            REFERENCE: condition.image})


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """The lesion grown by a disc of ``radius`` px (boolean H x W); empty for an empty mask."""
    lesion = np.asarray(mask) > 0
    if not lesion.any() or radius <= 0:
        return lesion
    return distance_transform_edt(~lesion) <= radius
