"""AffinityNet-style semantic affinities learned from one soft mask, and the random walk they drive.

Following Ahn & Kwak ("Learning Pixel-level Semantic Affinity with Image-level Supervision", CVPR 2018),
as the paper's "Semantic Affinity Learning" describes it:

- seeds: pixels whose (min-max normalised) soft mask is at least ``fg`` are confident foreground, at
  most ``bg`` confident background; the pixels in between are neutral;
- a network maps every pixel to an embedding ``f``; the affinity of two pixels is
  ``a_ij = exp(-mean |f_i - f_j|)``;
- pairs of two seeds are labelled 1 (same class) or 0 (different); pairs with a neutral pixel are ignored;
  the loss is ``L_fg+ / 4 + L_bg+ / 4 + L_neg / 2`` (cross-entropy of each pair group, balanced);
- the soft mask is propagated by a random walk ``v <- T v`` over the pixels within ``radius`` of each other,
  ``T = D^-1 A^beta`` (row-normalised affinities raised to ``beta``), ``iterations`` times.

Two changes make it fit a refiner that trains one network per image in milliseconds: the network is a
per-pixel MLP over a fixed multi-scale filter bank (smoothed intensities and gradient magnitudes at several
widths, and the pixel's position) rather than a CNN backbone, so each step only evaluates the pixels of its
pairs; and the training pairs are drawn among all seeds, not only within the radius, because attention maps
are blurry and the neutral band between the seeds is often wider than the radius, which would leave no
negative pair at all. The network is trained from the image's own seed, so a sample's refined mask does not
depend on the batch it arrives in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage, sparse

SCALES = (1.0, 2.0, 4.0)  # filter-bank widths in px at the working size


@dataclass(frozen=True)
class AffinitySettings:
    """How to learn the affinities and walk."""

    fg: float = 0.6
    bg: float = 0.3
    radius: int = 4
    size: int = 64
    steps: int = 40
    lr: float = 1e-2
    width: int = 32
    beta: float = 8.0
    iterations: int = 48
    pairs: int = 256


def filter_bank(image: np.ndarray) -> np.ndarray:
    """Per-pixel features (H x W x F, each standardised): intensities smoothed at 0 and ``SCALES`` px,
    gradient magnitudes at ``SCALES`` and the pixel's (y, x) position in [-1, 1]."""
    channels = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]
    feats = []
    for ch in channels:
        ch = ch.astype(np.float64)
        feats.append(ch)
        feats += [ndimage.gaussian_filter(ch, s) for s in SCALES]
        feats += [ndimage.gaussian_gradient_magnitude(ch, s) for s in SCALES]
    h, w = image.shape[:2]
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    out = np.stack([*feats, yy, xx], axis=-1)
    out = (out - out.mean(axis=(0, 1))) / np.maximum(out.std(axis=(0, 1)), 1e-6)
    return out.astype(np.float32)


class AffinityNet(torch.nn.Module):
    """A per-pixel MLP from filter-bank features to an embedding; affinities are ``exp(-mean |f_i - f_j|)``."""

    def __init__(self, features: int, width: int = 32, dim: int = 8) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(features, width), torch.nn.GELU(),
                                        torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)


def affinity(fi: torch.Tensor, fj: torch.Tensor) -> torch.Tensor:
    """AffinityNet's affinity of embedding pairs (rows), kept off 0 and 1 for the log loss."""
    return torch.exp(-(fi - fj).abs().mean(-1)).clamp(1e-5, 1 - 1e-5)


def train_affinity(features: torch.Tensor, fg_seed: np.ndarray, bg_seed: np.ndarray, settings: AffinitySettings,
                   seed: int) -> AffinityNet:
    """Fit an :class:`AffinityNet` to one image's features (HW x F) from its seed pixels (flat booleans).

    Each step draws ``settings.pairs`` pairs of each kind (foreground-foreground, background-background,
    foreground-background) among the seeds.
    """
    gen = torch.Generator().manual_seed(seed % 2**63)
    torch.manual_seed(seed % 2**63)  # initialisation from the sample's own seed
    net = AffinityNet(features.shape[1], settings.width)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.lr)
    fg_idx = torch.from_numpy(np.flatnonzero(fg_seed))
    bg_idx = torch.from_numpy(np.flatnonzero(bg_seed))

    def draw(idx: torch.Tensor) -> torch.Tensor:
        return idx[torch.randint(len(idx), (settings.pairs,), generator=gen)]

    for _ in range(settings.steps):
        picks = [draw(fg_idx), draw(fg_idx), draw(bg_idx), draw(bg_idx), draw(fg_idx), draw(bg_idx)]
        emb = net(features[torch.cat(picks)]).split(settings.pairs)
        pos_fg, pos_bg, neg = affinity(emb[0], emb[1]), affinity(emb[2], emb[3]), affinity(emb[4], emb[5])
        loss = -pos_fg.log().mean() / 4 - pos_bg.log().mean() / 4 - (1 - neg).log().mean() / 2
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return net.eval()


