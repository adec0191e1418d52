"""Feature extractors for distribution metrics (FID, KID, MM-FID, MM-STD) and clustering.

- :class:`InceptionFeatures`: clean-fid's InceptionV3 (the TorchScript file
  ``inception-2015-12-05.pt``) from a local path, with clean-fid's own "clean" resizing. The
  path comes from an option or ``MEDSYNTH_INCEPTION_WEIGHTS``; nothing is downloaded.
- :class:`ClassifierFeatures`: a small CNN trained on a task of the data itself (real vs
  synthetic, or a label column), as the MM-FID paper does with its dataset-specific tasks.
- :class:`SegmenterFeatures`: the encoder of a U-Net trained to segment the real set.

Every extractor maps a list of float images to an N x D float64 array at a given input size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsynth_core import ConfigError

from .images import as_rgb_uint8, image_batch
from .segmenter import Segmenter

INCEPTION_ENV = "MEDSYNTH_INCEPTION_WEIGHTS"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SIZE = 299


def inception_weights(path: str | None, option: str = "weights") -> Path:
    """The local Inception file from ``path`` or the environment, or ConfigError saying how to give it."""
    chosen = path or os.environ.get(INCEPTION_ENV)
    if not chosen:
        raise ConfigError(
            f"InceptionV3 weights are needed and cannot be downloaded here: set the option {option!r} "
            f"or {INCEPTION_ENV} to a local copy of clean-fid's {INCEPTION_FILE}")
    found = Path(chosen)
    if found.is_dir():
        found = found / INCEPTION_FILE
    if not found.is_file():
        raise ConfigError(f"{found}: InceptionV3 weights not found (option {option!r} or {INCEPTION_ENV})")
    return found


def clean_resize(image_uint8: np.ndarray, size: int) -> np.ndarray:
    """clean-fid's "clean" resize (PIL bicubic on float channels) to size x size, values 0-255."""
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", False, "bicubic", (size, size))(image_uint8)


class InceptionFeatures:
    """2048-d pool features of clean-fid's InceptionV3, loaded from a local TorchScript file."""

    name = "inception"

    def __init__(self, weights: Path, device: str = "cpu") -> None:
        try:
            self.model = torch.jit.load(str(weights), map_location=device).eval()
        except Exception as err:  # TorchScript raises RuntimeError and others for foreign files
            raise ConfigError(f"{weights}: not a TorchScript InceptionV3 ({str(err).splitlines()[0]})") from None
        self.device = device

    def prepare(self, images: Sequence[np.ndarray], scale: int | None = None) -> torch.Tensor:
        """N x 3 x 299 x 299 in 0-255, as clean-fid feeds its network (optionally via a scale x scale view)."""
        batch = []
        for image in images:
            rgb = as_rgb_uint8(image)
            if scale is not None:
                rgb = np.clip(np.round(clean_resize(rgb, scale)), 0, 255).astype(np.uint8)
            batch.append(clean_resize(rgb, INCEPTION_SIZE).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(batch)).float()

    @torch.no_grad()
    def features(self, images: Sequence[np.ndarray], size: int | None = None, batch_size: int = 32) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = self.prepare(images[start:start + batch_size], size).to(self.device)
            out.append(self.model.layers.forward((x - 128) / 128).reshape(len(x), -1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    @torch.no_grad()
    def class_probabilities(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Softmax over the ImageNet classes, for the Inception Score."""
        out = []
        for start in range(0, len(images), batch_size):
            x = self.prepare(images[start:start + batch_size]).to(self.device)
            logits = self.model(x, return_features=False).reshape(len(x), -1)
            is_softmax = torch.allclose(logits.sum(1), torch.ones(len(x), device=logits.device), atol=1e-3)
            probs = logits if is_softmax else logits.softmax(1)
            out.append(probs.cpu().numpy())
        return np.concatenate(out).astype(np.float64)


class SmallCNN(nn.Module):
    """Four conv blocks, global pooling, a linear head: any input size, features before the head."""

    def __init__(self, channels: int, classes: int, width: int = 16) -> None:
        super().__init__()
        layers, c = [], channels
        for k in range(4):
            layers += [nn.Conv2d(c, width * 2**k, 3, padding=1), nn.GroupNorm(4, width * 2**k), nn.SiLU(),
                       nn.MaxPool2d(2)]
            c = width * 2**k
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N x D)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class ClassifierFeatures:
    """Features of a small CNN trained to tell classes of the data apart (seeded, CPU-sized)."""

    def __init__(self, name: str, model: SmallCNN, channels: int, device: str = "cpu") -> None:
        self.name, self.model, self.channels, self.device = name, model.eval(), channels, device

    @classmethod
    def train(cls, name: str, images: Sequence[np.ndarray], labels: Sequence[int], *, size: int = 64,
              steps: int = 150, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
              device: str = "cpu") -> ClassifierFeatures:
        """Train on (image, integer label) pairs with cross-entropy."""
        classes = int(max(labels)) + 1
        if classes < 2:
            raise ConfigError(f"extractor {name!r}: its task needs at least two classes")
        channels = 3 if any(im.ndim == 3 for im in images) else 1
        torch.manual_seed(seed)
        model = SmallCNN(channels, classes).to(device).train()
        x_all = image_batch(images, size, channels)
        y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
        rng = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            pick = torch.randint(len(images), (min(batch_size, len(images)),), generator=rng)
            loss = F.cross_entropy(model(x_all[pick].to(device)), y_all[pick].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        return cls(name, model, channels, device)

    @torch.no_grad()
    def features(self, images: Sequence[np.ndarray], size: int, batch_size: int = 64) -> np.ndarray:
        out = [self.model.embed(image_batch(images[s:s + batch_size], size, self.channels).to(self.device))
               for s in range(0, len(images), batch_size)]
        return torch.cat(out).cpu().numpy().astype(np.float64)


class SegmenterFeatures:
    """Deepest encoder features of a U-Net trained on the real masks: a task of the data itself."""

    name = "segmenter"

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter

    def features(self, images: Sequence[np.ndarray], size: int) -> np.ndarray:
        return self.segmenter.encode(images, size)
