"""Fully connected CRF (Krähenbühl & Koltun, NeurIPS 2011) over an image, unary from a soft or binary mask.

Two classes (background, foreground); a Gaussian (smoothness) kernel and a bilateral (appearance) kernel,
mean-field inference with the ``pydensecrf`` binding (``pydensecrf2`` on PyPI).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFERENCE_SIZE = 256  # kernel widths are given in px at this size and scaled with the image


@dataclass(frozen=True)
class CRFSettings:
    """Kernel widths (px at 256 px; ``srgb`` in 8-bit grey levels), weights and iterations."""

    iterations: int = 5
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 40.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 6.0


def dense_crf(image: np.ndarray, foreground: np.ndarray, settings: CRFSettings) -> np.ndarray:
    """Foreground marginals (H x W float32) after mean-field inference.

    ``foreground`` is the unary's foreground probability per pixel, clipped away from 0 and 1.
    """
    import pydensecrf.densecrf as dcrf

    h, w = foreground.shape
    scale = max(h, w) / REFERENCE_SIZE
    p = np.clip(foreground.astype(np.float32), 1e-4, 1 - 1e-4)
    unary = -np.log(np.stack([1 - p, p]).reshape(2, -1))
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=max(settings.gaussian_sxy * scale, 0.5), compat=settings.gaussian_compat)
    crf.addPairwiseBilateral(sxy=max(settings.bilateral_sxy * scale, 0.5), srgb=settings.bilateral_srgb,
                             rgbim=_rgb_uint8(image), compat=settings.bilateral_compat)
    q = np.asarray(crf.inference(settings.iterations), dtype=np.float32).reshape(2, h, w)
    return q[1]


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
    arr = np.clip(np.round(np.asarray(image, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])
