"""AffinityNet-style semantic affinities learned from one soft mask, and the random walk they drive.

Following Ahn & Kwak ("Learning Pixel-level Semantic Affinity with Image-level Supervision", CVPR 2018),
as the paper's "Semantic Affinity Learning" describes it:

- seeds: pixels whose (min-max normalised) soft mask is at least ``fg`` are confident foreground, at
  most ``bg`` confident background; the pixels in between are neutral;
- a small convolutional network maps the image to per-pixel embeddings ``f``; the affinity of two pixels
  within ``radius`` is ``a_ij = exp(-mean |f_i - f_j|)``;
- pairs of two seeds are labelled 1 (same class) or 0 (different); pairs with a neutral pixel are ignored;
  the loss is ``L_fg+ / 4 + L_bg+ / 4 + L_neg / 2`` (cross-entropy of each pair group, balanced); the
  training pairs are drawn among all seeds rather than within the radius (see :func:`train_affinity`);
- the soft mask is propagated by a random walk ``v <- T v`` with ``T = D^-1 A^beta`` (row-normalised
  affinities raised to ``beta``), ``iterations`` times.

The network is tiny and trained per image from that image's seed, so a sample's refined mask does not
depend on the batch it arrives in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffinitySettings:
    """How to learn the affinities and walk."""

    fg: float = 0.7
    bg: float = 0.3
    radius: int = 4
    size: int = 64
    steps: int = 60
    lr: float = 1e-2
    width: int = 16
    beta: float = 8.0
    iterations: int = 48
    pairs: int = 1024


class AffinityNet(torch.nn.Module):
    """A few dilated 3 x 3 convolutions from the image to per-pixel embeddings (full resolution)."""

    def __init__(self, channels: int, width: int = 16, dim: int = 8) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        c = channels + 2  # the pixel's coordinates too: the lungs are where they are
        for dilation in (1, 2, 4):
            layers += [torch.nn.Conv2d(c, width, 3, padding=dilation, dilation=dilation), torch.nn.GELU()]
            c = width
        layers.append(torch.nn.Conv2d(width, dim, 1))
        self.body = torch.nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        n, _, h, w = image.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        coords = torch.stack([yy, xx])[None].expand(n, 2, h, w).to(image)
        return self.body(torch.cat([image, coords], dim=1))


def offsets(radius: int, half: bool) -> list[tuple[int, int]]:
    """Neighbour offsets within ``radius`` (excluding 0); ``half``: one of each symmetric pair."""
    out = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if (dy, dx) == (0, 0) or dy * dy + dx * dx > radius * radius:
                continue
            if half and (dy < 0 or (dy == 0 and dx < 0)):
                continue
            out.append((dy, dx))
    return out


def _shift(x: torch.Tensor, dy: int, dx: int, radius: int) -> torch.Tensor:
    """``x`` (..., H, W) read at (y + dy, x + dx), from a copy padded by ``radius`` (zeros outside)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (radius, radius, radius, radius))
    return padded[..., radius + dy:radius + dy + h, radius + dx:radius + dx + w]


def pair_affinities(emb: torch.Tensor, pairs: list[tuple[int, int]], radius: int) -> torch.Tensor:
    """``a_ij = exp(-mean_c |f_i - f_j|)`` for every pixel and offset: K x H x W (emb is C x H x W)."""
    return torch.stack([torch.exp(-(emb - _shift(emb, dy, dx, radius)).abs().mean(0)) for dy, dx in pairs])


def valid_pairs(shape: tuple[int, int], pairs: list[tuple[int, int]], radius: int) -> torch.Tensor:
    """K x H x W: whether the neighbour at each offset lies inside the image."""
    ones = torch.ones(1, *shape)
    return torch.stack([_shift(ones, dy, dx, radius)[0] > 0 for dy, dx in pairs])


def seeds(soft: np.ndarray, fg: float, bg: float) -> tuple[np.ndarray, np.ndarray]:
    """Confident foreground and background pixels of a soft mask already scaled to [0, 1]."""
    return soft >= fg, soft <= bg


