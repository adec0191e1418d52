"""Unsupervised masks (the paper's Algorithm 1): superpixels, their mean intensity, quantised by a gap t.

An unsupervised mask (UM) is stored as a float32 map in [0, 1] (grey H x W, or H x W x 3 for
colour images) whose values are multiples of ``gap / 255``: the 0-255 levels of the paper
divided by 255, so that it travels as an ordinary image.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Superpixels = Literal["slic", "felzenszwalb"]


def superpixel_labels(image: np.ndarray, segments: int = 512, method: Superpixels = "slic",
                      compactness: float = 10.0, fz_scale: float = 100.0, fz_sigma: float = 0.5,
                      fz_min_size: int = 20) -> np.ndarray:
    """An int label map of superpixels of ``image`` (float in [0, 1], grey or colour).

    SLIC aims at ``segments`` superpixels; grey images are scaled to 0-100 so that
    ``compactness`` means the same as for colour images, which SLIC compares in Lab (L in 0-100).
    Felzenszwalb's graph-based method sets its own number of regions through ``fz_scale``.
    """
    from skimage.segmentation import felzenszwalb, slic

    colour = image.ndim == 3
    if method == "slic":
        data = image.astype(np.float64) if colour else image.astype(np.float64) * 100.0
        return slic(data, n_segments=segments, compactness=compactness, channel_axis=-1 if colour else None,
                    start_label=0, enforce_connectivity=True)
    return felzenszwalb(image.astype(np.float64), scale=fz_scale, sigma=fz_sigma, min_size=fz_min_size,
                        channel_axis=-1 if colour else None)


def mean_per_superpixel(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each pixel set to the mean of its superpixel (lines 2-5 of Algorithm 1, without the loop)."""
    flat = labels.ravel()
    counts = np.bincount(flat).astype(np.float64)
    counts[counts == 0] = 1.0
    channels = image.reshape(flat.size, -1).astype(np.float64)
    means = np.stack([np.bincount(flat, weights=channels[:, c], minlength=counts.size) / counts
                      for c in range(channels.shape[1])], axis=1)
    return means[flat].reshape(image.shape)


def quantise(values_255: np.ndarray, gap: float) -> np.ndarray:
    """``int(S / t) * t`` on a 0-255 scale (line 6 of Algorithm 1)."""
    # a mean such as 49.99999 is 50 read back from 8-bit pixels; the epsilon keeps it in its level
    return np.floor(values_255 / gap + 1e-6) * gap


def unsupervised_mask(image: np.ndarray, segments: int = 512, gap: float = 50.0, method: Superpixels = "slic",
                      colour: bool = True, compactness: float = 10.0, fz_scale: float = 100.0,
                      fz_sigma: float = 0.5, fz_min_size: int = 20) -> np.ndarray:
    """The unsupervised mask of ``image`` as float32 in [0, 1], levels at multiples of ``gap / 255``.

    ``colour=False`` makes colour images grey first; otherwise each colour channel is averaged
    and quantised on its own, so a colour image gives a colour mask.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and not colour:
        img = img.mean(axis=2)
    labels = superpixel_labels(img, segments, method, compactness, fz_scale, fz_sigma, fz_min_size)
    mean = mean_per_superpixel(img, labels)
    return (quantise(mean * 255.0, gap) / 255.0).astype(np.float32)


def snap_to_levels(um: np.ndarray, gap: float) -> np.ndarray:
    """Round a continuous map in [0, 1] to the nearest UM level (for generated masks)."""
    top = np.floor(255.0 / gap + 1e-6) * gap
    return (np.clip(np.round(um * 255.0 / gap) * gap, 0.0, top) / 255.0).astype(np.float32)


def count_levels(um: np.ndarray) -> int:
    """How many distinct levels (per pixel value, or colour) a UM holds."""
    flat = np.round(np.asarray(um) * 255.0).reshape(um.shape[0] * um.shape[1], -1)
    return int(np.unique(flat, axis=0).shape[0])


def resize_um(um: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize, which keeps the UM's levels exact."""
    if um.shape[:2] == tuple(size):
        return um
    t = torch.from_numpy(np.ascontiguousarray(um, dtype=np.float32))
    t = t[None, None] if um.ndim == 2 else t.permute(2, 0, 1)[None]
    out = F.interpolate(t, size=tuple(size), mode="nearest")[0]
    return (out[0] if um.ndim == 2 else out.permute(1, 2, 0)).numpy()
