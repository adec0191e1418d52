"""PSNR and SSIM of each synthetic image against the real image of its conditioning mask (paper 002)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medsynth_core import ConfigError, Dataset, Evaluator, Metric, Sample, option

from ._pixels import prepare


@dataclass(frozen=True)
class PSNRSSIMConfig:
    """Options of the psnr-ssim evaluator."""

    psnr_cap: float = option(100.0, "Cap on the PSNR in dB, given to identical images (whose PSNR is infinite).")
    size: int = option(0, "Compare at size x size; 0 compares at the real image's size.")
    skip_augmented: bool = option(
        True, "Skip pairs whose conditioning mask was warped (the real image no longer fits it).")
    require_pairs: bool = option(False, "Fail when no synthetic pair names a real source, instead of reporting nan.")

    def __post_init__(self) -> None:
        if not self.psnr_cap > 0 or not math.isfinite(self.psnr_cap):
            raise ConfigError(f"psnr_cap must be a finite number > 0, got {self.psnr_cap}")
        if self.size != 0 and self.size < 7:
            raise ConfigError(f"size must be 0 (the real image's size) or >= 7, got {self.size}")


def condition_source(sample: Sample) -> tuple[str | None, bool]:
    """The stem of the real pair whose mask conditioned ``sample``, and whether that mask was warped.

    A set opened from a run folder holds the runner's manifest record in ``meta``, so the
    condition sits under ``meta["meta"]["condition"]``; samples fresh from a generator carry it
    at ``meta["condition"]``.
    """
    nested = sample.meta.get("meta")
    condition: Any = (nested.get("condition") if isinstance(nested, dict) else None) or sample.meta.get("condition")
    if not isinstance(condition, dict) or condition.get("source") in (None, ""):
        return None, False
    return str(condition["source"]), bool(condition.get("augmented", False))


def real_stems(real: Dataset) -> list[str]:
    """The stem of each real pair (read from the file list when there is one, so no image is loaded)."""
    if real.files:
        return [f.stem for f in real.files]
    return [str(s.meta.get("stem", i)) for i, s in enumerate(real)]


class PSNRSSIMEvaluator(Evaluator):
    """PSNR and SSIM of each synthetic image against the real image of the same mask (higher is closer).

    Fang (paper 002) scores a mask-conditioned generator by comparing each generated image with
    the real image whose mask conditioned it. The real pair is found through the condition's
    ``source`` (the real stem a mask source such as ``real-masks`` or ``real-pairs`` records in
    the manifest); real samples are keyed by ``meta["stem"]``, or by their index as a string
    when they have none, as the mask sources do. Both images are compared in grey unless both
    have colour, at the real image's size (or ``size``), with ``data_range=1`` (skimage's
    ``peak_signal_noise_ratio`` and ``structural_similarity``, 7 px window or the largest odd
    window that fits). The PSNR of identical images is infinite; it is reported as ``psnr_cap``
    (100 dB by default, above any 16-bit quantisation error) so means and sds stay finite, and
    the number of capped pairs is kept in the details.

    Pairs without a source (an unconditional generator), with a source missing from the real
    set, or with a warped mask (``skip_augmented``) are skipped and counted. When no pair is
    left, ``psnr`` and ``ssim`` are reported as nan with a note saying why, so that a run that
    evaluates several sets still completes; set ``require_pairs`` to fail instead.
    """

    Config = PSNRSSIMConfig

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        cfg = self.config
        by_stem = {stem: i for i, stem in enumerate(real_stems(real))}
        skipped = {"no_source": 0, "unknown_source": 0, "augmented": 0}
        psnrs, ssims = [], []
        for sample in synthetic:
            source, augmented = condition_source(sample)
            if source is None:
                skipped["no_source"] += 1
            elif source not in by_stem:
                skipped["unknown_source"] += 1
            elif augmented and cfg.skip_augmented:
                skipped["augmented"] += 1
            else:
                p, s = self.compare(real[by_stem[source]].image, sample.image)
                psnrs.append(p)
                ssims.append(s)
        details = {"pairs": len(psnrs), "skipped": skipped, "data_range": 1.0, "psnr_cap": cfg.psnr_cap,
                   "size": cfg.size or "real image's size"}
        if not psnrs:
            note = (f"no synthetic image could be matched to a real image: {skipped['no_source']} had no condition "
                    f"source, {skipped['unknown_source']} named a stem not in the real set, {skipped['augmented']} "
                    "had a warped mask; psnr-ssim needs a generator conditioned on real masks")
            if cfg.require_pairs:
                raise ConfigError(f"psnr-ssim: {note}")
            return [Metric("psnr", math.nan, "higher", details={**details, "note": note}),
                    Metric("ssim", math.nan, "higher", details={**details, "note": note})]
        p, s = np.asarray(psnrs), np.asarray(ssims)
        return [
            Metric("psnr", float(p.mean()), "higher", float(p.std()),
                   {"what": "PSNR in dB of each synthetic image against the real image of its mask", **details,
                    "capped": int(np.sum(p >= cfg.psnr_cap))}),
            Metric("ssim", float(s.mean()), "higher", float(s.std()),
                   {"what": "SSIM of each synthetic image against the real image of its mask", **details}),
        ]

    def compare(self, real_image: np.ndarray, synthetic_image: np.ndarray) -> tuple[float, float]:
        """PSNR (capped) and SSIM of one pair, brought to one size and channel count."""
        shape = (self.config.size, self.config.size) if self.config.size else real_image.shape[:2]
        colour = real_image.ndim == 3 and synthetic_image.ndim == 3
        a, b = prepare(real_image, shape, colour), prepare(synthetic_image, shape, colour)
        if np.array_equal(a, b):
            psnr = self.config.psnr_cap
        else:
            psnr = min(float(peak_signal_noise_ratio(a, b, data_range=1.0)), self.config.psnr_cap)
        win = min(7, min(shape) - (1 - min(shape) % 2))  # skimage needs an odd window no larger than the image
        ssim = float(structural_similarity(a, b, data_range=1.0, win_size=win, channel_axis=-1 if colour else None))
        return psnr, ssim
