"""Pixel helpers shared by the variety and paired evaluators: a common size and channel count."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from skimage.transform import resize

from medsynth_core import ConfigError, Dataset


def common_shape(datasets: Iterable[Dataset], size: int = 0) -> tuple[int, int]:
    """``(size, size)`` when ``size`` is set, else the smallest height and width in any of ``datasets``."""
    if size:
        return size, size
    heights, widths = [], []
    for dataset in datasets:
        for sample in dataset:
            heights.append(sample.image.shape[0])
            widths.append(sample.image.shape[1])
    if not heights:
        raise ConfigError("no images to evaluate: the datasets are empty")
    return min(heights), min(widths)


def all_colour(datasets: Iterable[Dataset]) -> bool:
    """True when every image of every dataset has colour channels (else images are compared in grey)."""
    return all(sample.image.ndim == 3 for dataset in datasets for sample in dataset)


def prepare(image: np.ndarray, shape: tuple[int, int], colour: bool) -> np.ndarray:
    """``image`` as float64 in [0, 1], H x W (grey) or H x W x 3, resized to ``shape`` if it differs."""
    arr = np.asarray(image, dtype=np.float64)
    if colour:
        arr = np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr[..., :3]
    elif arr.ndim == 3:
        arr = arr[..., :3].mean(axis=2)
    if arr.shape[:2] != tuple(shape):
        shrinking = arr.shape[0] > shape[0] or arr.shape[1] > shape[1]
        arr = resize(arr, (*shape, *arr.shape[2:]), order=1, anti_aliasing=shrinking, preserve_range=True)
    return np.clip(arr, 0.0, 1.0)


def stack(images: Sequence[np.ndarray], shape: tuple[int, int], colour: bool) -> np.ndarray:
    """N x H x W (or N x H x W x 3) float64 array of prepared images."""
    return np.stack([prepare(im, shape, colour) for im in images])
