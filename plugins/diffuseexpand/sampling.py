"""Stage III: sampling masks (y1 = 0) and mask-conditioned images (y1 = 1) with guidance.

One loop serves both phases and both samplers: DPM-Solver++ (diffusers'
``DPMSolverMultistepScheduler``, ~20 steps) and the ancestral DDPM sampler (every training
timestep) for comparison. At every step the noise prediction is

    eps = eps_u + w (eps_c - eps_u)                      classifier-free guidance (w = cfg_scale)
    eps_hat = eps - lambda * sigma_t * grad_x L(x_t, t)  classifier guidance (Dhariwal & Nichol)

and ``scheduler.step`` receives ``eps_hat``. ``L`` is the log-likelihood the Stage II segmenter
gives the target: ``log p(y1 | x_t)`` from its image-or-mask head, plus, for images, the sum over
pixels of ``log p(y2 | x_t)`` for the conditioning mask ``y2``. Its two forms are the paper's
temperature form ``log p(y | f(x_t) / tau)`` and the gradient-scale form ``s log p(y | f(x_t))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from medsynth_core import ConfigError, option

Guidance = Literal["tau", "scale", "none"]


@dataclass(frozen=True)
class SamplingOptions:
    """Options shared by the two sampling phases."""

    sampler: Literal["dpm-solver++", "ddpm"] = option(
        "dpm-solver++", "Sampling: 'dpm-solver++' (fast ODE solver) or 'ddpm' (ancestral, every training timestep).")
    solver_steps: int = option(20, "Sampling: DPM-Solver++ steps ('ddpm' always runs every training timestep).")
    solver_order: int = option(2, "Sampling: DPM-Solver++ order, 1-3 (2 is the usual choice with guidance).")
    guidance: Guidance = option(
        "tau", "Sampling: classifier guidance by the Stage II segmenter: 'tau' = grad log p(y | f(x_t)/tau) "
        "(the paper's), 'scale' = s * grad log p(y | f(x_t)) (Dhariwal & Nichol), 'none'.")
    tau: float = option(1.0, "Sampling: temperature tau of guidance='tau' (the paper tries 1, 0.5, 0.3333).")
    scale: float = option(1.0, "Sampling: gradient scale s of guidance='scale' (s = 1/tau compares the two forms).")
    guidance_weight: float = option(
        0.3, "Sampling: lambda, multiplies the classifier-guidance gradient of either form (the authors' "
             "guidance_scale); larger values follow the segmenter more closely, into its errors.")
    clip_x0: bool = option(True, "Sampling: clip every x0 prediction to [-1, 1] (DPM-Solver++ thresholding, "
                                 "DDPM clip_sample), as the authors' sampler does.")

    def __post_init__(self) -> None:
        if self.solver_steps < 1:
            raise ConfigError(f"solver_steps must be >= 1, got {self.solver_steps}")
        if not 1 <= self.solver_order <= 3:
            raise ConfigError(f"solver_order must be 1, 2 or 3, got {self.solver_order}")
        for name in ("tau", "scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.guidance_weight < 0:
            raise ConfigError(f"guidance_weight must be >= 0, got {self.guidance_weight}")


def make_scheduler(train_config: dict, opts: SamplingOptions) -> DPMSolverMultistepScheduler | DDPMScheduler:
    """A fresh sampling scheduler on the training noise schedule (schedulers keep per-run state)."""
    if opts.sampler == "ddpm":
        return DDPMScheduler.from_config(train_config, clip_sample=opts.clip_x0, clip_sample_range=1.0,
                                         variance_type="fixed_small")
    # thresholding with sample_max_value 1 clips x0 to [-1, 1]: the authors' dynamic thresholding at ratio 1
    return DPMSolverMultistepScheduler.from_config(
        train_config, algorithm_type="dpmsolver++", solver_order=opts.solver_order, thresholding=opts.clip_x0,
        sample_max_value=1.0, lower_order_final=True)


def log_likelihood(segmenter: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, *, is_image: bool,
                   target: torch.Tensor | None, classes: int, form: Guidance, tau: float, scale: float,
                   type_term: bool = True) -> torch.Tensor:
    """Per-sample log p(y1, y2 | x_t) in the chosen form (N).

    ``target`` (N x H x W class indices) adds the mask term; ``type_term`` the image-or-mask term.
    """
    logits, type_logit = segmenter(x, t)
    temperature, factor = (1.0 / tau, 1.0) if form == "tau" else (1.0, scale)
    total = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
    if type_term:
        sign = 1.0 if is_image else -1.0
        total = total + F.logsigmoid(sign * type_logit.float() * temperature)
    if target is not None:
        z = logits.float() * temperature
        if classes == 2:
            fg = target.float()[:, None]
            total = total - F.binary_cross_entropy_with_logits(z, fg, reduction="none").sum((1, 2, 3))
        else:
            total = total + F.log_softmax(z, dim=1).gather(1, target[:, None]).sum((1, 2, 3))
    return factor * total


def guidance_gradient(segmenter: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
    """grad_x of ``log_likelihood`` at x (each sample's gradient depends on that sample alone)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        value = log_likelihood(segmenter, leaf, t, **kwargs).sum()
        if not value.requires_grad:  # a segmenter whose output ignores x gives no direction
            return torch.zeros_like(x)
        (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


@dataclass
class Phase:
    """What one sampling phase feeds the denoiser and the guidance."""

    y1: int  # 0: masks, 1: images
    condition: torch.Tensor | None = None  # N x 1 x H x W mask values for images
    target: torch.Tensor | None = None  # N x H x W class indices the segmenter should see
    cfg_scale: float = 1.0
    type_guidance: bool = True


def initial_noise(shape: Sequence[int], seeds: Sequence[int], device: str,
                  make_generator: Callable[[int, str], torch.Generator]) -> tuple[torch.Tensor, list]:
    """x_T of sample k from its own generator, so a sample does not depend on its batch."""
    generators = [make_generator(seed, device) for seed in seeds]
    noise = torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in generators])
    return noise, generators


