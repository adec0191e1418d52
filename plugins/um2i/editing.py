"""Editing an unsupervised mask: paint a patch of one level, so the generator adds or grows a lesion.

The paper (Fig. 10) draws lesion patches of different shapes, sizes and intensities into a
UM; the UM2I generator then paints a matching lesion into the image and its segmentation. The
options below are shared by the ``slic-um`` and ``um-generator`` mask sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from medsynth_core import ConfigError, option

from .superpixels import quantise


@dataclass(frozen=True)
class EditOptions:
    """Options that paint a patch into each unsupervised mask (off unless edit_shape is set)."""

    edit_shape: Literal["none", "disc", "ellipse", "square"] = option(
        "none", "Shape of a patch painted into every UM (the paper's lesion editing); 'none' paints nothing.")
    edit_size: float = option(0.1, "Patch radius (disc, ellipse major semi-axis) or half side (square), "
                                   "as a fraction of the image's shorter side.")
    edit_center: tuple[float, float] = option(
        (0.4, 0.3), "Patch centre as (row, column) fractions of the image height and width.")
    edit_jitter: float = option(0.0, "Random shift of the centre per sample, up to this fraction of each side.")
    edit_intensity: float = option(
        0.6, "Patch level in [0, 1] (x 255 on the paper's scale), snapped down to a UM level like the rest.")
    edit_aspect: float = option(0.6, "Ellipse minor / major axis ratio.")
    edit_angle: float = option(30.0, "Ellipse rotation in degrees.")

    def __post_init__(self) -> None:
        if not 0.0 < self.edit_size <= 1.0:
            raise ConfigError(f"edit_size must be in (0, 1], got {self.edit_size}")
        if not all(0.0 <= c <= 1.0 for c in self.edit_center):
            raise ConfigError(f"edit_center must be two fractions in [0, 1], got {self.edit_center}")
        if not 0.0 <= self.edit_jitter <= 0.5:
            raise ConfigError(f"edit_jitter must be in [0, 0.5], got {self.edit_jitter}")
        if not 0.0 <= self.edit_intensity <= 1.0:
            raise ConfigError(f"edit_intensity must be in [0, 1], got {self.edit_intensity}")
        if not 0.0 < self.edit_aspect <= 1.0:
            raise ConfigError(f"edit_aspect must be in (0, 1], got {self.edit_aspect}")


def patch_mask(shape: tuple[int, int], kind: str, size: float, center: tuple[float, float],
               aspect: float = 1.0, angle: float = 0.0) -> np.ndarray:
    """A boolean H x W patch of ``kind`` ('disc', 'ellipse', 'square'); sizes as fractions of the shorter side."""
    h, w = shape
    radius = size * min(h, w)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = rows - center[0] * (h - 1), cols - center[1] * (w - 1)
    if kind == "square":
        return (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
    if kind == "disc":
        return dy**2 + dx**2 <= radius**2
    theta = np.deg2rad(angle)
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return (u / radius) ** 2 + (v / max(radius * aspect, 0.5)) ** 2 <= 1.0


def apply_edit(um: np.ndarray, options: EditOptions, gap: float, rng: np.random.Generator
               ) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Paint the configured patch into ``um`` (a copy); return it and a record for the manifest."""
    if options.edit_shape == "none":
        return um, None
    jitter = rng.uniform(-options.edit_jitter, options.edit_jitter, size=2) if options.edit_jitter else np.zeros(2)
    center = tuple(float(np.clip(c + j, 0.0, 1.0)) for c, j in zip(options.edit_center, jitter))
    patch = patch_mask(um.shape[:2], options.edit_shape, options.edit_size, center,
                       options.edit_aspect, options.edit_angle)
    level = float(quantise(np.array(options.edit_intensity * 255.0), gap)) / 255.0
    edited = um.copy()
    edited[patch] = level
    record = {"shape": options.edit_shape, "size": options.edit_size, "center": [round(c, 4) for c in center],
              "level": round(level, 4), "pixels": int(patch.sum())}
    return edited, record
