"""A compact style-based GAN for unsupervised masks (the paper's V2UM generator G1).

StyleGAN's ingredients at a size that trains on a CPU: a mapping network from z to w, a
learned constant, modulated 3x3 convolutions with weight demodulation, per-layer noise, a
skip architecture (the image is the sum of upsampled per-resolution outputs) with the
progressive growing of the paper (each new resolution fades in), a running mean of w for the
truncation trick, an exponential moving average of the generator for sampling, R1
regularisation and differentiable flip/translation augmentation for small sets.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .parallel import accumulate, autocast, average_buffers, backward, frozen, optimiser_step

R1_EVERY = 8


@dataclass(frozen=True)
class StyleArch:
    """Shape of the generator and discriminator."""

    size: int
    channels: int
    latent: int = 64
    mapping_layers: int = 4
    base_channels: int = 16
    max_channels: int = 128

    @property
    def levels(self) -> int:
        """Number of doublings from the 4 x 4 constant to ``size``."""
        return int(math.log2(self.size)) - 2

    def width(self, res: int) -> int:
        """Feature channels at resolution ``res``: more at low resolution, capped."""
        return min(self.max_channels, self.base_channels * self.size // res)


class EqualLinear(nn.Module):
    """Linear layer with StyleGAN's equalised learning rate (weights scaled at run time)."""

    def __init__(self, inputs: int, outputs: int, bias_init: float = 0.0, lr_mul: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, inputs) / lr_mul)
        self.bias = nn.Parameter(torch.full((outputs,), float(bias_init) / lr_mul))
        self.scale, self.lr_mul = lr_mul / math.sqrt(inputs), lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class EqualConv(nn.Module):
    """Convolution with equalised learning rate."""

    def __init__(self, inputs: int, outputs: int, kernel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, inputs, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(outputs))
        self.scale, self.pad = 1 / math.sqrt(inputs * kernel * kernel), kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.pad)


class MappingNetwork(nn.Module):
    """z -> w: pixel-normalised z through an MLP with a low learning rate (StyleGAN's 0.01)."""

    def __init__(self, latent: int, layers: int) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        for _ in range(layers):
            mods += [EqualLinear(latent, latent, lr_mul=0.01), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*mods)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8))


class ModulatedConv(nn.Module):
    """A convolution whose input channels are scaled per sample by a style from w (StyleGAN2)."""

    def __init__(self, inputs: int, outputs: int, kernel: int, latent: int, demodulate: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, outputs, inputs, kernel, kernel))
        self.affine = EqualLinear(latent, inputs, bias_init=1.0)
        self.scale, self.pad, self.demodulate = 1 / math.sqrt(inputs * kernel * kernel), kernel // 2, demodulate

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)
        weight = self.scale * self.weight[0]
        # StyleGAN2's unfused form: scale the input by the style, convolve with the shared weight and
        # scale the output by the demodulation factor; equal to per-sample weights and much faster on CPU
        out = F.conv2d(x * styles[:, :, None, None], weight, padding=self.pad)
        if self.demodulate:
            demod = torch.rsqrt((weight[None] * styles[:, None, :, None, None]).pow(2).sum(dim=(2, 3, 4)) + 1e-8)
            out = out * demod[:, :, None, None]
        return out


class StyledLayer(nn.Module):
    """Modulated 3 x 3 convolution, per-pixel noise, bias and leaky ReLU."""

    def __init__(self, inputs: int, outputs: int, latent: int) -> None:
        super().__init__()
        self.conv = ModulatedConv(inputs, outputs, 3, latent)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(1, outputs, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: Callable[[tuple[int, ...]], torch.Tensor]
                ) -> torch.Tensor:
        out = self.conv(x, w)
        out = out + self.noise_strength * noise((out.shape[0], 1, *out.shape[2:]))
        return F.leaky_relu(out + self.bias, 0.2) * math.sqrt(2)


