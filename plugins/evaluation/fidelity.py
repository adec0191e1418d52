"""FID, KID and the Inception Score on features medsynth extracts itself, scored with clean-fid's functions.

The metric name carries the extractor (``fid[inception]``, ``kid[segmenter]``): an FID on a
segmenter's features is not the FID of the literature and is never reported under that name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsynth_core import ConfigError, Dataset, Evaluator, Metric, option
from medsynth_plugins.common.features import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    INCEPTION_SIZE,
    InceptionFeatures,
    inception_weights,
)

from .fidelity_features import (
    AUTO_SIZE_CAP,
    ExtractorCache,
    Training,
    auto_size,
    check_extractor_spec,
    check_size,
    frechet,
    images_of,
    kid_subsets,
)

WEIGHTS_HELP = (f"Local copy of clean-fid's {INCEPTION_FILE} (a file, or a folder holding it); "
                f"empty: the {INCEPTION_ENV} environment variable. Nothing is downloaded.")


@dataclass(frozen=True)
class FIDConfig:
    """Options of the fid evaluator."""

    extractor: str = option(
        "inception",
        "Feature extractor: 'inception' (clean-fid's InceptionV3, needs weights), 'segmenter' (encoder of a "
        "U-Net trained on the real masks), 'discriminator' (small CNN trained to tell real from synthetic) or "
        "'labels:<column>' (small CNN trained on a column of labels.csv in the real folder: stem, labels...).")
    size: int = option(
        0,
        f"Extractor input size in px, a multiple of 8; 0: the real images' size rounded to a multiple of 8, at "
        f"most {AUTO_SIZE_CAP}. Inception always sees 299 px: with 0 it resizes from the images' own size as "
        "clean-fid does, otherwise from a size x size view.")
    weights: Path | None = option(None, WEIGHTS_HELP)
    steps: int = option(200, "Training steps of the segmenter, discriminator or label classifier.")
    seed: int = option(0, "Seed of that training (and of KID's subsets).")

    def __post_init__(self) -> None:
        check_extractor_spec(self.extractor)
        check_size(self.size, "size")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


class FIDEvaluator(Evaluator):
    """Fréchet distance between real and synthetic features (clean-fid's formula), named by its extractor."""

    Config = FIDConfig

    def __init__(self, config: FIDConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._extractors = ExtractorCache()

    def unavailable(self) -> str | None:
        if self.config.extractor != "inception":
            return None
        try:
            inception_weights(str(self.config.weights) if self.config.weights else None)
        except ConfigError as err:
            return str(err)
        return None

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        real_features, synthetic_features, details = self._features(real, synthetic)
        value, notes = frechet(real_features, synthetic_features)
        return [Metric(f"fid[{details['extractor']}]", value, "lower", details={**details, **notes})]

    def _features(self, real: Dataset, synthetic: Dataset) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Both sets' features with the configured extractor, and report details naming it and its input."""
        cfg = self.config
        real_images, synthetic_images = images_of(real, "real"), images_of(synthetic, "synthetic")
        size = cfg.size or auto_size(real_images)
        extractor = self._extractors.get(cfg.extractor, real, real_images, synthetic_images,
                                         Training(size=size, steps=cfg.steps, seed=cfg.seed), weights=cfg.weights,
                                         device=self.context.device)
        view = None if extractor.name == "inception" and not cfg.size else size
        details = {"extractor": extractor.name, "input": extractor.input(view),
                   "input_size": INCEPTION_SIZE if extractor.name == "inception" else size,
                   "n_real": len(real_images), "n_synthetic": len(synthetic_images), **extractor.info}
        return extractor.encode(real_images, view), extractor.encode(synthetic_images, view), details


@dataclass(frozen=True)
class KIDConfig(FIDConfig):
    """Options of the kid evaluator."""

    subsets: int = option(100, "Number of random subset pairs (clean-fid's num_subsets).")
    subset_size: int = option(1000, "Images per subset (clean-fid's max_subset_size); at most the smaller set.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.subsets < 1:
            raise ConfigError(f"subsets must be >= 1, got {self.subsets}")
        if self.subset_size < 2:
            raise ConfigError(f"subset_size must be >= 2, got {self.subset_size}")


class KIDEvaluator(FIDEvaluator):
    """Kernel Inception Distance (clean-fid's cubic polynomial kernel) over seeded subsets, mean ± sd."""

    Config = KIDConfig

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        real_features, synthetic_features, details = self._features(real, synthetic)
        values, m = kid_subsets(real_features, synthetic_features, self.config.subsets, self.config.subset_size,
                                self.config.seed)
        details.update(feature_dim=int(real_features.shape[1]), subsets=len(values), subset_size=m,
                       kernel="(x.y / d + 1)^3, clean-fid's kernel_distance per subset")
        return [Metric(f"kid[{details['extractor']}]", float(values.mean()), "lower", float(values.std()), details)]


@dataclass(frozen=True)
class InceptionScoreConfig:
    """Options of the inception-score evaluator."""

    weights: Path | None = option(None, WEIGHTS_HELP)
    splits: int = option(10, "Splits of the set; the score is the mean over splits and sd their spread.")

    def __post_init__(self) -> None:
        if self.splits < 1:
            raise ConfigError(f"splits must be >= 1, got {self.splits}")


class InceptionScoreEvaluator(Evaluator):
    """Inception Score exp(E KL(p(y|x) || p(y))) of the synthetic set (and of the real set, for reference)."""

    Config = InceptionScoreConfig

    def unavailable(self) -> str | None:
        try:
            inception_weights(str(self.config.weights) if self.config.weights else None)
        except ConfigError as err:
            return str(err)
        return None

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        path = inception_weights(str(self.config.weights) if self.config.weights else None)
        model = InceptionFeatures(path, device=self.context.device)
        metrics = []
        for name, what, dataset, direction in (("inception-score", "synthetic", synthetic, "higher"),
                                               ("inception-score_real", "real", real, "none")):
            probs = model.class_probabilities(images_of(dataset, what, minimum=1))
            scores = inception_scores(probs, self.config.splits)
            metrics.append(Metric(name, float(scores.mean()), direction, float(scores.std()),
                                  {"splits": len(scores), "n": len(probs), "classes": int(probs.shape[1]),
                                   "weights": str(path)}))
        return metrics


def inception_scores(probs: np.ndarray, splits: int) -> np.ndarray:
    """exp(mean KL(p(y|x) || p(y))) in each of ``min(splits, n)`` contiguous splits, p(y) per split."""
    scores = []
    for part in np.array_split(probs, min(splits, len(probs))):
        marginal = part.mean(axis=0, keepdims=True)
        kl = np.sum(part * (np.log(part + 1e-12) - np.log(marginal + 1e-12)), axis=1)
        scores.append(float(np.exp(kl.mean())))
    return np.asarray(scores)
