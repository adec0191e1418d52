"""Turning Samples into tensors of one size and channel count."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def as_grey(image: np.ndarray) -> np.ndarray:
    """A float image as H x W (colour averaged)."""
    return image.mean(axis=2) if image.ndim == 3 else image


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as H x W x 3 uint8, the input clean-fid expects."""
    arr = np.clip(np.round(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr[..., :3]


def image_batch(images: Sequence[np.ndarray], size: int, channels: int = 1) -> torch.Tensor:
    """N x C x size x size float tensor in [0, 1], resized bilinearly (antialiased when shrinking)."""
    if channels == 1:
        arrays = [as_grey(im)[None] for im in images]
    else:
        arrays = [np.repeat(im[None], 3, axis=0) if im.ndim == 2 else np.moveaxis(im[..., :3], -1, 0) for im in images]
    return torch.stack([_resize(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), size) for a in arrays])


def mask_batch(masks: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """N x size x size int64 label maps, resized by nearest neighbour."""
    tensors = [torch.from_numpy(np.asarray(m, dtype=np.int64))[None, None].float() for m in masks]
    return torch.cat([F.interpolate(t, size=(size, size), mode="nearest") for t in tensors])[:, 0].long()


def _resize(chw: torch.Tensor, size: int) -> torch.Tensor:
    if chw.shape[-2:] == (size, size):
        return chw
    shrinking = min(chw.shape[-2:]) > size
    return F.interpolate(chw[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=shrinking)[0]
