"""Masks as ControlNet condition images, and the grids of the paper's figures."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Binary masks read as white on black (the paper's Fig. 1); further classes get clear, distinct colours.
_FIXED = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
          (255, 0, 255), (255, 128, 0), (128, 0, 255), (0, 128, 255), (128, 255, 0)]


def _palette() -> np.ndarray:
    colours = list(_FIXED)
    for k in range(len(colours), 256):  # golden-ratio hues: neighbours differ, and the map never changes
        r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.8, 0.95)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return np.asarray(colours, dtype=np.float32) / 255.0


PALETTE = _palette()
"""RGB in [0, 1] of every mask value 0-255."""


def colour_condition(mask: np.ndarray) -> np.ndarray:
    """The condition image of a label map: H x W x 3 float32, one fixed colour per mask value."""
    return PALETTE[np.asarray(mask, dtype=np.uint8)]


def condition_batch(masks: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """N x 3 x size x size condition images in [0, 1]; masks are resized by nearest neighbour first."""
    out = []
    for mask in masks:
        labels = torch.from_numpy(np.asarray(mask, dtype=np.uint8).astype(np.int64))
        if labels.shape != (size, size):
            labels = F.interpolate(labels[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
        out.append(torch.from_numpy(PALETTE)[labels].permute(2, 0, 1))
    return torch.stack(out)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A float image as H x W x 3."""
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    return image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tiles (H x W or H x W x 3, all one size) laid out row by row on a white background."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    sheet = np.ones((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            sheet[y:y + h, x:x + w] = np.clip(to_rgb(tile), 0.0, 1.0)
    return sheet


def grid_tiles(sheet: np.ndarray, size: int, column: int, pad: int = 2) -> list[np.ndarray]:
    """The tiles of one column of a :func:`grid` of size x size tiles, top to bottom."""
    rows = (sheet.shape[0] - pad) // (size + pad)
    x = pad + column * (size + pad)
    return [sheet[pad + i * (size + pad):pad + i * (size + pad) + size, x:x + size] for i in range(rows)]