def offsets(radius: int) -> list[tuple[int, int]]:
    """Neighbour offsets within ``radius``, the pixel itself excluded."""
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
            if (dy, dx) != (0, 0) and dy * dy + dx * dx <= radius * radius]


def transition_matrix(emb: np.ndarray, radius: int, beta: float) -> sparse.csr_matrix:
    """``T = D^-1 A^beta`` over the pixels within ``radius`` (and each pixel itself, affinity 1); emb is H x W x D."""
    h, w, _ = emb.shape
    index = np.arange(h * w).reshape(h, w)
    rows, cols, vals = [index.ravel()], [index.ravel()], [np.ones(h * w)]
    for dy, dx in offsets(radius):
        ys, yd = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
        xs, xd = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
        a = np.exp(-np.abs(emb[ys, xs] - emb[yd, xd]).mean(-1))
        rows.append(index[ys, xs].ravel())
        cols.append(index[yd, xd].ravel())
        vals.append(a.ravel() ** beta)
    matrix = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(h * w, h * w))
    return sparse.diags(1.0 / np.asarray(matrix.sum(axis=1)).ravel()) @ matrix


def random_walk(soft: np.ndarray, transition: sparse.csr_matrix, iterations: int) -> np.ndarray:
    """``T^iterations`` applied to the flattened soft mask."""
    v = soft.ravel().astype(np.float64)
    for _ in range(iterations):
        v = transition @ v
    return v.reshape(soft.shape)


def normalise(soft: np.ndarray) -> np.ndarray:
    """A soft mask scaled to [0, 1] by its own minimum and maximum (flat maps become zeros)."""
    lo, hi = float(soft.min()), float(soft.max())
    if hi - lo < 1e-8:
        return np.zeros_like(soft, dtype=np.float32)
    return ((soft - lo) / (hi - lo)).astype(np.float32)


def _resize(arr: np.ndarray, shape: tuple[int, ...], order: int = 1) -> np.ndarray:
    if arr.shape[:2] == tuple(shape[:2]):
        return arr
    factors = [t / s for t, s in zip(shape[:2], arr.shape[:2])] + [1] * (arr.ndim - 2)
    return ndimage.zoom(arr, factors, order=order, mode="nearest", grid_mode=True)


def propagate(image: np.ndarray, soft: np.ndarray, settings: AffinitySettings, seed: int) -> np.ndarray | None:
    """The affinity-propagated map (H x W in [0, 1]) of ``soft`` on ``image``; None without both kinds of seed.

    ``soft`` is min-max normalised first; the work happens at ``settings.size`` px (the longer side) and the
    result is resized back to the image size.
    """
    h, w = soft.shape
    scale = settings.size / max(h, w)
    work = (max(1, round(h * scale)), max(1, round(w * scale)))
    s = np.clip(_resize(normalise(soft), work), 0, 1)
    fg, bg = s >= settings.fg, s <= settings.bg
    if not fg.any() or not bg.any():
        return None
    img = _resize(np.asarray(image, dtype=np.float32), work)
    feats = filter_bank(img)
    flat = torch.from_numpy(feats.reshape(-1, feats.shape[-1]))
    with torch.enable_grad():
        net = train_affinity(flat, fg.ravel(), bg.ravel(), settings, seed)
    with torch.no_grad():
        emb = net(flat).numpy().reshape(*work, -1)
    walked = random_walk(s, transition_matrix(emb, settings.radius, settings.beta), settings.iterations)
    return normalise(np.clip(_resize(walked, (h, w)), 0, 1))
