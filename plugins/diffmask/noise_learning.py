"""The noise-learning filter: rank generated pairs by the loss of a segmenter trained on all of them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsynth_core import ConfigError, Filter, Sample, Verdict, option


@dataclass(frozen=True)
class NoiseLearningConfig:
    """Options of the noise-learning filter."""

    keep: float = option(0.3, "Fraction of the pairs kept, lowest loss first (the paper keeps 3,000 of 10,000).")
    steps: int = option(100, "Segmenter training steps. Few on purpose: a network fits clean pairs before noisy "
                             "ones (the small-loss trick), so an early stop ranks label noise best.")
    size: int = option(64, "Segmenter input size in px (a multiple of 2^depth).")
    encoder: str = option("tu-resnet10t", "segmentation-models-pytorch encoder, without pretrained weights.")
    depth: int = option(3, "Encoder depth (1-5).")
    width: int = option(16, "Decoder width of the deepest level.")
    batch_size: int = option(8, "Training batch size.")
    lr: float = option(2e-3, "Learning rate.")
    seed: int = option(0, "Training seed.")

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"keep must lie in (0, 1], got {self.keep}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        self.recipe()  # checks steps, size, depth, width and batch size

    def recipe(self):
        """The segmenter recipe."""
        from medsynth_plugins.common.segmenter import SegmenterRecipe

        return SegmenterRecipe(encoder=self.encoder, depth=self.depth, width=self.width, size=self.size,
                               steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=self.seed)


class NoiseLearningFilter(Filter):
    """Noise learning: a segmenter trained on every generated pair; the lowest-loss fraction of pairs is kept."""

    Config = NoiseLearningConfig
    scope = "set"

    def judge(self, samples: Sequence[Sample]) -> list[Verdict]:
        items = list(samples)
        if not items:
            return []
        losses = self.losses(items)
        keep = math.ceil(self.config.keep * len(items))
        order = np.argsort(losses, kind="stable")  # ties: the earlier pair first
        kept = set(order[:keep].tolist())
        return [Verdict(keep=k in kept, score=float(loss)) for k, loss in enumerate(losses)]

    def losses(self, items: Sequence[Sample]) -> np.ndarray:
        """The trained segmenter's loss (Dice + cross-entropy) on each pair."""
        import torch

        from medsynth_plugins.common.images import image_batch, mask_batch
        from medsynth_plugins.common.segmenter import segmentation_loss, train_segmenter

        recipe = self.config.recipe()
        classes = max(2, max(int(s.mask.max()) for s in items if s.mask is not None) + 1)
        with self.context.progress.task("noise learning: training the segmenter", total=recipe.steps) as task:
            def on_step(step: int, loss: float) -> None:
                task.advance()
                task.show(loss=f"{loss:.4f}")

            segmenter = train_segmenter(items, recipe, classes=classes, device=self.context.device, on_step=on_step)
        out = np.zeros(len(items))
        with torch.no_grad():
            for start in range(0, len(items), 32):
                chunk = items[start:start + 32]
                x = image_batch([s.image for s in chunk], recipe.size, segmenter.channels).to(segmenter.device)
                y = mask_batch([s.mask for s in chunk], recipe.size).clamp_(max=classes - 1).to(segmenter.device)
                logits = segmenter.model(x)
                for k in range(len(chunk)):
                    out[start + k] = float(segmentation_loss(logits[k:k + 1], y[k:k + 1], classes))
        return out
