"""Stages I and II: one training step of the denoiser (eq. 3) and of the noisy segmenter (eq. 4).

Both networks see the same batch each step: with ``y1 ~ Bernoulli(0.5)`` per pair, the noisy
input x_t is the image (y1 = 1) or its mask (y1 = 0) at a uniform timestep.

- Denoiser: MSE between its noise prediction and the noise. For images the mask enters the
  condition channel, dropped to "empty" with probability ``cond_drop`` so the same network
  also predicts unconditionally (classifier-free guidance); for masks the condition is empty.
- Segmenter: for images, Dice + BCE of its mask prediction against the mask; for both, BCE of
  its image-or-mask head against y1.

Training goes through accelerate: with several processes each draws its own batches and the
gradients are averaged; a step is one update of each network, over ``grad_accum`` batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from medsynth_core import ConfigError, Context, Dataset
from medsynth_core.training import make_accelerator, step_generator
from medsynth_plugins.common.images import image_batch, mask_batch

from .networks import NoisySegmenter, encode_masks, segmentation_loss


@dataclass
class TrainingSet:
    """The real pairs as tensors: images in [-1, 1] and masks as class indices."""

    images: torch.Tensor  # N x C x S x S
    masks: torch.Tensor  # N x S x S, int64 class indices
    values: list[int]  # mask value of each class index
    channels: int

    @property
    def classes(self) -> int:
        return len(self.values)


def training_set(dataset: Dataset, size: int) -> TrainingSet:
    """Resize the labelled pairs of ``dataset`` to ``size`` and encode them for training."""
    samples = [dataset[i] for i in dataset.labelled()]
    if not samples:
        raise ConfigError(f"dataset {dataset.name!r} has no image with a mask; DiffuseExpand trains on pairs")
    values = sorted(dataset.label_values)
    channels = 3 if any(s.image.ndim == 3 for s in samples) else 1
    images = image_batch([s.image for s in samples], size, channels) * 2.0 - 1.0
    lookup = torch.zeros(256, dtype=torch.long)
    lookup[torch.tensor(values)] = torch.arange(len(values))
    masks = lookup[mask_batch([s.mask for s in samples], size)]
    return TrainingSet(images, masks, values, channels)


def class_lookup(values: list[int]) -> np.ndarray:
    """A 256-entry table from mask value to class index (-1 for values the model does not know)."""
    table = np.full(256, -1, dtype=np.int64)
    table[np.asarray(values)] = np.arange(len(values))
    return table


@dataclass
class StepLosses:
    diffusion: float
    segmentation: float
    type: float


class Trainer:
    """Updates the denoiser and the segmenter, one batch at a time, through an accelerate ``Accelerator``.

    The batches of step ``k`` come from the CPU generator of (seed, k, process): processes see
    different batches, a run is the same on any device, and a resumed run (``start``) draws what
    an uninterrupted one would. ``denoiser`` and ``segmenter`` stay the plain modules (what is
    saved); the training runs through their prepared (possibly data-parallel) wrappers. Without an
    ``accelerator``, one for ``device`` in a single process is made.
    """

    def __init__(self, denoiser: torch.nn.Module, segmenter: NoisySegmenter, scheduler: DDPMScheduler,
                 data: TrainingSet, *, lr: float, batch_size: int, cond_drop: float, device: str,
                 seed: int, accelerator=None, start: int = 0) -> None:
        self.accelerator = accelerator if accelerator is not None else make_accelerator(Context(device=device))
        acc = self.accelerator
        self.denoiser, self.segmenter, self.scheduler, self.data = denoiser, segmenter, scheduler, data
        self.batch_size, self.cond_drop, self.seed, self.done = batch_size, cond_drop, seed, start
        self.denoiser.to(acc.device).train()
        self.segmenter.to(acc.device).train()
        (self._denoiser, self._segmenter, self.opt_denoiser, self.opt_segmenter) = acc.prepare(
            denoiser, segmenter, torch.optim.Adam(denoiser.parameters(), lr=lr),
            torch.optim.Adam(segmenter.parameters(), lr=lr))
        self.alphas_cumprod = scheduler.alphas_cumprod.to(acc.device)

    def networks(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The denoiser and the segmenter without their accelerate wrappers, to save."""
        return self.accelerator.unwrap_model(self._denoiser), self.accelerator.unwrap_model(self._segmenter)

    def state(self) -> dict:
        return {"opt_denoiser": self.opt_denoiser.state_dict(), "opt_segmenter": self.opt_segmenter.state_dict()}

    def restore(self, state: dict) -> None:
        """Load the optimiser states of a checkpoint (an older one's random state is not needed)."""
        for optimiser, key in ((self.opt_denoiser, "opt_denoiser"), (self.opt_segmenter, "opt_segmenter")):
            lr = optimiser.param_groups[0]["lr"]
            optimiser.load_state_dict(state[key])
            for group in optimiser.param_groups:  # the saved state carries the old rate; the caller's wins
                group["lr"] = lr

    def step(self) -> StepLosses:
        """One update of both networks, on ``grad_accum`` fresh random batches of this process."""
        acc = self.accelerator
        rng = step_generator(self.seed, self.done, acc.process_index)
        totals = np.zeros(3)
        for _ in range(acc.gradient_accumulation_steps):
            totals += self._batch_step(rng)
        self.done += 1
        return StepLosses(*(totals / acc.gradient_accumulation_steps).tolist())

    def _batch_step(self, rng: torch.Generator) -> tuple[float, float, float]:
        # every random number comes from the CPU generator, so a run is the same on any device
        acc, n_data = self.accelerator, len(self.data.images)
        pick = torch.randint(n_data, (self.batch_size,), generator=rng)
        y1 = (torch.rand(self.batch_size, generator=rng) < 0.5).long()
        keep = (torch.rand(self.batch_size, generator=rng) >= self.cond_drop).float()
        t = torch.randint(self.scheduler.config.num_train_timesteps, (self.batch_size,), generator=rng)
        images, masks = self.data.images[pick], self.data.masks[pick]
        noise = torch.randn(images.shape, generator=rng)
        images, masks, y1, keep, t, noise = (v.to(acc.device) for v in (images, masks, y1, keep, t, noise))

        mask_values = encode_masks(masks, self.data.classes, self.data.channels)
        is_image = y1.float()[:, None, None, None]
        x0 = is_image * images + (1 - is_image) * mask_values
        a = self.alphas_cumprod[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        condition = mask_values[:, :1] * (is_image * keep[:, None, None, None])  # zeros = no condition
        with acc.accumulate(self._denoiser, self._segmenter):
            # one backward and update per network: accelerate's fp16 scaler updates after each optimiser
            with acc.autocast():
                eps = self._denoiser(torch.cat([xt, condition], 1), t, class_labels=y1).sample
            loss_diffusion = F.mse_loss(eps.float(), noise)
            acc.backward(loss_diffusion)
            self.opt_denoiser.step()  # accelerate skips it until the last batch of the step
            self.opt_denoiser.zero_grad(set_to_none=True)

            with acc.autocast():
                logits, type_logit = self._segmenter(xt, t)
            per_sample = segmentation_loss(logits.float(), masks, self.data.classes)
            images_seen = y1.float()
            loss_seg = (per_sample * images_seen).sum() / images_seen.sum().clamp(min=1.0)
            loss_type = F.binary_cross_entropy_with_logits(type_logit.float(), images_seen)
            acc.backward(loss_seg + loss_type)
            self.opt_segmenter.step()
            self.opt_segmenter.zero_grad(set_to_none=True)
        return loss_diffusion.item(), loss_seg.item(), loss_type.item()
