"""MM-FID and MM-STD (paper 004): FID and feature spread over a grid of scales x feature extractors.

The paper resizes images to four resolutions (2^7 to 2^10 px for its 512 px montages), extracts
features with four networks trained on different tasks (ImageNet classification, two label
tasks of its data, and real-vs-synthetic), and reports the 16 numbers as mean ± sd. Here the
scales follow the image size and the extractors are whichever of medsynth's can run here.

Each extractor is trained (or loaded) once, at ``train_size``, and reads every scale: the
images are resized to scale x scale px (inception: to a scale x scale view, then clean-fid's
299 px resize), so a scale is the detail the network is shown, as in the paper.

MM-FID normalisation (the paper says only "normalised into [0, 1]"): each cell's FID is divided
by the FID, with the same extractor and scale, between the real set and a *reference* set: the
real images with their pixels shuffled within each image (structure destroyed, intensity
histogram kept), then clipped to [0, 1]::

    FID_norm = clip(FID(real, synthetic) / FID(real, shuffled real), 0, 1)

0 is the real distribution, 1 is "no better than noise with the real histogram"; the ratio
cancels each extractor's feature scale, which is what makes cells of different networks
comparable. Every raw and reference FID is kept in the metric's details.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsynth_core import ConfigError, Dataset, Evaluator, Metric, option
from medsynth_plugins.common.features import inception_weights

from .fidelity import WEIGHTS_HELP
from .fidelity_features import (
    AUTO_SIZE_CAP,
    MIN_SCALE,
    Extractor,
    ExtractorCache,
    Training,
    auto_scales,
    auto_size,
    check_extractor_spec,
    check_size,
    frechet,
    images_of,
    label_columns,
    shuffled_pixels,
)

NORMALISATION = ("FID(real, synthetic) / FID(real, reference) clipped to [0, 1], where the reference is the real "
                 "set with its pixels shuffled within each image (structure destroyed, histogram kept), scored "
                 "with the same extractor and scale")


@dataclass(frozen=True)
class MultiScaleConfig:
    """Options of the mm-fid and mm-std evaluators."""

    extractors: tuple[str, ...] = option(
        (),
        "Feature extractors of the grid (inception, segmenter, discriminator, labels:<column>); empty: every one "
        "that needs no download (segmenter when the real set has masks, discriminator, labels:<column> for each "
        "column of labels.csv in the real folder) plus inception when its weights are available.")
    scales: tuple[int, ...] = option(
        (),
        "Scales in px (multiples of 8, at least 32); empty: four scales doubling from max(32, size/4), where "
        "size is the real images' size (32-256 px for 64 px images; 128-1024 px for 512 px, as in the paper).")
    train_size: int = option(
        0, f"Size in px at which the segmenter, discriminator and label classifiers are trained, a multiple of 8; "
           f"0: the real images' size rounded to a multiple of 8, at most {AUTO_SIZE_CAP}.")
    weights: Path | None = option(None, WEIGHTS_HELP)
    steps: int = option(200, "Training steps of the segmenter, discriminator and label classifiers.")
    seed: int = option(0, "Seed of that training and of the pixel shuffle of the reference set.")

    def __post_init__(self) -> None:
        for spec in self.extractors:
            check_extractor_spec(spec, "extractors")
        if len(set(self.extractors)) != len(self.extractors):
            raise ConfigError(f"extractors must not repeat, got {', '.join(self.extractors)}")
        for scale in self.scales:
            if scale < MIN_SCALE or scale % 8:
                raise ConfigError(f"scales must be multiples of 8 of at least {MIN_SCALE} px, got {scale}")
        check_size(self.train_size, "train_size")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class MMFIDConfig(MultiScaleConfig):
    """Options of the mm-fid evaluator."""


@dataclass(frozen=True)
class MMSTDConfig(MultiScaleConfig):
    """Options of the mm-std evaluator."""


@dataclass
class Cell:
    """Features of one (extractor, scale) cell of the grid."""

    extractor: Extractor
    scale: int
    real: np.ndarray
    synthetic: np.ndarray
    reference: np.ndarray | None

    def describe(self) -> dict[str, Any]:
        return {"extractor": self.extractor.name, "scale": self.scale,
                "input": self.extractor.input(self.scale), "feature_dim": int(self.real.shape[1])}


class _MultiScaleEvaluator(Evaluator):
    """The grid both paper-004 metrics share."""

    needs_reference = False

    def __init__(self, config: MultiScaleConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._extractors = ExtractorCache()

    def unavailable(self) -> str | None:
        if "inception" not in self.config.extractors:
            return None  # by default inception joins the grid only when its weights are there
        try:
            self._weights()
        except ConfigError as err:
            return str(err)
        return None

    def _weights(self) -> Path:
        return inception_weights(str(self.config.weights) if self.config.weights else None)

    def _grid(self, real: Dataset, synthetic: Dataset) -> tuple[list[Cell], dict[str, Any]]:
        cfg = self.config
        real_images, synthetic_images = images_of(real, "real"), images_of(synthetic, "synthetic")
        train_size = cfg.train_size or auto_size(real_images)
        scales = cfg.scales or auto_scales(auto_size(real_images, cap=512))
        reference = shuffled_pixels(real_images, cfg.seed) if self.needs_reference else None
        training = Training(size=train_size, steps=cfg.steps, seed=cfg.seed)
        specs, skipped = self._plan(real)
        extractors = []
        for spec in specs:
            try:
                extractors.append(self._extractors.get(spec, real, real_images, synthetic_images, training,
                                                       weights=cfg.weights, device=self.context.device))
            except ConfigError as err:
                if cfg.extractors:
                    raise
                skipped[spec] = str(err)  # an optional default extractor that cannot run on this data
        if not extractors:
            raise ConfigError(f"{self.name}: no feature extractor can run here ({'; '.join(skipped.values())})")
        cells = []
        with self.context.progress.task(f"{self.name}: features", total=len(extractors) * len(scales)) as task:
            for extractor in extractors:
                for scale in scales:
                    cells.append(Cell(extractor, scale, extractor.encode(real_images, scale),
                                      extractor.encode(synthetic_images, scale),
                                      None if reference is None else extractor.encode(reference, scale)))
                    task.advance()
        details = {"extractors": [e.name for e in extractors], "skipped": skipped, "scales": list(scales),
                   "train_size": train_size, "train_steps": cfg.steps, "seed": cfg.seed,
                   "n_real": len(real_images), "n_synthetic": len(synthetic_images),
                   "extractor_info": {e.name: e.info for e in extractors},
                   "sd": f"population sd over the {len(cells)} grid cells"}
        return cells, details

    def _plan(self, real: Dataset) -> tuple[list[str], dict[str, str]]:
        """The extractors to build, and the defaults left out with the reason."""
        if self.config.extractors:
            return list(self.config.extractors), {}
        specs, skipped = [], {}
        try:
            self._weights()
            specs.append("inception")
        except ConfigError as err:
            skipped["inception"] = str(err)
        if real.labelled():
            specs.append("segmenter")
        else:
            skipped["segmenter"] = "the real set has no masks"
        specs.append("discriminator")
        specs += [f"labels:{column}" for column in label_columns(real)]
        return specs, skipped


class MMFIDEvaluator(_MultiScaleEvaluator):
    """Multi-scale multi-task FID (paper 004): FIDs over scales x extractors, each normalised to [0, 1]."""

    Config = MMFIDConfig
    needs_reference = True

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        cells, details = self._grid(real, synthetic)
        rows = []
        for cell in cells:
            fid, notes = frechet(cell.real, cell.synthetic)
            reference, _ = frechet(cell.real, cell.reference)
            rows.append({**cell.describe(), "fid": fid, "reference_fid": reference,
                         "normalised": normalise(fid, reference), **({"notes": notes} if len(notes) > 1 else {})})
        values = np.asarray([r["normalised"] for r in rows])
        details.update(normalisation=NORMALISATION, cells=rows, by_extractor=_by_extractor(rows, "normalised"))
        return [Metric("mm-fid", float(values.mean()), "lower", float(values.std()), details)]


class MMSTDEvaluator(_MultiScaleEvaluator):
    """Multi-scale multi-task STD (paper 004): spread of features over scales x extractors, synthetic vs real."""

    Config = MMSTDConfig

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        cells, details = self._grid(real, synthetic)
        rows = []
        for cell in cells:
            std_real, std_synthetic = feature_std(cell.real), feature_std(cell.synthetic)
            ratio = std_synthetic / std_real if std_real > 0 else float("nan")
            rows.append({**cell.describe(), "std_real": std_real, "std_synthetic": std_synthetic, "ratio": ratio})
        details.update(
            what="MM-STD of the synthetic set, mean ± sd over the grid cells", cells=rows,
            by_extractor=_by_extractor(rows, "ratio"),
            std="per cell: mean over feature dimensions of the per-dimension standard deviation (ddof=1)",
            directions="the raw spreads are descriptive ('none'); the ratio follows the paper (more variety is "
                       "better) but noise raises it too, so read it with mm-fid")
        synthetic_std = np.asarray([r["std_synthetic"] for r in rows])
        real_std = np.asarray([r["std_real"] for r in rows])
        ratios = np.asarray([r["ratio"] for r in rows if np.isfinite(r["ratio"])])
        ratio = (float(ratios.mean()), float(ratios.std())) if len(ratios) else (float("nan"), None)
        return [
            Metric("mm-std", float(synthetic_std.mean()), "none", float(synthetic_std.std()), details),
            Metric("mm-std_real", float(real_std.mean()), "none", float(real_std.std()),
                   {"what": "MM-STD of the real set over the same grid"}),
            Metric("mm-std_ratio", ratio[0], "higher", ratio[1],
                   {"what": "per-cell synthetic / real MM-STD, mean ± sd over the grid cells; 1 = the real "
                            "variety, below 1 = collapse (noise also raises it: read it with mm-fid)",
                    "cells": int(len(ratios))}),
        ]


def normalise(fid: float, reference: float) -> float:
    """FID / reference FID clipped to [0, 1]; 1 when the reference is 0 but the FID is not."""
    if fid <= 0:
        return 0.0
    return float(min(1.0, fid / reference)) if reference > 0 else 1.0


def feature_std(features: np.ndarray) -> float:
    """Mean over feature dimensions of the per-dimension standard deviation."""
    return float(np.std(features, axis=0, ddof=1).mean())


def _by_extractor(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    names = dict.fromkeys(r["extractor"] for r in rows)
    return {n: float(np.nanmean([r[key] for r in rows if r["extractor"] == n])) for n in names}
