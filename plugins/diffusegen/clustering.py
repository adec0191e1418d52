"""Group the training pairs by appearance: features of each image and its mask, then KMeans.

The paper embeds every image and mask with an ImageNet InceptionV3 and clusters the features
into 20 groups with scikit-learn's KMeans, so that each diffusion model sees similar images.
InceptionV3 needs local weights here; without them a fixed, seeded random convolutional network
(no download, deterministic) stands in, and the log says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsynth_core import ConfigError
from medsynth_plugins.common.features import INCEPTION_ENV, InceptionFeatures, inception_weights
from medsynth_plugins.common.images import image_batch

ExtractorName = Literal["auto", "inception", "random-cnn"]
RANDOM_CNN_SIZE = 64


class RandomCNNFeatures:
    """Mean and spread of each channel of a fixed, seeded random conv net, at three scales.

    Random convolutional features separate images by intensity, contrast and texture well enough
    to group similar pairs, and need no weights. No normalisation layers, so brightness counts.
    """

    name = "random-cnn"

    def __init__(self, seed: int = 0, device: str = "cpu") -> None:
        gen = torch.Generator().manual_seed(seed)
        widths, layers, c = (16, 32, 64), [], 3
        for w in widths:
            conv = nn.Conv2d(c, w, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * c)) ** 0.5)
                conv.bias.zero_()
            layers.append(conv)
            c = w
        self.layers = nn.ModuleList(layers).to(device).eval()
        self.device = device

    @torch.no_grad()
    def features(self, images: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = image_batch(list(images[start:start + batch_size]), RANDOM_CNN_SIZE, 3).to(self.device)
            stats = [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
            for conv in self.layers:
                x = F.relu(conv(x))
                stats += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
            out.append(torch.cat(stats, dim=1).cpu())
        return torch.cat(out).numpy().astype(np.float64)


def make_extractor(name: ExtractorName, weights: str | None, device: str) -> tuple[Any, str]:
    """The extractor to use and a line for the log naming it."""
    if name == "auto":
        name = "inception" if (weights or _env_weights()) else "random-cnn"
        if name == "random-cnn":
            return RandomCNNFeatures(device=device), (
                f"no InceptionV3 weights (option inception_weights or {INCEPTION_ENV}); clustering with "
                "features of a fixed random CNN instead of the paper's InceptionV3")
    if name == "inception":
        path = inception_weights(weights, "inception_weights")
        return InceptionFeatures(path, device=device), f"clustering with InceptionV3 features ({path})"
    return RandomCNNFeatures(device=device), "clustering with features of a fixed random CNN"


def _env_weights() -> str | None:
    import os

    return os.environ.get(INCEPTION_ENV) or None


def pair_features(extractor: Any, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
    """Image features next to mask features (the mask embedded as a picture), N x 2D."""
    mask_pictures = [(np.asarray(m) > 0).astype(np.float32) for m in masks]
    return np.concatenate([extractor.features(list(images)), extractor.features(mask_pictures)], axis=1)


@dataclass
class Clusters:
    """Which cluster each training pair belongs to, with what is needed to place a new pair."""

    extractor: str
    assignments: dict[str, int]
    centroids: np.ndarray  # k x D, in standardised feature space
    mean: np.ndarray
    scale: np.ndarray
    weights: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(len(self.centroids))

    def sizes(self) -> list[int]:
        """Pairs per cluster."""
        counts = np.bincount(np.asarray(list(self.assignments.values()), dtype=np.int64), minlength=self.k)
        return [int(c) for c in counts]

    def members(self, cluster: int) -> list[str]:
        return sorted(stem for stem, c in self.assignments.items() if c == cluster)

    def predict(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], device: str = "cpu") -> list[int]:
        """The nearest cluster of pairs that were not in the training set."""
        if self.k == 1:
            return [0] * len(images)
        name = "inception" if self.extractor == "inception" else "random-cnn"
        extractor, _ = make_extractor(name, self.weights, device)
        z = (pair_features(extractor, images, masks) - self.mean) / self.scale
        dist = ((z[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        return [int(c) for c in dist.argmin(axis=1)]

    def to_json(self) -> dict[str, Any]:
        return {"extractor": self.extractor, "k": self.k, "sizes": self.sizes(), "weights": self.weights,
                "assignments": dict(sorted(self.assignments.items())), "centroids": self.centroids.tolist(),
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), **self.notes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Clusters:
        return cls(extractor=data["extractor"], assignments={str(k): int(v) for k, v in data["assignments"].items()},
                   centroids=np.asarray(data["centroids"], dtype=np.float64), mean=np.asarray(data["mean"]),
                   scale=np.asarray(data["scale"]), weights=data.get("weights"))

    @classmethod
    def single(cls, stems: Sequence[str]) -> Clusters:
        """Everything in one group: the Full-Diff setting, which needs no features."""
        return cls(extractor="none", assignments=dict.fromkeys(stems, 0), centroids=np.zeros((1, 1)),
                   mean=np.zeros(1), scale=np.ones(1))


def choose_k(pairs: int, wanted: int, min_size: int) -> int:
    """``wanted`` clusters, fewer when the set cannot give each about ``min_size`` pairs."""
    return max(1, min(wanted, pairs // max(1, min_size)))


def kmeans(features: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardise features and run KMeans; return (labels, centroids, mean, scale)."""
    from sklearn.cluster import KMeans

    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (features - mean) / scale
    if k == 1:
        return np.zeros(len(z), dtype=np.int64), z.mean(axis=0, keepdims=True), mean, scale
    model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(z)
    return model.labels_.astype(np.int64), model.cluster_centers_, mean, scale


def cluster_pairs(stems: Sequence[str], images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, k: int,
                  extractor: ExtractorName = "auto", weights: str | None = None, seed: int = 0,
                  device: str = "cpu", log=None) -> Clusters:
    """Cluster the pairs into ``k`` groups by image and mask features."""
    if len(stems) != len(images) or len(images) != len(masks):
        raise ConfigError("cluster_pairs: stems, images and masks must have the same length")
    model, line = make_extractor(extractor, weights, device)
    if log is not None:
        log(f"diffusegen: {line}; {len(stems)} pairs into {k} clusters")
    labels, centroids, mean, scale = kmeans(pair_features(model, images, masks), k, seed)
    chosen = str(getattr(model, "name", extractor))
    return Clusters(extractor=chosen, assignments={s: int(c) for s, c in zip(stems, labels)}, centroids=centroids,
                    mean=mean, scale=scale,
                    weights=str(inception_weights(weights, "inception_weights")) if chosen == "inception" else None)


def read_clusters(path: Path) -> Clusters:
    import json

    return Clusters.from_json(json.loads(path.read_text()))
