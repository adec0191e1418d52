"""DDPM arithmetic shared by training, sampling, RePaint and styling: the paper's linear 1000-step schedule.

Image+mask pairs live in model space as one tensor of ``channels + 1`` planes in [-1, 1]: the
image channels, then the mask as -1 (background) / +1 (lesion).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_plugins.common.images import image_batch, mask_batch

TRAIN_STEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02

SchedulerName = Literal["ddpm", "ddim", "dpm-solver++"]


class Schedule:
    """The linear beta schedule (Ho et al.; the paper's ``noise_schedule = "linear"``) as float64 tables."""

    def __init__(self, steps: int = TRAIN_STEPS) -> None:
        self.steps = steps
        self.betas = torch.linspace(BETA_START, BETA_END, steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_variance = self.betas * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t = 0; guided-diffusion clips its log to the value at t = 1
        self.posterior_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_coef1 = self.betas * prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_coef2 = (1.0 - prev) * (1.0 - self.betas).sqrt() / (1.0 - self.alphas_cumprod)

    def abar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t broadcast to ``like`` (ᾱ = 1 for t < 0, the end of the chain)."""
        t = torch.as_tensor(t).long().reshape(-1).cpu()
        values = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones_like(t, dtype=torch.float64))
        return _broadcast(values, like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (equation 1 of the paper's appendix)."""
        abar = self.abar(t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Tweedie's estimate of the clean pair from x_t and the predicted noise."""
        abar = self.abar(t, xt)
        return (xt - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def step_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: int, t_prev: int,
                       var_values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of p(x_{t_prev} | x_t) on a respaced chain, for a given x_0 estimate.

        ``var_values`` (the learned half of the model output, in [-1, 1]) interpolates the log
        variance between the posterior variance and β, as Nichol & Dhariwal's learned range does;
        without it the posterior ("fixed small") variance is used.
        """
        abar_t = self.abar(t, xt)
        abar_p = self.abar(t_prev, xt)
        beta = 1.0 - abar_t / abar_p
        coef1 = beta * abar_p.sqrt() / (1.0 - abar_t)
        coef2 = (1.0 - abar_p) * (1.0 - beta).sqrt() / (1.0 - abar_t)
        mean = coef1 * x0 + coef2 * xt
        posterior = beta * (1.0 - abar_p) / (1.0 - abar_t)
        # the last step has no posterior variance; its variance only scales guidance, so use β there
        min_log = torch.log(torch.where(posterior > 0, posterior, beta))
        if var_values is None:
            return mean, min_log.exp()
        frac = (var_values + 1.0) / 2.0
        return mean, (frac * beta.log() + (1.0 - frac) * min_log).exp()


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.to(device=like.device, dtype=like.dtype)
    if values.numel() == 1:
        values = values.expand(like.shape[0])
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def split_output(output: torch.Tensor, planes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The predicted noise and, for a learned-variance model, its variance values."""
    if output.shape[1] == 2 * planes:
        eps, var_values = output.split(planes, dim=1)
        return eps, var_values
    return output, None


def hybrid_loss(schedule: Schedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DDPM loss: noise MSE, plus the variational bound for the variance when it is learned.

    Mirrors guided-diffusion with ``learn_sigma=True, use_kl=False``: loss = MSE(ε, ε_θ) + L_vb,
    where L_vb (in bits per dimension) trains only the variance (the mean is detached), as in
    Nichol & Dhariwal. Returns (loss, mse, vb).
    """
    planes = x0.shape[1]
    eps, var_values = split_output(output.float(), planes)
    mse = (noise - eps).pow(2).mean()
    if var_values is None:
        return mse, mse.detach(), torch.zeros((), device=x0.device)
    idx = t.long().cpu()
    frozen_x0 = schedule.predict_x0(xt, t, eps.detach())
    coef1 = _broadcast(schedule.posterior_coef1[idx], x0)
    coef2 = _broadcast(schedule.posterior_coef2[idx], x0)
    true_mean = coef1 * x0 + coef2 * xt
    model_mean = coef1 * frozen_x0 + coef2 * xt
    true_log_var = _broadcast(schedule.posterior_log_variance[idx], x0)
    max_log = _broadcast(schedule.betas[idx].log(), x0)
    frac = (var_values + 1.0) / 2.0
    model_log_var = frac * max_log + (1.0 - frac) * true_log_var
    kl = _normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=(1, 2, 3))
    vb = torch.where(t.to(x0.device) == 0, nll / math.log(2.0), kl).mean()
    return mse + vb, mse.detach(), vb.detach()


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of 8-bit data under a Gaussian discretised to bins of width 2/255 (Ho et al.)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def make_scheduler(name: SchedulerName, learn_sigma: bool):
    """A diffusers scheduler for the training schedule; only DDPM uses the learned variance."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = {"num_train_timesteps": TRAIN_STEPS, "beta_start": BETA_START, "beta_end": BETA_END,
              "beta_schedule": "linear"}
    if name == "ddpm":
        # "linspace" spacing reproduces guided-diffusion's timestep respacing (first step at t = 999)
        return DDPMScheduler(**common, variance_type="learned_range" if learn_sigma else "fixed_small",
                             clip_sample=True, timestep_spacing="linspace")
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    # x0 clipped to [-1, 1] at every step, as DDPM and DDIM do here (DPM-Solver++'s thresholding with a
    # maximum of 1): without it a pixel-space model that is not yet converged drifts out of range
    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, thresholding=True,
                                       sample_max_value=1.0)


def jump_schedule(start: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's time schedule over respaced steps ``start - 1 ... 0``, with resampling jumps.

    Every ``jump_length`` steps the chain goes back up ``jump_length`` steps, ``jump_n_sample - 1``
    times (Lugmayr et al., and diffusers' ``RePaintScheduler.set_timesteps``); ``start`` below the
    full length lets inpainting begin from the noised real pair, as the paper's ``skip_timesteps`` does.
    """
    jumps = {j: jump_n_sample - 1 for j in range(0, start - jump_length, jump_length)}
    t, times = start, []
    while t >= 1:
        t -= 1
        times.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    return times


def pairs_to_tensor(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], size: int,
                    channels: int) -> torch.Tensor:
    """N x (channels + 1) x size x size in [-1, 1]: images resized bilinearly, masks (any label = lesion) nearest."""
    x = image_batch(list(images), size, channels) * 2.0 - 1.0
    m = (mask_batch(list(masks), size) > 0).float()[:, None] * 2.0 - 1.0
    return torch.cat([x, m], dim=1)


def image_to_numpy(x: torch.Tensor, channels: int) -> np.ndarray:
    """One model-space image (channels x H x W in [-1, 1]) as a float32 array in [0, 1] (H x W for grey)."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0).numpy()
    arr = arr[0] if channels == 1 else np.moveaxis(arr, 0, -1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def soft_mask_to_numpy(plane: torch.Tensor) -> np.ndarray:
    """A model-space mask plane as a float32 foreground probability in [0, 1]."""
    return np.ascontiguousarray(((plane.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0).numpy(), dtype=np.float32)


def resize_planes(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize N x C x h x w to ``size`` bilinearly (antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def match_channels(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``image`` with the channel layout of ``like`` (grey H x W or H x W x C)."""
    if like.ndim == 2 and image.ndim == 3:
        return np.ascontiguousarray(image.mean(axis=2), dtype=np.float32)
    if like.ndim == 3 and image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[..., None], like.shape[2], axis=2), dtype=np.float32)
    return image
