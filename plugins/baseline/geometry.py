"""Random geometric transforms applied identically to an image and its mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsynth_core import ConfigError, option


@dataclass(frozen=True)
class GeometryOptions:
    """Options of a random flip + affine + elastic warp."""

    hflip: float = option(0.5, "Probability of a left-right flip.")
    vflip: float = option(0.0, "Probability of an up-down flip.")
    rotation: float = option(10.0, "Largest rotation, in degrees (drawn uniformly in +-rotation).")
    scale: float = option(0.1, "Largest relative zoom (drawn uniformly in 1 +- scale).")
    translate: float = option(0.05, "Largest shift, as a fraction of the image size.")
    elastic: float = option(0.02, "Elastic displacement, as a fraction of the image size (0 = off).")
    elastic_smoothness: float = option(0.08, "Smoothness of the elastic field, as a fraction of the image size.")

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("rotation", "scale", "translate", "elastic", "elastic_smoothness"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.scale >= 1:
            raise ConfigError(f"scale must be < 1, got {self.scale}")


def random_coordinates(rng: np.random.Generator, shape: tuple[int, int], opts: GeometryOptions) -> np.ndarray:
    """Source coordinates (2 x H x W) for each output pixel of a random warp."""
    h, w = shape
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    angle = np.deg2rad(rng.uniform(-opts.rotation, opts.rotation))
    zoom = rng.uniform(1.0 - opts.scale, 1.0 + opts.scale)
    shift_y, shift_x = rng.uniform(-opts.translate, opts.translate, size=2) * (h, w)
    flip_x = -1.0 if rng.random() < opts.hflip else 1.0
    flip_y = -1.0 if rng.random() < opts.vflip else 1.0
    # map each output pixel back to the input (inverse transform), so the warp leaves no holes
    dy, dx = yy - cy - shift_y, xx - cx - shift_x
    cos, sin = np.cos(angle), np.sin(angle)
    src_y = (cos * dy - sin * dx) / zoom * flip_y + cy
    src_x = (sin * dy + cos * dx) / zoom * flip_x + cx
    if opts.elastic > 0:
        sigma = max(opts.elastic_smoothness * min(h, w), 1.0)
        for grid in (src_y, src_x):
            field = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, size=shape), sigma, mode="reflect")
            field /= max(np.abs(field).max(), 1e-8)
            grid += field * opts.elastic * min(h, w)
    return np.stack([src_y, src_x])


def warp_image(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Resample a float image (H x W or H x W x C) at ``coords`` with linear interpolation."""
    if image.ndim == 2:
        return ndimage.map_coordinates(image, coords, order=1, mode="nearest").astype(np.float32)
    return np.stack([warp_image(image[..., c], coords) for c in range(image.shape[2])], axis=-1)


def warp_mask(mask: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Resample a label map at ``coords`` with nearest-neighbour lookup, so labels stay labels."""
    return ndimage.map_coordinates(mask, coords, order=0, mode="nearest").astype(np.uint8)
