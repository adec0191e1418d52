"""Agreement of synthetic masks with a real-trained segmenter's predictions (paper 003)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medsynth_core import ConfigError, Dataset, Evaluator, Metric, option
from medsynth_plugins.common.segmenter import (
    Segmenter,
    SegmenterRecipe,
    build_unet,
    dice_score,
    iou_score,
    train_segmenter,
)


@dataclass(frozen=True)
class MaskAgreementConfig:
    """Options of the mask-agreement evaluator."""

    steps: int = option(200, "Training steps of the segmenter on the real pairs.")
    size: int = option(64, "Side (a multiple of 8) the segmenter sees images at; predictions come back at full size.")
    encoder: str = option("tu-resnet10t", "segmentation-models-pytorch encoder name, built without pretrained weights.")
    seed: int = option(0, "Seed of the segmenter's initialisation and batches.")
    batch_size: int = option(8, "Training batch size.")

    def __post_init__(self) -> None:
        if not self.encoder:
            raise ConfigError("encoder must name a segmentation-models-pytorch encoder, got ''")
        self.recipe()  # checks steps, size and batch_size with the recipe's own messages

    def recipe(self) -> SegmenterRecipe:
        """The shared segmenter recipe with these options."""
        return SegmenterRecipe(encoder=self.encoder, size=self.size, steps=self.steps, batch_size=self.batch_size,
                               seed=self.seed)


class MaskAgreementEvaluator(Evaluator):
    """Dice and IoU between a real-trained segmenter's prediction and each synthetic mask (higher is better aligned).

    DiffuseExpand (paper 003) judges whether a synthetic image and its mask agree by letting a
    segmenter trained on real pairs segment the image and comparing its prediction with the
    mask it came with: a mask drawn where the image shows no such structure scores low. The
    segmenter is the shared U-Net recipe of ``medsynth_plugins.common`` (no pretrained weights,
    seeded), trained on the real set's labelled pairs as foreground (any label > 0) against
    background. Dice and IoU are of the foreground
    (every label > 0), mean and sd over the synthetic pairs that have a mask. The same numbers
    on the real set are the segmenter's training fit: the ceiling the synthetic numbers can be
    read against, not a held-out score.
    """

    Config = MaskAgreementConfig

    def unavailable(self) -> str | None:
        try:
            import segmentation_models_pytorch  # noqa: F401
        except ImportError:
            return "needs segmentation-models-pytorch: pip install segmentation-models-pytorch"
        return None

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        segmenter = self.train(real)
        metrics = []
        for which, dataset, direction in (("synthetic", synthetic, "higher"), ("real", real, "none")):
            dice, iou, skipped = self.agreement(segmenter, dataset)
            details = {"pairs": len(dice), "skipped_without_mask": skipped, "steps": self.config.steps,
                       "size": self.config.size, "encoder": self.config.encoder, "seed": self.config.seed}
            if which == "real":
                details["note"] = "training fit of the segmenter, for reference"
            for name, values in (("dice", dice), ("iou", iou)):
                what = {"what": f"foreground {name} of the segmenter's prediction against the {which} masks", **details}
                if not values:
                    metrics.append(Metric(f"{name}_{which}", math.nan, direction,
                                          details={**what, "note": f"no {which} pair has a mask"}))
                else:
                    arr = np.asarray(values)
                    metrics.append(Metric(f"{name}_{which}", float(arr.mean()), direction, float(arr.std()), what))
        return metrics

    def train(self, real: Dataset) -> Segmenter:
        """The segmenter trained on the real set's labelled pairs."""
        labelled = [real[i] for i in real.labelled()]
        if not labelled:
            raise ConfigError("mask-agreement: the real set has no labelled pair to train the segmenter on")
        try:
            build_unet(self.config.recipe(), 1, 2)
        except (KeyError, RuntimeError):  # smp: KeyError for its own names, timm: RuntimeError for tu-*
            raise ConfigError(f"mask-agreement: unknown encoder {self.config.encoder!r}; use an smp encoder name "
                              "such as 'resnet18' or a timm one as 'tu-NAME'") from None
        with self.context.progress.task("training the mask-agreement segmenter", total=self.config.steps) as bar:
            return train_segmenter(labelled, self.config.recipe(), classes=2, device=self.context.device,
                                   on_step=lambda step, loss: bar.advance())

    @staticmethod
    def agreement(segmenter: Segmenter, dataset: Dataset) -> tuple[list[float], list[float], int]:
        """Per-pair foreground Dice and IoU of the predictions against the masks, and pairs without a mask."""
        indices = [i for i in range(len(dataset)) if dataset[i].mask is not None]
        dice, iou = [], []
        chunk = 64  # predict in chunks so a large synthetic set is never held as one batch
        for start in range(0, len(indices), chunk):
            samples = [dataset[i] for i in indices[start:start + chunk]]
            for sample, pred in zip(samples, segmenter.predict([s.image for s in samples])):
                dice.append(dice_score(pred, sample.mask))
                iou.append(iou_score(pred, sample.mask))
        return dice, iou, len(dataset) - len(indices)
