"""How varied a set of masks is: mean pairwise MS-SSIM (lower = more varied) and per-pixel spread.

Used to report the UM GAN's variety against the real unsupervised masks at the end of its
training, as StyleGAN papers report MS-SSIM between random pairs.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003


def _gaussian(size: int, sigma: float, channels: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _ssim_parts(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c1, c2 = 0.01**2, 0.03**2  # data range 1
    ch = a.shape[1]

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=ch)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return (lum * cs).mean(dim=(1, 2, 3)), cs.mean(dim=(1, 2, 3))


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of image pairs (N x C x H x W in [0, 1]), with as many of the 5 scales as the size allows."""
    size = min(a.shape[-2:])
    win = 11 if size >= 11 * 16 else 7
    scales = max(1, min(5, int(torch.log2(torch.tensor(size / win)).floor()) + 1))
    weights = torch.tensor(_WEIGHTS[:scales])
    weights = weights / weights.sum()
    window = _gaussian(win, 1.5, a.shape[1]).to(a.device)
    values = []
    for s in range(scales):
        ssim, cs = _ssim_parts(a, b, window)
        values.append((ssim if s == scales - 1 else cs).clamp(min=0))
        if s < scales - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    stacked = torch.stack(values, dim=1)
    return torch.prod(stacked ** weights.to(a.device), dim=1)


def mean_pairwise_ms_ssim(masks: torch.Tensor, max_pairs: int = 500) -> float:
    """Mean MS-SSIM over pairs of different masks (N x C x H x W in [0, 1])."""
    pairs = list(itertools.combinations(range(len(masks)), 2))[:max_pairs]
    if not pairs:
        return float("nan")
    i, j = zip(*pairs)
    return float(ms_ssim(masks[list(i)], masks[list(j)]).mean())


def pixel_std(masks: torch.Tensor) -> float:
    """Mean over pixels of the standard deviation across masks: zero for a collapsed generator."""
    return float(masks.std(dim=0).mean()) if len(masks) > 1 else 0.0


def diversity_report(generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Variety of generated vs real UMs (both N x C x H x W in [0, 1])."""
    gen_ssim, real_ssim = mean_pairwise_ms_ssim(generated), mean_pairwise_ms_ssim(real)
    gen_std, real_std = pixel_std(generated), pixel_std(real)
    return {
        "ms_ssim_generated": round(gen_ssim, 4),
        "ms_ssim_real": round(real_ssim, 4),
        "pixel_std_generated": round(gen_std, 4),
        "pixel_std_real": round(real_std, 4),
        "std_ratio": round(gen_std / real_std, 4) if real_std > 0 else float("nan"),
        "samples_generated": len(generated),
        "samples_real": len(real),
    }
