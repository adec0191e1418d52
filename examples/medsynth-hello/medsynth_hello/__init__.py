"""medsynth-hello: an example third-party plugin with one refiner, ``largest-component``.

Installed, it is found through the ``medsynth`` entry-point group like the built-in plugins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsynth_core import ConfigError, Refiner, Sample, hookimpl, option

__version__ = "0.1.0"


@dataclass(frozen=True)
class LargestComponentConfig:
    """Options of the largest-component refiner."""

    keep: int = option(1, "Connected components kept per label, largest first (2 for a pair of lungs).")
    connectivity: int = option(1, "1: pixels touching by an edge are connected (4-neighbours); 2: also by a corner.")

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ConfigError(f"keep must be >= 1, got {self.keep}")
        if self.connectivity not in (1, 2):
            raise ConfigError(f"connectivity must be 1 or 2, got {self.connectivity}")


class LargestComponentRefiner(Refiner):
    """Keep the largest connected component(s) of each label and clear the specks around them.

    Every non-zero label is treated on its own; removed pixels become background (0). Samples
    without a mask pass unchanged. The number of removed pixels goes into the sample's
    ``meta["removed_pixels"]`` and from there into the manifest.
    """

    Config = LargestComponentConfig

    def refine(self, samples: Sequence[Sample]) -> list[Sample]:
        return [self._refine(s) for s in samples]

    def clean(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` with only the ``keep`` largest components of each label left."""
        structure = ndimage.generate_binary_structure(2, self.config.connectivity)
        out = np.zeros_like(mask)
        for label in np.unique(mask):
            if label == 0:
                continue
            components, count = ndimage.label(mask == label, structure=structure)
            sizes = np.bincount(components.ravel())[1:]
            # stable sort, so equal sizes keep the component met first in raster order
            kept = np.argsort(-sizes, kind="stable")[: self.config.keep] + 1
            out[np.isin(components, kept)] = label
        return out

    def _refine(self, sample: Sample) -> Sample:
        if sample.mask is None:
            return sample
        mask = self.clean(sample.mask)
        out = sample.replace(mask=mask)
        out.meta["removed_pixels"] = int(np.count_nonzero(sample.mask) - np.count_nonzero(mask))
        return out


@hookimpl
def register_refiners(register):
    """Offer ``largest-component``."""
    register("largest-component", LargestComponentRefiner)
