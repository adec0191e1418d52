"""Variety as the mean MS-SSIM of random pairs within a set (Saragih, paper 001)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from medsynth_core import ConfigError, Dataset, Evaluator, Metric, numpy_rng, option

from ._pixels import all_colour, common_shape, stack

WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Scale weights of Wang, Simoncelli and Bovik (2003), finest scale first."""

MAX_SCALES = len(WANG_BETAS)


@dataclass(frozen=True)
class MSSSIMConfig:
    """Options of the ms-ssim evaluator."""

    pairs: int = option(500, "Random pairs drawn within each set; a set with fewer distinct pairs uses all of them.")
    seed: int = option(0, "Seed of the pair draw.")
    scales: int = option(0, "Scales (1-5); 0 picks as many as the image size allows for the window.")
    sigma: float = option(1.5, "Standard deviation of the Gaussian window in pixels (1.5 gives an 11 px window).")
    size: int = option(0, "Resize every image to size x size; 0 uses the smallest height and width of both sets.")
    batch_size: int = option(64, "Pairs compared at once.")

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise ConfigError(f"pairs must be >= 1, got {self.pairs}")
        if not 0 <= self.scales <= MAX_SCALES:
            raise ConfigError(f"scales must be 0 (auto) or 1-{MAX_SCALES}, got {self.scales}")
        if not self.sigma > 0:
            raise ConfigError(f"sigma must be > 0, got {self.sigma}")
        if self.size != 0 and self.size < 8:
            raise ConfigError(f"size must be 0 (smallest of the sets) or >= 8, got {self.size}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def window_size(sigma: float) -> int:
    """Side of the Gaussian window torchmetrics builds for ``sigma`` (it ignores ``kernel_size`` then)."""
    return int(3.5 * sigma + 0.5) * 2 + 1


def max_scales(height: int, width: int, sigma: float) -> int:
    """The most scales whose coarsest level still holds a full window (0 if not even one does).

    Each scale halves the image, so scale ``s`` sees ``side / 2**(s-1)`` pixels; torchmetrics also
    requires ``side // (s-1)**2`` to exceed the window and ``side >= 2**s``.
    """
    k = window_size(sigma)
    side = min(height, width)
    best = 0
    for s in range(1, MAX_SCALES + 1):
        if side // 2 ** (s - 1) >= k and side // max(1, s - 1) ** 2 > k - 1 and side >= 2**s:
            best = s
    return best


def scale_betas(scales: int) -> tuple[float, ...]:
    """The first ``scales`` of Wang's weights, renormalised to sum to 1 (1 scale is plain SSIM)."""
    picked = WANG_BETAS[:scales]
    total = sum(picked)
    return tuple(b / total for b in picked)


class MSSSIMEvaluator(Evaluator):
    """Mean MS-SSIM of random pairs within the synthetic set (lower is more varied), and within the real set.

    The metric of Saragih (paper 001) for the variety of a set: two images drawn from a
    collapsed generator look alike, so their multi-scale structural similarity is high. Pairs
    are distinct images of the same set, drawn with the ``seed``; a set with no more distinct
    pairs than ``pairs`` uses every pair once. The real set's value is the reference the
    synthetic one should approach.

    Computed with torchmetrics' ``multiscale_structural_similarity_index_measure``
    (``data_range=1``, negative terms clipped to 0, ``normalize="relu"``), in float64, so
    identical images give 1. The original MS-SSIM uses 5 scales and an 11 px window, which needs
    images of at least 176 px; for small images the number of scales is cut to what the size
    allows (64 px: 3 scales, 32 px: 2 scales with ``sigma`` 1.5) and the first weights of Wang et
    al. are renormalised to sum to 1. The coarsest scale used carries the luminance term. Images
    of both sets are brought to one size (``size``, or the smallest height and width found) so
    that the two numbers are comparable; colour is kept only when every image has it.
    """

    Config = MSSSIMConfig

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        cfg = self.config
        shape = common_shape([real, synthetic], cfg.size)
        allowed = max_scales(*shape, cfg.sigma)
        if allowed == 0:
            raise ConfigError(f"ms-ssim: images of {shape[1]}x{shape[0]} px are smaller than the "
                              f"{window_size(cfg.sigma)} px window; lower sigma or raise size")
        if cfg.scales > allowed:
            raise ConfigError(f"ms-ssim: scales={cfg.scales} needs larger images than {shape[1]}x{shape[0]} px; "
                              f"at most {allowed} fit (or use 0 for auto)")
        scales = cfg.scales or allowed
        colour = all_colour([real, synthetic])
        common = {"seed": cfg.seed, "pairs_requested": cfg.pairs, "scales": scales,
                  "betas": list(scale_betas(scales)), "sigma": cfg.sigma, "window": window_size(cfg.sigma),
                  "size": [shape[1], shape[0]], "colour": colour, "library": "torchmetrics"}
        metrics = []
        for which, dataset, direction in (("synthetic", synthetic, "lower"), ("real", real, "none")):
            scores, pairs, exhaustive = self._scores(dataset, shape, colour, scales)
            details = {"what": f"mean MS-SSIM of pairs within the {which} set (higher = more alike)", **common,
                       "pairs_used": pairs, "all_pairs": exhaustive, "images": len(dataset)}
            if not pairs:
                details["note"] = f"the {which} set has fewer than 2 images"
                metrics.append(Metric(f"ms_ssim_{which}", math.nan, direction, details=details))
                continue
            metrics.append(Metric(f"ms_ssim_{which}", float(scores.mean()), direction, float(scores.std()), details))
        return metrics

    def _scores(self, dataset: Dataset, shape: tuple[int, int], colour: bool,
                scales: int) -> tuple[np.ndarray, int, bool]:
        cfg = self.config
        first, second, exhaustive = draw_pairs(len(dataset), cfg.pairs, cfg.seed)
        if not len(first):
            return np.array([]), 0, exhaustive
        needed = sorted(set(first.tolist()) | set(second.tolist()))
        where = {idx: k for k, idx in enumerate(needed)}
        arrays = stack([dataset[i].image for i in needed], shape, colour)
        tensor = torch.from_numpy(arrays[:, None] if arrays.ndim == 3 else np.moveaxis(arrays, -1, 1))
        device = self.context.device
        dtype = torch.float32 if str(device).startswith("mps") else torch.float64  # mps has no float64
        a = torch.as_tensor([where[i] for i in first.tolist()])
        b = torch.as_tensor([where[i] for i in second.tolist()])
        out = []
        with self.context.progress.task(f"ms-ssim pairs of {dataset.name}", total=len(a)) as bar:
            for start in range(0, len(a), cfg.batch_size):
                x = tensor[a[start:start + cfg.batch_size]].to(device, dtype)
                y = tensor[b[start:start + cfg.batch_size]].to(device, dtype)
                out.append(ms_ssim(x, y, scales, cfg.sigma).cpu().numpy())
                bar.advance(len(x))
        return np.concatenate(out).astype(np.float64), len(a), exhaustive


def ms_ssim(x: torch.Tensor, y: torch.Tensor, scales: int, sigma: float = 1.5) -> torch.Tensor:
    """Per-pair MS-SSIM of two N x C x H x W batches in [0, 1], with ``scales`` renormalised Wang weights."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    k = window_size(sigma)
    return multiscale_structural_similarity_index_measure(
        x, y, gaussian_kernel=True, sigma=sigma, kernel_size=k, reduction="none", data_range=1.0,
        betas=scale_betas(scales), normalize="relu")


def draw_pairs(n: int, pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Index arrays of distinct-image pairs: all ``n(n-1)/2`` when that is at most ``pairs``, else a seeded draw."""
    total = n * (n - 1) // 2
    if total <= pairs:
        first, second = np.triu_indices(n, k=1)
        return first, second, True
    rng = numpy_rng(seed)
    first = rng.integers(0, n, size=pairs)
    second = rng.integers(0, n - 1, size=pairs)
    second = second + (second >= first)  # skip the first image so a pair is never an image with itself
    return first, second, False
