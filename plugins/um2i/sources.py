"""Mask sources of unsupervised masks: from the real images (UM2I) or from the UM GAN (V2UM2I).

An unsupervised mask travels in ``Condition.image`` (float32 in [0, 1], its levels at multiples
of gap/255), not in ``Condition.mask``: it is a condition, not a label, and the runner gives a
sample without a mask its condition's mask. ``slic-um`` adds the real segmentation in
``Condition.mask`` when the source image has one (for comparisons); ``um2i`` makes its own mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medsynth_core import (
    CheckpointError,
    Condition,
    ConfigError,
    Dataset,
    MaskSource,
    PipelineError,
    load_torch,
    numpy_rng,
    option,
    read_checkpoint_card,
)

from .editing import EditOptions, apply_edit
from .superpixels import count_levels, snap_to_levels, unsupervised_mask


@dataclass(frozen=True)
class _SlicUMFields:

    segments: int = option(512, "M: superpixels per image (paper: 512).")
    gap: float = option(50.0, "t: intensity gap between levels on a 0-255 scale (paper: 50); larger = fewer levels.")
    superpixels: Literal["slic", "felzenszwalb"] = option(
        "slic", "SLIC (the paper's) or Felzenszwalb's graph-based superpixels (its Table VI).")
    compactness: float = option(
        0.1, "SLIC compactness on the 0-100 (Lab L) scale: low follows intensity edges, high gives squares.")
    fz_scale: float = option(100.0, "Felzenszwalb: scale (higher = larger regions).")
    fz_sigma: float = option(0.5, "Felzenszwalb: Gaussian smoothing before segmenting.")
    fz_min_size: int = option(20, "Felzenszwalb: smallest region in pixels.")
    colour: bool = option(True, "Colour images give colour UMs (each channel averaged and quantised); False: grey.")
    order: Literal["cycle", "random"] = option(
        "cycle", "'cycle': sample i uses real image i mod N; 'random': an image drawn with the sample's seed.")


@dataclass(frozen=True)
class SlicUMConfig(EditOptions, _SlicUMFields):  # EditOptions first in the bases puts its fields last
    """Options of the superpixel unsupervised-mask source."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.segments < 1:
            raise ConfigError(f"segments must be >= 1, got {self.segments}")
        if not 0 < self.gap < 256:
            raise ConfigError(f"gap must be in (0, 255], got {self.gap}")
        if self.compactness <= 0:
            raise ConfigError(f"compactness must be > 0, got {self.compactness}")
        if self.fz_scale <= 0 or self.fz_sigma < 0 or self.fz_min_size < 1:
            raise ConfigError(f"fz_scale must be > 0, fz_sigma >= 0 and fz_min_size >= 1, got {self.fz_scale}, "
                              f"{self.fz_sigma}, {self.fz_min_size}")


class SlicUMSource(MaskSource):
    """Unsupervised masks of the real images: superpixels at their mean intensity, quantised by a gap t."""

    Config = SlicUMConfig
    provides = frozenset({"image"})
    needs_data = True

    def fit(self, dataset: Dataset) -> None:
        if len(dataset) == 0:
            raise PipelineError(f"{self.name}: dataset {dataset.name!r} has no images")
        self._dataset = dataset
        self._cache: dict[int, np.ndarray] = {}

    def unsupervised_mask(self, image: np.ndarray) -> np.ndarray:
        """The UM of one image with this source's options."""
        c = self.config
        return unsupervised_mask(image, c.segments, c.gap, c.superpixels, c.colour, c.compactness, c.fz_scale,
                                 c.fz_sigma, c.fz_min_size)

    def conditions(self, indices: Sequence[int], seeds: Sequence[int]) -> list[Condition]:
        if not hasattr(self, "_dataset"):
            raise PipelineError(f"{self.name}: call fit(dataset) before conditions()")
        return [self._condition(i, s) for i, s in zip(indices, seeds)]

    def _condition(self, index: int, seed: int) -> Condition:
        rng = numpy_rng(seed)
        n = len(self._dataset)
        pick = index % n if self.config.order == "cycle" else int(rng.integers(n))
        real = self._dataset[pick]
        if pick not in self._cache:  # superpixels are deterministic: compute each real image's UM once
            self._cache[pick] = self.unsupervised_mask(real.image)
        um, edit = apply_edit(self._cache[pick], self.config, self.config.gap, rng)
        meta: dict[str, Any] = {"source": real.meta.get("stem", str(pick)), "um": self.config.superpixels,
                                "gap": self.config.gap, "levels": count_levels(um)}
        if edit:
            meta["edit"] = edit
        return Condition(mask=real.mask, image=um, meta=meta)


@dataclass(frozen=True)
class _UMGeneratorFields:

    checkpoint: Path | None = option(None, "The folder `medsynth train um2i` wrote (it holds the UM GAN).")
    psi: float = option(0.7, "Truncation psi: w pulled toward its mean; 1 = none, lower = more typical, less varied.")
    snap: bool = option(True, "Round the GAN's output to the UM levels of training (multiples of the gap).")


@dataclass(frozen=True)
class UMGeneratorConfig(EditOptions, _UMGeneratorFields):
    """Options of the UM GAN source."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.psi <= 2.0:
            raise ConfigError(f"psi must be in [0, 2], got {self.psi}")


class UMGeneratorSource(MaskSource):
    """Unsupervised masks from noise, drawn from the style-based UM GAN trained by `medsynth train um2i` (V2UM)."""

    Config = UMGeneratorConfig
    provides = frozenset({"image"})
    needs_data = False

    def __init__(self, config: UMGeneratorConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        folder = self.config.checkpoint
        if folder is None:
            raise ConfigError(f"{self.name}: set option checkpoint to the folder `medsynth train um2i` wrote")
        read_checkpoint_card(folder, expected="um2i")
        if not (folder / "um-gan.pt").is_file():
            raise CheckpointError(f"{folder}: holds no UM GAN (trained with vum_steps=0 or condition='mask'); "
                                  "train one with `medsynth train um2i --vum-steps N`")

    def _load(self) -> None:
        from .stylegan import StyleArch, StyleGenerator

        saved = load_torch(self.config.checkpoint / "um-gan.pt")
        self._g = StyleGenerator(StyleArch(**saved["arch"]))
        self._g.load_state_dict(saved["g_ema"])
        self._g.to(self.context.device).eval()
        self._gap = float(saved["gap"])

    def conditions(self, indices: Sequence[int], seeds: Sequence[int]) -> list[Condition]:
        from .stylegan import sample_masks

        if not hasattr(self, "_g"):
            self._load()
        masks = ((sample_masks(self._g, list(seeds), self.config.psi, self.context.device) + 1) / 2).cpu().numpy()
        out = []
        for seed, m in zip(seeds, masks):
            um = m[0] if m.shape[0] == 1 else np.moveaxis(m, 0, -1)
            um = snap_to_levels(um, self._gap) if self.config.snap else um.astype(np.float32)
            um, edit = apply_edit(np.ascontiguousarray(um), self.config, self._gap, numpy_rng(seed))
            meta: dict[str, Any] = {"source": "um-gan", "psi": self.config.psi, "gap": self._gap,
                                    "levels": count_levels(um)}
            if edit:
                meta["edit"] = edit
            out.append(Condition(image=um, meta=meta))
        return out
