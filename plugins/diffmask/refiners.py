"""Mask refiners of the paper's section 3.3: adaptive threshold (eq. 4), affinity random walk, DenseCRF
(eq. 3) and Method 1's cross-fusion of the last two.

Every refiner reads the sample's soft mask (else its mask), scaled to [0, 1] by its own minimum and maximum
so that thresholds mean the same for any generator, and writes a binary mask with value ``label``. The
affinity and CRF refiners also replace the soft mask with their refined one, so that a following refiner
(Method 2: affinity, then CRF) starts from it. Heavy imports (torch, pydensecrf) happen on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from medsynth_core import ConfigError, Refiner, Sample, option

GAMMAS = tuple(round(0.1 + 0.05 * k, 2) for k in range(17))  # 0.10, 0.15, ..., 0.90


def _check_unit(name: str, value: float, open_ends: bool = False) -> None:
    if not (0.0 < value < 1.0 if open_ends else 0.0 <= value <= 1.0):
        raise ConfigError(f"{name} must lie in {'(0, 1)' if open_ends else '[0, 1]'}, got {value}")


def _check_positive(config: object, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")


def _check_label(label: int) -> None:
    if not 1 <= label <= 255:
        raise ConfigError(f"label must be 1-255, got {label}")


@dataclass(frozen=True)
class AffinityOptions:
    """Options of the affinity network and its random walk (shared by the affinity-based refiners)."""

    fg: float = option(0.6, "Soft-mask level (after min-max scaling) from which pixels are confident foreground.")
    bg: float = option(0.3, "Soft-mask level up to which pixels are confident background; those in between "
                            "are neutral and their pairs ignored.")
    radius: int = option(4, "Pixels within this distance (at the working size) form the affinity pairs.")
    size: int = option(64, "Working size in px of the affinity network and the random walk.")
    affinity_steps: int = option(40, "Training steps of the per-image affinity network.")
    affinity_pairs: int = option(256, "Seed pairs of each kind (fg-fg, bg-bg, fg-bg) per training step.")
    affinity_lr: float = option(1e-2, "Learning rate of the affinity network (Adam).")
    affinity_width: int = option(32, "Hidden width of the affinity network.")
    beta: float = option(8.0, "Power of the affinities in the transition matrix (AffinityNet: 8).")
    walk_iterations: int = option(48, "Random-walk steps (T^t with t = this).")
    walk_threshold: float = option(0.5, "Level of the propagated map that counts as foreground.")

    def __post_init__(self) -> None:
        _check_unit("fg", self.fg)
        _check_unit("bg", self.bg)
        if self.bg >= self.fg:
            raise ConfigError(f"bg must be below fg, got bg {self.bg} and fg {self.fg}")
        _check_positive(self, "radius", "affinity_steps", "affinity_pairs", "affinity_width", "walk_iterations")
        if self.size < 8:
            raise ConfigError(f"size must be >= 8 px, got {self.size}")
        if not self.affinity_lr > 0 or not self.beta > 0:
            raise ConfigError(f"affinity_lr and beta must be > 0, got {self.affinity_lr} and {self.beta}")
        _check_unit("walk_threshold", self.walk_threshold, open_ends=True)

    def affinity_settings(self):
        """The options as :class:`affinity.AffinitySettings`."""
        from .affinity import AffinitySettings

        return AffinitySettings(fg=self.fg, bg=self.bg, radius=self.radius, size=self.size,
                                steps=self.affinity_steps, lr=self.affinity_lr, width=self.affinity_width,
                                beta=self.beta, iterations=self.walk_iterations, pairs=self.affinity_pairs)


@dataclass(frozen=True)
class CRFOptions:
    """Options of the dense CRF (shared by the CRF-based refiners)."""

    crf_iterations: int = option(5, "Mean-field iterations.")
    gaussian_sxy: float = option(3.0, "Width of the smoothness kernel, px at 256 px (scaled with the image).")
    gaussian_compat: float = option(3.0, "Weight of the smoothness kernel.")
    bilateral_sxy: float = option(40.0, "Spatial width of the appearance kernel, px at 256 px (scaled).")
    bilateral_srgb: float = option(13.0, "Intensity width of the appearance kernel, in 8-bit grey levels.")
    bilateral_compat: float = option(6.0, "Weight of the appearance kernel.")
    unary: Literal["binary", "soft"] = option(
        "binary", "'binary': the unary is the current mask (eq. 3: the map thresholded; Otsu when there is no "
                  "mask yet) held with 'confidence'; 'soft': the soft mask itself as the foreground probability.")
    confidence: float = option(0.8, "'binary' unary: probability of the mask's own label at each pixel.")

    def __post_init__(self) -> None:
        _check_positive(self, "crf_iterations")
        for name in ("gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.5 < self.confidence < 1.0:
            raise ConfigError(f"confidence must lie in (0.5, 1), got {self.confidence}")

    def crf_settings(self):
        """The options as :class:`crf.CRFSettings`."""
        from .crf import CRFSettings

        return CRFSettings(iterations=self.crf_iterations, gaussian_sxy=self.gaussian_sxy,
                           gaussian_compat=self.gaussian_compat, bilateral_sxy=self.bilateral_sxy,
                           bilateral_srgb=self.bilateral_srgb, bilateral_compat=self.bilateral_compat)


def _soft_of(sample: Sample) -> np.ndarray | None:
    if sample.soft_mask is not None:
        return sample.soft_mask
    if sample.mask is not None:
        return (sample.mask > 0).astype(np.float32)
    return None


def _scaled(soft: np.ndarray) -> np.ndarray:
    lo, hi = float(soft.min()), float(soft.max())
    return np.zeros_like(soft, np.float32) if hi - lo < 1e-8 else ((soft - lo) / (hi - lo)).astype(np.float32)


def otsu(scaled: np.ndarray) -> float:
    """Otsu's threshold of a map in [0, 1] (0.5 for a flat map)."""
    from skimage.filters import threshold_otsu

    return 0.5 if float(scaled.max()) - float(scaled.min()) < 1e-6 else float(threshold_otsu(scaled))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean maps (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def adaptive_gamma(scaled: np.ndarray, reference: np.ndarray, gammas: Sequence[float]) -> tuple[float, float]:
    """Eq. 4: the gamma of ``gammas`` whose binarised map best matches ``reference`` (IoU), and that IoU.

    Ties go to the smallest gamma.
    """
    scores = [iou(scaled > g, reference) for g in gammas]
    best = int(np.argmax(scores))
    return float(gammas[best]), float(scores[best])


def _binary(mask: np.ndarray, label: int) -> np.ndarray:
    return mask.astype(np.uint8) * np.uint8(label)


def _seed(sample: Sample) -> int:
    return int(sample.meta.get("seed", 0))


class _SoftRefiner(Refiner):
    """Runs ``_refine_one`` on samples that carry a soft mask or a mask; others pass unchanged."""

    in_worker = True  # plain CPU work on each sample

    def refine(self, samples: Sequence[Sample]) -> list[Sample]:
        return [s if _soft_of(s) is None else self._refine_one(s) for s in samples]

    def _refine_one(self, sample: Sample) -> Sample:
        raise NotImplementedError


@dataclass(frozen=True)
class AdaptiveThresholdConfig(AffinityOptions):
    """Options of the adaptive threshold."""

    gammas: tuple[float, ...] = option(GAMMAS, "The grid Omega of thresholds gamma tried on the scaled soft mask.")
    reference: Literal["affinity", "otsu"] = option(
        "affinity", "'affinity': pick gamma by eq. 4 against the affinity-propagated map (Otsu when the map has "
                    "no confident foreground or background); 'otsu': Otsu's threshold directly.")
    label: int = option(1, "Label value of foreground pixels.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gammas or any(not 0.0 <= g < 1.0 for g in self.gammas):
            raise ConfigError(f"gammas must be one or more values in [0, 1), got {self.gammas}")
        _check_label(self.label)


class AdaptiveThresholdRefiner(_SoftRefiner):
    """Eq. 4's fusion threshold: the gamma from a grid that best matches the affinity-propagated map (else Otsu)."""

    Config = AdaptiveThresholdConfig

    def _refine_one(self, sample: Sample) -> Sample:
        cfg = self.config
        scaled = _scaled(_soft_of(sample))
        reference = None
        if cfg.reference == "affinity":
            from .affinity import propagate

            walked = propagate(sample.image, scaled, cfg.affinity_settings(), _seed(sample))
            reference = None if walked is None else walked > cfg.walk_threshold
        if reference is None:
            gamma, source, match = otsu(scaled), "otsu", None
        else:
            (gamma, match), source = adaptive_gamma(scaled, reference, cfg.gammas), "affinity"
        out = sample.replace(mask=_binary(scaled > gamma, cfg.label))
        out.meta.update(threshold=round(gamma, 4), threshold_source=source)
        if match is not None:
            out.meta["threshold_match"] = round(match, 4)
        return out


@dataclass(frozen=True)
class AffinityConfig(AffinityOptions):
    """Options of the affinity refiner."""

    label: int = option(1, "Label value of foreground pixels.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_label(self.label)


class AffinityRefiner(_SoftRefiner):
    """AffinityNet-style refinement: affinities learned from confident pixels, soft mask spread by a random walk."""

    Config = AffinityConfig

    def _refine_one(self, sample: Sample) -> Sample:
        from .affinity import propagate

        cfg = self.config
        scaled = _scaled(_soft_of(sample))
        walked = propagate(sample.image, scaled, cfg.affinity_settings(), _seed(sample))
        if walked is None:  # no confident foreground or background: nothing to learn from, keep the map
            out = sample.replace(mask=_binary(scaled > otsu(scaled), cfg.label))
            out.meta["affinity"] = "skipped: no seeds"
            return out
        return sample.replace(mask=_binary(walked > cfg.walk_threshold, cfg.label), soft_mask=walked)


def _crf_refine(sample: Sample, soft: np.ndarray, mask: np.ndarray | None, cfg: CRFOptions) -> np.ndarray:
    """Foreground marginals of the CRF for one sample: unary from ``mask`` (binary) or ``soft``."""
    from .crf import dense_crf

    scaled = _scaled(soft)
    if cfg.unary == "binary":
        fg = mask > 0 if mask is not None else scaled > otsu(scaled)
        prob = np.where(fg, cfg.confidence, 1 - cfg.confidence).astype(np.float32)
    else:
        prob = scaled
    return dense_crf(sample.image, prob, cfg.crf_settings())


@dataclass(frozen=True)
class DenseCRFConfig(CRFOptions):
    """Options of the DenseCRF refiner."""

    label: int = option(1, "Label value of foreground pixels.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_label(self.label)


class DenseCRFRefiner(_SoftRefiner):
    """Fully connected CRF with Gaussian and bilateral kernels over the image, unary from the (soft) mask."""

    Config = DenseCRFConfig

    def _refine_one(self, sample: Sample) -> Sample:
        q = _crf_refine(sample, _soft_of(sample), sample.mask, self.config)
        return sample.replace(mask=_binary(q > 0.5, self.config.label), soft_mask=q.astype(np.float32))


@dataclass(frozen=True)
class CrossFusionConfig(CRFOptions, AffinityOptions):
    """Options of cross-fusion (Method 1)."""

    criterion: Literal["contrast", "agreement"] = option(
        "contrast", "How the better stream is chosen without ground truth: 'contrast': Fisher separation of the "
                    "image inside vs outside the mask (a mask that follows the organ separates its intensities "
                    "best); 'agreement': IoU with the Otsu-binarised input soft mask (stays closest to attention).")
    label: int = option(1, "Label value of foreground pixels.")

    def __post_init__(self) -> None:
        CRFOptions.__post_init__(self)
        AffinityOptions.__post_init__(self)
        _check_label(self.label)


def fisher_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """(mean_in - mean_out)^2 / (var_in + var_out) of the grey image; 0 for an empty or full mask."""
    grey = image.mean(axis=2) if image.ndim == 3 else image
    inside, outside = grey[mask], grey[~mask]
    if inside.size < 2 or outside.size < 2:
        return 0.0
    return float((inside.mean() - outside.mean()) ** 2 / (inside.var() + outside.var() + 1e-8))


class CrossFusionRefiner(_SoftRefiner):
    """Method 1: CRF then affinity, and affinity then CRF, keeping the better mask by a stated criterion."""

    Config = CrossFusionConfig

    def _refine_one(self, sample: Sample) -> Sample:
        from .affinity import propagate

        cfg = self.config
        soft = _scaled(_soft_of(sample))
        aff, seed = cfg.affinity_settings(), _seed(sample)
        # stream A: spatial coherence first (CRF), then semantic affinity on the CRF's marginals
        q = _crf_refine(sample, soft, None, cfg)
        walked_a = propagate(sample.image, q, aff, seed)
        soft_a = q if walked_a is None else walked_a
        mask_a = soft_a > (0.5 if walked_a is None else cfg.walk_threshold)
        # stream B: affinity first, then the CRF on its mask (eq. 3)
        walked_b = propagate(sample.image, soft, aff, seed)
        soft_b = soft if walked_b is None else walked_b
        first_b = soft_b > (otsu(soft) if walked_b is None else cfg.walk_threshold)
        q_b = _crf_refine(sample, soft_b, first_b, cfg)
        mask_b = q_b > 0.5
        if cfg.criterion == "contrast":
            scores = (fisher_contrast(sample.image, mask_a), fisher_contrast(sample.image, mask_b))
        else:
            base = soft > otsu(soft)
            scores = (iou(mask_a, base), iou(mask_b, base))
        pick = 0 if scores[0] >= scores[1] else 1
        out = sample.replace(mask=_binary((mask_a, mask_b)[pick], cfg.label),
                             soft_mask=(soft_a, q_b)[pick].astype(np.float32))
        out.meta.update(fusion_stream=("crf-then-affinity", "affinity-then-crf")[pick],
                        fusion_scores=[round(s, 4) for s in scores])
        return out

