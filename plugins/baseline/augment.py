"""Classical augmentation of real pairs: the "manual augmentation" control of the papers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsynth_core import Condition, ConfigError, Generator, Sample, numpy_rng, option

from .geometry import GeometryOptions, random_coordinates, warp_image, warp_mask


@dataclass(frozen=True)
class AugmentConfig(GeometryOptions):
    """Options of the augment generator: geometry (above) and intensity."""

    gamma: float = option(0.2, "Largest log-gamma change (gamma drawn in exp(+-gamma)).")
    contrast: float = option(0.1, "Largest relative contrast change.")
    brightness: float = option(0.05, "Largest brightness shift, in image units.")
    noise: float = option(0.01, "Largest standard deviation of added Gaussian noise, in image units.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("gamma", "contrast", "brightness", "noise"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


class AugmentGenerator(Generator):
    """Flips, affine and elastic warps, gamma, contrast and noise applied to real pairs."""

    Config = AugmentConfig
    requires = frozenset({"image", "mask"})
    makes = frozenset({"mask"})
    recipe = {  # the control row of every comparison: classical augmentation of the real pairs
        "mask_source": {"name": "real-pairs"},
        "filters": [{"name": "mask-area", "min_fraction": 0.05, "max_fraction": 0.6}],
    }

    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        return [self._augment(c, s) for c, s in zip(conditions, seeds)]

    def _augment(self, condition: Condition, seed: int) -> Sample:
        rng = numpy_rng(seed)
        cfg = self.config
        coords = random_coordinates(rng, condition.mask.shape, cfg)
        image = warp_image(condition.image, coords)
        mask = warp_mask(condition.mask, coords)
        image = np.clip(image, 0.0, 1.0) ** np.exp(rng.uniform(-cfg.gamma, cfg.gamma))
        mean = image.mean()
        image = (image - mean) * (1.0 + rng.uniform(-cfg.contrast, cfg.contrast)) + mean
        image = image + rng.uniform(-cfg.brightness, cfg.brightness)
        image = image + rng.normal(0.0, rng.uniform(0.0, cfg.noise) if cfg.noise else 0.0, size=image.shape)
        return Sample(image=np.clip(image, 0.0, 1.0).astype(np.float32), mask=mask)
