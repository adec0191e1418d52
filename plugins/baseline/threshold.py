"""Turn soft masks into binary masks with a fixed or an Otsu threshold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from skimage.filters import threshold_otsu

from medsynth_core import ConfigError, Refiner, Sample, option


@dataclass(frozen=True)
class ThresholdConfig:
    """Options of the threshold refiner."""

    method: Literal["otsu", "fixed"] = option("otsu", "'otsu' picks the threshold per image; 'fixed' uses threshold.")
    threshold: float = option(0.5, "The fixed threshold (and Otsu's fallback for a flat soft mask).")
    label: int = option(1, "Label value given to pixels above the threshold.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must lie in [0, 1], got {self.threshold}")
        if not 1 <= self.label <= 255:
            raise ConfigError(f"label must be 1-255, got {self.label}")


class ThresholdRefiner(Refiner):
    """Binarise soft masks with a fixed threshold or Otsu's method; samples without one pass unchanged."""

    in_worker = True  # plain CPU work on each sample

    Config = ThresholdConfig

    def refine(self, samples: Sequence[Sample]) -> list[Sample]:
        return [self._refine(s) for s in samples]

    def threshold_of(self, soft: np.ndarray) -> float:
        """The threshold this refiner applies to ``soft``."""
        if self.config.method == "fixed" or float(soft.max()) - float(soft.min()) < 1e-6:
            return self.config.threshold
        return float(threshold_otsu(soft))

    def _refine(self, sample: Sample) -> Sample:
        if sample.soft_mask is None:
            return sample
        t = self.threshold_of(sample.soft_mask)
        mask = (sample.soft_mask > t).astype(np.uint8) * np.uint8(self.config.label)
        out = sample.replace(mask=mask)
        out.meta["threshold"] = t
        return out