class ToImage(nn.Module):
    """1 x 1 modulated convolution (no demodulation) to the mask's channels."""

    def __init__(self, inputs: int, channels: int, latent: int) -> None:
        super().__init__()
        self.conv = ModulatedConv(inputs, channels, 1, latent, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias


class SynthesisBlock(nn.Module):
    """Upsample x2, two styled layers, and this resolution's image output."""

    def __init__(self, inputs: int, outputs: int, channels: int, latent: int) -> None:
        super().__init__()
        self.conv1 = StyledLayer(inputs, outputs, latent)
        self.conv2 = StyledLayer(outputs, outputs, latent)
        self.to_image = ToImage(outputs, channels, latent)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class StyleGenerator(nn.Module):
    """z -> mask in [-1, 1] (approximately): mapping network, constant, styled blocks, skip outputs."""

    def __init__(self, arch: StyleArch) -> None:
        super().__init__()
        self.arch = arch
        self.mapping = MappingNetwork(arch.latent, arch.mapping_layers)
        self.const = nn.Parameter(torch.randn(1, arch.width(4), 4, 4))
        self.first = StyledLayer(arch.width(4), arch.width(4), arch.latent)
        self.first_image = ToImage(arch.width(4), arch.channels, arch.latent)
        self.blocks = nn.ModuleList(
            SynthesisBlock(arch.width(4 * 2**k), arch.width(8 * 2**k), arch.channels, arch.latent)
            for k in range(arch.levels))
        self.register_buffer("w_avg", torch.zeros(arch.latent))

    def forward(self, z: torch.Tensor, *, level: int | None = None, alpha: float = 1.0, psi: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Masks at resolution ``4 * 2**level`` (default: full size); ``psi`` < 1 truncates w toward its mean.

        ``alpha`` fades in the last level (progressive growing). Noise comes from ``generator``
        when given, so one sample's output depends on its own seed only.
        """
        level = self.arch.levels if level is None else level
        w = self.mapping(z)
        if psi != 1.0:
            w = self.w_avg + psi * (w - self.w_avg)

        def noise(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=z.device)

        x = self.first(self.const.expand(z.shape[0], -1, -1, -1), w, noise)
        image = self.first_image(x, w)
        for k, block in enumerate(self.blocks[:level]):
            x = block.conv2(block.conv1(_up(x), w, noise), w, noise)
            fade = alpha if k == level - 1 else 1.0
            image = _up(image) + fade * block.to_image(x, w)
        return image


class StyleDiscriminator(nn.Module):
    """Mirror of the generator: per-resolution inputs (for progressive growing), conv blocks, minibatch std."""

    def __init__(self, arch: StyleArch) -> None:
        super().__init__()
        self.arch = arch
        resolutions = [4 * 2**k for k in range(arch.levels + 1)]
        self.from_image = nn.ModuleList(EqualConv(arch.channels, arch.width(r), 1) for r in resolutions)
        self.blocks = nn.ModuleList(
            nn.Sequential(EqualConv(arch.width(r), arch.width(r), 3), nn.LeakyReLU(0.2),
                          EqualConv(arch.width(r), arch.width(r // 2), 3), nn.LeakyReLU(0.2), nn.AvgPool2d(2))
            for r in resolutions[1:])
        c4 = arch.width(4)
        self.final_conv = EqualConv(c4 + 1, c4, 3)
        self.final = nn.Sequential(EqualLinear(c4 * 16, c4), nn.LeakyReLU(0.2), EqualLinear(c4, 1))

    def forward(self, x: torch.Tensor, *, level: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        level = self.arch.levels if level is None else level
        h = F.leaky_relu(self.from_image[level](x), 0.2)
        for k in range(level, 0, -1):
            h = self.blocks[k - 1](h)
            if k == level and alpha < 1.0:
                low = F.leaky_relu(self.from_image[k - 1](F.avg_pool2d(x, 2)), 0.2)
                h = alpha * h + (1 - alpha) * low
        h = torch.cat([h, _minibatch_std(h)], dim=1)
        h = F.leaky_relu(self.final_conv(h), 0.2)
        return self.final(h.flatten(1))


def _minibatch_std(h: torch.Tensor, group: int = 4) -> torch.Tensor:
    """One extra channel: the feature spread within a group of samples, which exposes mode collapse."""
    b = h.shape[0]
    g = min(group, b)
    while b % g:
        g -= 1
    y = h.reshape(g, -1, *h.shape[1:])
    std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))
    return std.repeat(g)[:, None, None, None].expand(b, 1, *h.shape[2:])


@dataclass(frozen=True)
class GanTraining:
    """How to train the UM GAN."""

    steps: int
    batch_size: int = 8
    lr: float = 2e-3
    r1: float = 1.0
    progressive: bool = True
    augment: bool = True
    seed: int = 0


def schedule(step: int, steps: int, levels: int, progressive: bool) -> tuple[int, float]:
    """(level, alpha) at ``step``: phases from 8 px up, longer for larger sizes (the paper doubles epochs).

    Each phase after the first fades its resolution in over its first half.
    """
    if not progressive or levels <= 1:
        return levels, 1.0
    weights = [k for k in range(1, levels + 1)]  # phase of level k gets a share proportional to k
    bounds, acc = [], 0.0
    for wgt in weights:
        acc += wgt / sum(weights) * steps
        bounds.append(acc)
    for k, end in enumerate(bounds):
        if step < end or k == len(bounds) - 1:
            start = bounds[k - 1] if k else 0.0
            alpha = 1.0 if k == 0 else min(1.0, (step - start) / max(1.0, (end - start) / 2))
            return k + 1, float(alpha)
    return levels, 1.0


def augment_pair(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and translation up to 1/8 of the side, differentiable (DiffAugment)."""
    b = x.shape[0]
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    shift = ((torch.rand(b, 2, generator=generator) - 0.5) * 0.25).to(x.device)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def new_gan_state(arch: StyleArch, settings: GanTraining, device: str) -> dict[str, Any]:
    """Fresh networks and optimisers, seeded."""
    torch.manual_seed(settings.seed)
    g, d = StyleGenerator(arch).to(device), StyleDiscriminator(arch).to(device)
    return {"step": 0, "arch": asdict(arch), "g": g, "d": d, "g_ema": copy.deepcopy(g).eval(),
            "opt_g": torch.optim.Adam(g.parameters(), lr=settings.lr, betas=(0.0, 0.99)),
            "opt_d": torch.optim.Adam(d.parameters(), lr=settings.lr, betas=(0.0, 0.99))}


def gan_step(state: dict[str, Any], reals: torch.Tensor, settings: GanTraining, acc: Any | None = None
             ) -> dict[str, float]:
    """One training step on batches drawn from ``reals`` (N x C x S x S in [-1, 1]): one
    discriminator update, then one generator update.

    ``acc`` (an accelerate Accelerator; None for plain torch) runs it data-parallel with mixed
    precision and ``--grad-accum`` micro-batches per process (see ``parallel.py``). Micro-batch
    ``m`` draws its batch, latents, layer noise and augmentation from
    ``step_generator(seed, step, m * world + rank)``: processes differ, a resumed run draws what
    an uninterrupted one would, and k micro-batches in one process train what k processes do.
    """
    from medsynth_core import torch_generator
    from medsynth_core.training import step_generator

    g, d, g_ema = state["g"], state["d"], state["g_ema"]
    step, arch = state["step"], g.arch
    device = reals.device
    micros, world, rank = (1, 1, 0) if acc is None else (acc.gradient_accumulation_steps, acc.num_processes,
                                                         acc.process_index)
    level, alpha = schedule(step, settings.steps, arch.levels, settings.progressive)
    factor = 2 ** (arch.levels - level)
    draws = []
    for m in range(micros):
        rng = step_generator(settings.seed, step, m * world + rank)
        pick = torch.randint(len(reals), (min(settings.batch_size, len(reals)),), generator=rng)
        real = reals[pick.to(device)]
        if factor > 1:
            real = F.avg_pool2d(real, factor)
        if alpha < 1.0:  # reals fade in too, as the generator's new level does
            real = alpha * real + (1 - alpha) * _up(F.avg_pool2d(real, 2))
        z = torch.randn(len(pick), arch.latent, generator=rng).to(device)
        noise = int(torch.randint(2**62, (1,), generator=rng))  # the layer noise of this micro-batch's fakes
        draws.append((rng, real, z, noise))

    def fake_of(z: torch.Tensor, noise: int) -> torch.Tensor:  # the same fake in both phases
        return g(z, level=level, alpha=alpha, generator=torch_generator(noise, device))

    def aug(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return augment_pair(x, rng) if settings.augment else x

    d_losses, r1s, g_losses = [], [], []
    for m, (rng, real, z, noise) in enumerate(draws):
        with accumulate(acc, m):
            with torch.no_grad(), autocast(acc):
                fake = fake_of(z, noise)
            with autocast(acc):
                d_loss = F.softplus(d(aug(fake, rng), level=level, alpha=alpha)).float().mean() + \
                    F.softplus(-d(aug(real, rng), level=level, alpha=alpha)).float().mean()
            r1 = torch.zeros((), device=device)
            if settings.r1 > 0 and step % R1_EVERY == 0:  # lazy R1 (StyleGAN2), scaled by its interval
                # in full precision: a gradient of a half-precision score underflows
                real_r = real.detach().requires_grad_(True)
                score = d(real_r, level=level, alpha=alpha).sum()
                (grad,) = torch.autograd.grad(score, real_r, create_graph=True)
                r1 = settings.r1 / 2 * grad.pow(2).sum(dim=(1, 2, 3)).mean() * R1_EVERY
            backward(acc, d_loss + r1)
            optimiser_step(acc, state["opt_d"], [d])
        d_losses.append(d_loss.item())
        r1s.append(r1.item())

    for m, (rng, _, z, noise) in enumerate(draws):
        with accumulate(acc, m):
            with frozen([d]), autocast(acc):  # the discriminator takes no gradient from the generator's loss
                g_loss = F.softplus(-d(aug(fake_of(z, noise), rng), level=level, alpha=alpha)).float().mean()
            backward(acc, g_loss)
            optimiser_step(acc, state["opt_g"], [g])
        g_losses.append(g_loss.item())

    with torch.no_grad():
        w_mean = torch.stack([g.mapping(z).mean(dim=0) for _, _, z, _ in draws]).mean(dim=0)
        g.w_avg.lerp_(w_mean.float(), 0.005)
        average_buffers(acc, [g])  # the mean of w, over every process's latents
        beta = 0.5 ** (1.0 / max(10.0, settings.steps / 20))  # EMA half-life: a twentieth of training
        for p_ema, p in zip(g_ema.parameters(), g.parameters()):
            p_ema.lerp_(p, 1 - beta)
        g_ema.w_avg.copy_(g.w_avg)
    state["step"] = step + 1
    return {"d": sum(d_losses) / micros, "g": sum(g_losses) / micros, "r1": sum(r1s) / micros, "level": level,
            "alpha": alpha}


def gan_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A picklable checkpoint of the training state."""
    return {"step": state["step"], "arch": state["arch"],
            **{k: state[k].state_dict() for k in ("g", "d", "g_ema", "opt_g", "opt_d")}}


def load_gan_state(saved: dict[str, Any], settings: GanTraining, device: str) -> dict[str, Any]:
    """Rebuild the training state from ``gan_state_dict``'s output."""
    state = new_gan_state(StyleArch(**saved["arch"]), settings, device)
    for key in ("g", "d", "g_ema", "opt_g", "opt_d"):
        state[key].load_state_dict(saved[key])
    state["step"] = saved["step"]
    return state


@torch.no_grad()
def sample_masks(g: StyleGenerator, seeds: list[int], psi: float = 1.0, device: str = "cpu") -> torch.Tensor:
    """One mask per seed (N x C x S x S, clamped to [-1, 1]); each drawn from its own seed alone."""
    from medsynth_core import torch_generator

    g.eval()
    out = []
    for seed in seeds:
        gen = torch_generator(seed, device)
        z = torch.randn(1, g.arch.latent, generator=gen, device=device)
        out.append(g(z, psi=psi, generator=gen).clamp(-1, 1))
    return torch.cat(out)
