"""A small segmentation-models-pytorch U-Net, trained and used the same way by every plugin.

Evaluators (mask agreement, utility) and filters (Dice filter, noise learning) all need "a
segmenter trained on these pairs"; sharing one recipe keeps their numbers comparable.
Training is seeded and runs on CPU in seconds at the default sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_core import ConfigError, Sample

from .images import image_batch, mask_batch


@dataclass(frozen=True)
class SegmenterRecipe:
    """How to build and train a segmenter."""

    encoder: str = "tu-resnet10t"
    depth: int = 3
    width: int = 16
    size: int = 64
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= 5:
            raise ConfigError(f"segmenter depth must be 1-5, got {self.depth}")
        for name in ("width", "size", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"segmenter {name} must be >= 1, got {getattr(self, name)}")
        if self.size % (2**self.depth):
            raise ConfigError(f"segmenter size must be a multiple of {2**self.depth}, got {self.size}")


class Segmenter:
    """A trained U-Net with the size and classes it was trained for."""

    def __init__(self, model: torch.nn.Module, recipe: SegmenterRecipe, classes: int, channels: int,
                 device: str) -> None:
        self.model, self.recipe, self.classes, self.channels, self.device = model, recipe, classes, channels, device

    @torch.no_grad()
    def probabilities(self, images: Sequence[np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
        """Per-image class probabilities (classes x H x W) at each image's own size."""
        self.model.eval()
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = image_batch(chunk, self.recipe.size, self.channels).to(self.device)
            probs = _probabilities(self.model(x))
            for image, p in zip(chunk, probs):
                h, w = image.shape[:2]
                out.append(F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0].cpu().numpy())
        return out

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Predicted uint8 label maps, one per image, at each image's own size."""
        return [p.argmax(axis=0).astype(np.uint8) for p in self.probabilities(images)]

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray], size: int | None = None, batch_size: int = 32) -> np.ndarray:
        """Global-average-pooled deepest encoder features (N x D), images resized to ``size``."""
        self.model.eval()
        size = size or self.recipe.size
        feats = []
        for start in range(0, len(images), batch_size):
            x = image_batch(images[start:start + batch_size], size, self.channels).to(self.device)
            deepest = self.model.encoder(x)[-1]
            feats.append(deepest.mean(dim=(2, 3)).cpu().numpy())
        return np.concatenate(feats).astype(np.float64)


def build_unet(recipe: SegmenterRecipe, channels: int, classes: int) -> torch.nn.Module:
    """An smp U-Net without pretrained weights (nothing is downloaded)."""
    import segmentation_models_pytorch as smp

    decoder = tuple(recipe.width * 2 ** (recipe.depth - 1 - i) for i in range(recipe.depth))
    return smp.Unet(recipe.encoder, encoder_weights=None, encoder_depth=recipe.depth, decoder_channels=decoder,
                    in_channels=channels, classes=1 if classes == 2 else classes)


def train_segmenter(samples: Sequence[Sample], recipe: SegmenterRecipe, *, classes: int = 2, device: str = "cpu",
                    init: torch.nn.Module | None = None, steps: int | None = None,
                    on_step: Callable[[int, float], None] | None = None) -> Segmenter:
    """Train a U-Net on ``samples`` (Dice + cross-entropy) and return it.

    ``init`` continues from an existing model (pretrain then fine-tune); ``steps`` overrides the
    recipe's. ``on_step(step, loss)`` is called after each step, for progress bars.
    """
    labelled = [s for s in samples if s.mask is not None]
    if not labelled:
        raise ConfigError("cannot train a segmenter: no sample has a mask")
    channels = 3 if any(s.image.ndim == 3 for s in labelled) else 1
    torch.manual_seed(recipe.seed)
    model = init if init is not None else build_unet(recipe, channels, classes)
    model = model.to(device).train()
    images = image_batch([s.image for s in labelled], recipe.size, channels)
    masks = mask_batch([s.mask for s in labelled], recipe.size).clamp_(max=classes - 1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    rng = torch.Generator().manual_seed(recipe.seed)
    total = steps if steps is not None else recipe.steps
    for step in range(total):
        pick = torch.randint(len(labelled), (min(recipe.batch_size, len(labelled)),), generator=rng)
        x, y = images[pick].to(device), masks[pick].to(device)
        flip = torch.rand(len(pick), generator=rng) < 0.5  # cheap augmentation that keeps anatomy plausible
        x = torch.where(flip[:, None, None, None].to(device), x.flip(-1), x)
        y = torch.where(flip[:, None, None].to(device), y.flip(-1), y)
        loss = segmentation_loss(model(x), y, classes)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    return Segmenter(model.eval(), recipe, classes, channels, device)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """Soft Dice plus (binary) cross-entropy, the usual pair for medical segmentation."""
    if classes == 2:
        fg = target.float()[:, None]
        bce = F.binary_cross_entropy_with_logits(logits, fg)
        prob = torch.sigmoid(logits)
        dice = 1 - (2 * (prob * fg).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + fg.sum((1, 2, 3)) + 1)
        return bce + dice.mean()
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(1)
    onehot = F.one_hot(target, classes).permute(0, 3, 1, 2).float()
    dice = 1 - (2 * (prob * onehot).sum((2, 3)) + 1) / (prob.sum((2, 3)) + onehot.sum((2, 3)) + 1)
    return ce + dice[:, 1:].mean()


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:
        fg = torch.sigmoid(logits)
        return torch.cat([1 - fg, fg], dim=1)
    return logits.softmax(1)


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice of two label maps (1.0 when both are empty)."""
    p, t = pred > 0, truth > 0
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(p, t).sum() / total)


def iou_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground intersection over union (1.0 when both are empty)."""
    p, t = pred > 0, truth > 0
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)
