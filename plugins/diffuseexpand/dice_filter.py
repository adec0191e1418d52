"""The ``dice-filter``: Stage IV, keep a pair when a segmenter trained on real pairs agrees with its mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsynth_core import ConfigError, Dataset, Filter, PipelineError, Sample, Verdict, option
from medsynth_plugins.common.segmenter import Segmenter, SegmenterRecipe, train_segmenter


@dataclass(frozen=True)
class DiceFilterConfig:
    """Options of the dice-filter."""

    eta: float = option(0.065, "Keep a pair when the Dice loss of the segmenter's prediction against its mask "
                               "is below eta (the paper: 0.065).")
    relabel_below: float | None = option(
        None, "Relabel instead of drop: a pair whose Dice loss lies in [eta, relabel_below) keeps its image and takes "
              "the segmenter's mask (the authors' code: eta 0.2, relabel_below 0.4). None = drop.")
    steps: int = option(200, "Training steps of the filter's segmenter on the real pairs.")
    size: int = option(64, "Side of the filter segmenter's input, in px (a multiple of 8).")
    seed: int = option(0, "Seed of the filter segmenter's training.")

    def __post_init__(self) -> None:
        if not 0.0 < self.eta <= 1.0:
            raise ConfigError(f"eta must be in (0, 1], got {self.eta}")
        if self.relabel_below is not None and not self.eta < self.relabel_below <= 1.0:
            raise ConfigError(f"relabel_below must be in (eta, 1] = ({self.eta}, 1], got {self.relabel_below}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.size < 8 or self.size % 8:
            raise ConfigError(f"size must be a multiple of 8, got {self.size}")


class DiceFilter(Filter):
    """Keep pairs whose mask a segmenter trained on the real pairs reproduces (Dice loss < eta); optionally relabel."""

    Config = DiceFilterConfig
    needs_data = True

    segmenter: Segmenter | None = None
    values: Sequence[int] = (0, 1)  # mask value of each class index, set by fit

    def fit(self, dataset: Dataset) -> None:
        cfg = self.config
        self.values = sorted(dataset.label_values)
        lookup = np.zeros(256, dtype=np.uint8)
        lookup[self.values] = np.arange(len(self.values))
        # the shared segmenter wants class indices 0..K-1, whatever values the masks use
        pairs = [s.replace(mask=lookup[s.mask]) for s in (dataset[i] for i in dataset.labelled())]
        recipe = SegmenterRecipe(size=cfg.size, steps=cfg.steps, seed=cfg.seed)
        with self.context.progress.task(f"training the {self.name} segmenter", total=cfg.steps) as task:
            self.segmenter = train_segmenter(pairs, recipe, classes=len(self.values), device=self.context.device,
                                             on_step=lambda step, loss: (task.advance(), task.show(loss=f"{loss:.3f}")))

    def judge(self, samples: Sequence[Sample]) -> list[Verdict]:
        if self.segmenter is None:
            raise PipelineError(f"{self.name}: fit(dataset) before judge()")
        probabilities = self.segmenter.probabilities([s.image for s in samples])
        return [self._verdict(s, p) for s, p in zip(samples, probabilities)]

    def _verdict(self, sample: Sample, probs: np.ndarray) -> Verdict:
        if sample.mask is None:
            return Verdict(keep=False, score=1.0)
        predicted = probs.argmax(axis=0)
        loss = dice_loss(predicted, sample.mask, self.values)
        if loss < self.config.eta:
            return Verdict(keep=True, score=loss)
        if self.config.relabel_below is not None and loss < self.config.relabel_below:
            mask = np.asarray(self.values, dtype=np.uint8)[predicted]
            return Verdict(keep=True, score=loss, sample=sample.replace(mask=mask), note="relabelled")
        return Verdict(keep=False, score=loss)


def dice_loss(predicted: np.ndarray, mask: np.ndarray, values: Sequence[int]) -> float:
    """1 - Dice of a predicted class-index map against a label map, averaged over the foreground classes.

    Hard Dice, as the authors' Stage IV code computes it (the prediction thresholded first), so a
    segmenter that is right but not yet confident still recognises a matching pair.
    """
    losses = []
    for k, value in enumerate(values):
        if k == 0:
            continue
        p, t = predicted == k, mask == value
        total = int(p.sum()) + int(t.sum())
        losses.append(0.0 if total == 0 else 1.0 - 2.0 * float(np.logical_and(p, t).sum()) / total)
    return float(np.mean(losses)) if losses else 0.0