def train_affinity(image: torch.Tensor, fg_seed: torch.Tensor, bg_seed: torch.Tensor, settings: AffinitySettings,
                   seed: int) -> AffinityNet:
    """Fit an :class:`AffinityNet` to one image (C x H x W) from its seed pixels (H x W booleans).

    Each step draws ``settings.pairs`` pairs of each kind (foreground-foreground, background-background,
    foreground-background) among the seeds, anywhere in the image: attention maps are blurry, and the
    neutral band between the seeds is often wider than the walk's radius, so AffinityNet's local pairs
    alone would hold no negative pair at all.
    """
    gen = torch.Generator().manual_seed(seed % 2**63)
    torch.manual_seed(seed % 2**63)  # initialisation from the sample's own seed
    net = AffinityNet(image.shape[0], settings.width)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.lr)
    fg_idx = fg_seed.flatten().nonzero()[:, 0]
    bg_idx = bg_seed.flatten().nonzero()[:, 0]

    def draw(idx: torch.Tensor) -> torch.Tensor:
        return idx[torch.randint(len(idx), (settings.pairs,), generator=gen)]

    for _ in range(settings.steps):
        emb = net(image[None])[0].flatten(1)  # C x HW

        pos_fg = _pair_affinity(emb, draw(fg_idx), draw(fg_idx))
        pos_bg = _pair_affinity(emb, draw(bg_idx), draw(bg_idx))
        neg = _pair_affinity(emb, draw(fg_idx), draw(bg_idx))
        loss = -pos_fg.log().mean() / 4 - pos_bg.log().mean() / 4 - (1 - neg).log().mean() / 2
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return net.eval()


def _pair_affinity(emb: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Affinities of pixel pairs (flat indices ``i``, ``j``) from C x HW embeddings, kept off 0 and 1."""
    return torch.exp(-(emb[:, i] - emb[:, j]).abs().mean(0)).clamp(1e-5, 1 - 1e-5)


@torch.no_grad()
def random_walk(soft: torch.Tensor, affinities: torch.Tensor, pairs: list[tuple[int, int]], radius: int,
                beta: float, iterations: int) -> torch.Tensor:
    """Propagate ``soft`` (H x W) by ``iterations`` steps of ``T = D^-1 A^beta``; affinities are K x H x W
    over the full set of ``pairs`` (both directions), the pixel itself counting with affinity 1."""
    valid = valid_pairs(tuple(soft.shape), pairs, radius)
    weights = torch.cat([torch.ones(1, *soft.shape), affinities.pow(beta) * valid])
    weights = weights / weights.sum(0, keepdim=True)
    v = soft
    for _ in range(iterations):
        neighbours = torch.stack([v, *(_shift(v[None], dy, dx, radius)[0] for dy, dx in pairs)])
        v = (weights * neighbours).sum(0)
    return v


def normalise(soft: np.ndarray) -> np.ndarray:
    """A soft mask scaled to [0, 1] by its own minimum and maximum (flat maps become zeros)."""
    lo, hi = float(soft.min()), float(soft.max())
    if hi - lo < 1e-8:
        return np.zeros_like(soft, dtype=np.float32)
    return ((soft - lo) / (hi - lo)).astype(np.float32)


def propagate(image: np.ndarray, soft: np.ndarray, settings: AffinitySettings, seed: int) -> np.ndarray | None:
    """The affinity-propagated map (H x W in [0, 1]) of ``soft`` on ``image``; None without both kinds of seed.

    ``soft`` is min-max normalised first; the work happens at ``settings.size`` px and the result is
    resized back to the image size.
    """
    h, w = soft.shape
    scaled = normalise(soft)
    fg, bg = seeds(scaled, settings.fg, settings.bg)
    if not fg.any() or not bg.any():
        return None
    size = settings.size
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    img = img[None] if img.ndim == 2 else img.permute(2, 0, 1)
    img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    img = (img - img.mean()) / img.std().clamp_min(1e-6)  # the net sees contrast, not the exposure
    s = F.interpolate(torch.from_numpy(scaled)[None, None], size=(size, size), mode="bilinear",
                      align_corners=False)[0, 0]
    fg_t, bg_t = s >= settings.fg, s <= settings.bg
    if not fg_t.any() or not bg_t.any():
        return None
    with torch.enable_grad():
        net = train_affinity(img, fg_t, bg_t, settings, seed)
    with torch.no_grad():
        emb = net(img[None])[0]
        pairs = offsets(settings.radius, half=False)
        walked = random_walk(s, pair_affinities(emb, pairs, settings.radius), pairs, settings.radius,
                             settings.beta, settings.iterations)
    out = F.interpolate(walked[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return normalise(out.clamp(0, 1).numpy())