@torch.no_grad()
def sample(denoiser: torch.nn.Module, segmenter: torch.nn.Module | None, train_config: dict,
           opts: SamplingOptions, phase: Phase, noise: torch.Tensor, generators: list, classes: int,
           on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Denoise ``noise`` (N x C x H x W) into x_0 in [-1, 1] for one phase."""
    scheduler = make_scheduler(train_config, opts)
    if opts.sampler == "ddpm":
        scheduler.set_timesteps(scheduler.config.num_train_timesteps, device=noise.device)
    else:
        scheduler.set_timesteps(opts.solver_steps, device=noise.device)
    alphas_cumprod = scheduler.alphas_cumprod.to(noise.device)
    x = noise * scheduler.init_noise_sigma
    n = x.shape[0]
    labels = torch.full((n,), phase.y1, dtype=torch.long, device=x.device)
    empty = torch.zeros_like(x[:, :1])
    guided = segmenter is not None and opts.guidance != "none" and opts.guidance_weight > 0 and (
        phase.type_guidance or phase.target is not None)
    for t in scheduler.timesteps:
        tt = torch.full((n,), int(t), dtype=torch.long, device=x.device)
        eps = _noise_prediction(denoiser, x, tt, labels, phase, empty)
        if guided:
            grad = guidance_gradient(segmenter, x, tt, is_image=bool(phase.y1), target=phase.target, classes=classes,
                                     form=opts.guidance, tau=opts.tau, scale=opts.scale,
                                     type_term=phase.type_guidance)
            sigma = (1.0 - alphas_cumprod[int(t)]).sqrt()
            eps = eps - opts.guidance_weight * sigma * grad
        if opts.sampler == "ddpm":
            x = scheduler.step(eps, t, x, generator=generators).prev_sample
        else:
            x = scheduler.step(eps, t, x).prev_sample
        if on_step is not None:
            on_step()
    return x.clamp(-1.0, 1.0)


def _noise_prediction(denoiser, x, t, labels, phase: Phase, empty) -> torch.Tensor:
    if phase.condition is None:
        return denoiser(torch.cat([x, empty], 1), t, class_labels=labels).sample
    if phase.cfg_scale == 1.0:
        return denoiser(torch.cat([x, phase.condition], 1), t, class_labels=labels).sample
    both = torch.cat([torch.cat([x, phase.condition], 1), torch.cat([x, empty], 1)])
    eps_c, eps_u = denoiser(both, torch.cat([t, t]), class_labels=torch.cat([labels, labels])).sample.chunk(2)
    return eps_u + phase.cfg_scale * (eps_c - eps_u)
