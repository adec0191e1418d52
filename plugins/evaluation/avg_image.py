"""Variety as the lossless file size of a set's average image (ImageNet's measure, used by paper 004)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from medsynth_core import ConfigError, Dataset, Evaluator, Metric, numpy_rng, option

from ._pixels import all_colour, common_shape, prepare

CODECS = ("ljpeg", "jpegls", "png")
CODEC_NAMES = {
    "ljpeg": "lossless JPEG (ITU-T T.81 process 14, liblj92 via imagecodecs)",
    "jpegls": "JPEG-LS lossless (ITU-T T.87, CharLS via imagecodecs)",
    "png": "PNG (zlib level 9, Pillow)",
}


@dataclass(frozen=True)
class AvgImageConfig:
    """Options of the avg-image-jpeg evaluator."""

    codec: Literal["ljpeg", "jpegls", "png"] = option(
        "ljpeg", "Lossless codec: 'ljpeg' (lossless JPEG), 'jpegls' (JPEG-LS) or 'png'.")
    size: int = option(0, "Resize every image to size x size; 0 uses the smallest height and width of both sets.")
    noise: bool = option(True, "Also estimate each image's noise level (wavelet sigma), which inflates the size.")
    images: int = option(0, "Average this many images per set (drawn with seed), as the size falls with the count; "
                            "0 uses every image.")
    seed: int = option(0, "Seed of the draw when images is set.")

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ConfigError(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.size != 0 and self.size < 8:
            raise ConfigError(f"size must be 0 (smallest of the sets) or >= 8, got {self.size}")
        if self.images < 0:
            raise ConfigError(f"images must be 0 (all) or >= 1, got {self.images}")


class AvgImageJPEGEvaluator(Evaluator):
    """Lossless JPEG size in bytes of the average image (lower is more varied), real and synthetic, with noise level.

    ImageNet measured the variety of a class by the lossless JPEG file size of its average image:
    varied images average to a blur, which compresses well; a collapsed set averages to a sharp
    image, which does not. Xing et al. (paper 004) use it for synthetic CT, reporting the noise
    level beside it because noise also inflates the file. The average is taken in float over
    every image of the set, brought to one size (``size``, or the smallest height and width of
    both sets, so the two byte counts are comparable), quantised to 8 bits and compressed. The
    average of fewer images is sharper, so sets of very different sizes are best compared with
    ``images`` set: each set is then averaged over that many images drawn with ``seed``.

    Codec: by default true lossless JPEG (ITU-T T.81 process 14, the predictive lossless mode,
    encoded by liblj92 through the ``imagecodecs`` package); it is a greyscale encoder, so a
    colour average is encoded one channel at a time and the sizes summed. ``jpegls`` (CharLS)
    and ``png`` (Pillow, zlib level 9) are offered for comparison; the codec is named in every
    metric's details. Noise is skimage's ``estimate_sigma`` (the wavelet median-absolute-
    deviation estimate of Gaussian noise) on each image at its own size, in units of the [0, 1]
    intensity range, reported as mean and sd per set.
    """

    Config = AvgImageConfig

    def unavailable(self) -> str | None:
        if self.config.codec != "png":
            try:
                import imagecodecs  # noqa: F401
            except ImportError:
                return f"codec {self.config.codec!r} needs imagecodecs: pip install imagecodecs (or set codec=png)"
        if self.config.noise:
            try:
                import pywt  # noqa: F401
            except ImportError:
                return "the noise estimate needs PyWavelets: pip install PyWavelets (or set noise=false)"
        return None

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        cfg = self.config
        shape = common_shape([real, synthetic], cfg.size)
        colour = all_colour([real, synthetic])
        common = {"codec": cfg.codec, "codec_name": CODEC_NAMES[cfg.codec], "bits": 8,
                  "size": [shape[1], shape[0]], "colour": colour}
        metrics: list[Metric] = []
        noise_metrics: list[Metric] = []
        for which, dataset, direction in (("synthetic", synthetic, "lower"), ("real", real, "none")):
            details = {"what": f"lossless file size in bytes of the {which} set's average image", **common,
                       "images": len(dataset)}
            if not len(dataset):
                details["note"] = f"the {which} set is empty"
                metrics.append(Metric(f"avg_image_bytes_{which}", math.nan, direction, details=details))
                continue
            picked = pick_images(len(dataset), cfg.images, cfg.seed)
            details["averaged"] = len(picked)
            average = average_image(dataset, shape, colour, picked)
            if cfg.noise:
                sigmas = noise_levels(dataset, picked)
                details["noise_sigma"] = float(sigmas.mean())
                noise_metrics.append(Metric(
                    f"noise_sigma_{which}", float(sigmas.mean()), "none", float(sigmas.std()),
                    {"what": f"estimated Gaussian noise sd of the {which} images, in [0, 1] units",
                     "method": "skimage.restoration.estimate_sigma (wavelet MAD)", "images": len(sigmas)}))
            metrics.append(Metric(f"avg_image_bytes_{which}", float(encoded_size(average, cfg.codec)), direction,
                                  details=details))
        return metrics + noise_metrics


def pick_images(n: int, count: int, seed: int) -> list[int]:
    """Indices of the images to average: all when ``count`` is 0 or at least ``n``, else a seeded draw."""
    if not count or count >= n:
        return list(range(n))
    return sorted(numpy_rng(seed).choice(n, size=count, replace=False).tolist())


def average_image(dataset: Dataset, shape: tuple[int, int], colour: bool, indices: Sequence[int]) -> np.ndarray:
    """The pixel-wise mean of ``dataset``'s images ``indices`` at ``shape``, as uint8 (H x W or H x W x 3)."""
    total = np.zeros((*shape, 3) if colour else shape, dtype=np.float64)
    for i in indices:
        total += prepare(dataset[i].image, shape, colour)
    mean = total / len(indices)
    return np.clip(np.round(mean * 255.0), 0, 255).astype(np.uint8)


def encoded_size(image: np.ndarray, codec: str) -> int:
    """Bytes of ``image`` (uint8) losslessly encoded with ``codec``."""
    if codec == "png":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", optimize=True, compress_level=9)
        return len(buf.getvalue())
    import imagecodecs

    if codec == "ljpeg":
        planes = [image] if image.ndim == 2 else [np.ascontiguousarray(image[..., c]) for c in range(image.shape[2])]
        return sum(len(imagecodecs.ljpeg_encode(p)) for p in planes)
    # CharLS's own output estimate is too small for noise-like images; give it room
    return len(imagecodecs.jpegls_encode(image, out=2 * image.nbytes + 4096))


def noise_levels(dataset: Dataset, indices: Sequence[int]) -> np.ndarray:
    """skimage's wavelet estimate of the Gaussian noise sd of images ``indices`` (colour channels averaged)."""
    from skimage.restoration import estimate_sigma

    sigmas = []
    for i in indices:
        image = np.asarray(dataset[i].image, dtype=np.float64)
        channel_axis = -1 if image.ndim == 3 else None
        sigmas.append(float(estimate_sigma(image, channel_axis=channel_axis, average_sigmas=True)))
    return np.asarray(sigmas, dtype=np.float64)
