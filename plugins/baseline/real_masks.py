"""Mask sources that hand out the real training masks (and images)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from medsynth_core import Condition, Dataset, MaskSource, PipelineError, numpy_rng, option

from .geometry import GeometryOptions, random_coordinates, warp_image, warp_mask


@dataclass(frozen=True)
class RealMasksConfig(GeometryOptions):
    """Options of the real-mask sources."""

    order: Literal["cycle", "random"] = option(
        "cycle", "'cycle': sample i uses real pair i mod N; 'random': a pair drawn with the sample's seed.")
    augment: bool = option(False, "Warp each mask (and image) with the geometric options below.")


class RealMasksSource(MaskSource):
    """The masks of the real training set, optionally with geometric augmentation."""

    Config = RealMasksConfig
    provides = frozenset({"mask"})
    needs_data = True

    def fit(self, dataset: Dataset) -> None:
        labelled = dataset.labelled()
        if not labelled:
            raise PipelineError(f"{self.name}: dataset {dataset.name!r} has no masks")
        self._dataset = dataset
        self._labelled = labelled

    def conditions(self, indices: Sequence[int], seeds: Sequence[int]) -> list[Condition]:
        if not hasattr(self, "_dataset"):
            raise PipelineError(f"{self.name}: call fit(dataset) before conditions()")
        return [self._condition(i, s) for i, s in zip(indices, seeds)]

    def _condition(self, index: int, seed: int) -> Condition:
        rng = numpy_rng(seed)
        pick = index % len(self._labelled) if self.config.order == "cycle" else rng.integers(len(self._labelled))
        real = self._dataset[self._labelled[int(pick)]]
        mask, image = real.mask, real.image
        if self.config.augment:
            coords = random_coordinates(rng, mask.shape, self.config)
            mask = warp_mask(mask, coords)
            image = warp_image(image, coords)
        keep_image = "image" in self.provides
        return Condition(mask=mask, image=image if keep_image else None,
                         meta={"source": real.meta.get("stem", str(pick)), "augmented": self.config.augment})


class RealPairsSource(RealMasksSource):
    """The real training pairs, image and mask, for generators that edit real images."""

    provides = frozenset({"mask", "image"})
