"""Compare mask statistics of a synthetic set with the real set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

from medsynth_core import ConfigError, Dataset, Evaluator, Metric, foreground_fraction, option


@dataclass(frozen=True)
class MaskStatsConfig:
    """Options of the mask-stats evaluator."""

    min_component: int = option(4, "Connected components smaller than this many pixels are not counted.")

    def __post_init__(self) -> None:
        if self.min_component < 1:
            raise ConfigError(f"min_component must be >= 1, got {self.min_component}")


class MaskStatsEvaluator(Evaluator):
    """Foreground fraction and connected components, real vs synthetic, with Wasserstein distances."""

    Config = MaskStatsConfig

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        real_stats = self._stats(real)
        syn_stats = self._stats(synthetic)
        metrics = []
        for key, label in (("fraction", "foreground fraction"), ("components", "connected components")):
            r, s = real_stats[key], syn_stats[key]
            metrics += [
                Metric(f"{key}_real", float(r.mean()), "none", float(r.std()), {"what": f"{label}, real"}),
                Metric(f"{key}_synthetic", float(s.mean()), "none", float(s.std()), {"what": f"{label}, synthetic"}),
                Metric(f"{key}_wasserstein", float(stats.wasserstein_distance(r, s)), "lower",
                       details={"what": f"Wasserstein-1 distance between the {label} distributions"}),
            ]
        metrics.append(Metric("empty_synthetic", float(np.mean(syn_stats["fraction"] == 0)), "lower",
                              details={"what": "share of synthetic masks with no foreground"}))
        return metrics

    def _stats(self, dataset: Dataset) -> dict[str, np.ndarray]:
        fractions, components = [], []
        for sample in dataset:
            if sample.mask is None:
                continue
            fractions.append(foreground_fraction(sample.mask))
            labelled, count = ndimage.label(sample.mask > 0)
            sizes = np.bincount(labelled.ravel())[1:] if count else np.array([])
            components.append(int(np.sum(sizes >= self.config.min_component)))
        if not fractions:
            fractions, components = [0.0], [0]
        return {"fraction": np.asarray(fractions, dtype=float), "components": np.asarray(components, dtype=float)}
