"""The values that flow through a pipeline: conditions, samples, verdicts and metrics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .errors import PipelineError

CONDITION_KINDS = ("mask", "image", "prompt")


@dataclass
class Condition:
    """What a MaskSource hands a Generator for one sample.

    Any field may be empty: ``mask`` is a uint8 label map (H x W), ``image`` a reference image
    (float32 in [0, 1], for example the real image of a real mask), ``prompt`` a text prompt.
    ``meta`` carries provenance such as ``{"source": "case_012"}`` into the manifest.
    """

    mask: np.ndarray | None = None
    image: np.ndarray | None = None
    prompt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def kinds(self) -> frozenset[str]:
        """The kinds of content this condition holds (a subset of ``CONDITION_KINDS``)."""
        return frozenset(k for k in CONDITION_KINDS if getattr(self, k) is not None)


@dataclass
class Sample:
    """One image with its annotation.

    ``image`` is float32, H x W (grey) or H x W x C, in [0, 1]. ``mask`` is a uint8 label map
    (0 = background) of the same H x W; ``soft_mask`` a float32 H x W foreground probability that
    a Refiner can turn into a mask. ``meta`` holds the index, seed, provenance of every stage and
    filter scores; the runner fills it, components may add their own keys.
    """

    image: np.ndarray
    mask: np.ndarray | None = None
    soft_mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """Height and width."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def replace(self, **changes: Any) -> Sample:
        """A copy with some fields replaced; ``meta`` is copied, not shared."""
        changes.setdefault("meta", dict(self.meta))
        return dataclasses.replace(self, **changes)

    def check(self, where: str) -> None:
        """Raise PipelineError naming ``where`` if the arrays break the Sample contract."""
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.float32 or img.ndim not in (2, 3):
            raise PipelineError(f"{where}: image must be a float32 H x W or H x W x C array, got "
                                f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")
        if img.size and (float(img.min()) < 0.0 or float(img.max()) > 1.0 or not np.isfinite(img).all()):
            raise PipelineError(f"{where}: image values must lie in [0, 1]")
        for name, arr, dtype in (("mask", self.mask, np.uint8), ("soft_mask", self.soft_mask, np.float32)):
            if arr is None:
                continue
            if arr.dtype != dtype or arr.shape != img.shape[:2]:
                raise PipelineError(f"{where}: {name} must be {np.dtype(dtype).name} of shape {img.shape[:2]}, "
                                    f"got {arr.dtype} {arr.shape}")


@dataclass(frozen=True)
class Verdict:
    """A Filter's decision on one sample: its score and whether to keep it.

    A filter that repairs instead of dropping (for example relabelling a mask) returns the
    repaired sample in ``sample``; ``note`` says what it did (``"relabelled"``).
    """

    keep: bool
    score: float
    sample: Sample | None = None
    note: str = ""


@dataclass(frozen=True)
class Metric:
    """One named score from an Evaluator.

    ``direction`` says which way is better (``"lower"`` for FID, ``"higher"`` for Dice,
    ``"none"`` for descriptive numbers); ``sd`` is a standard deviation when the value is a
    mean; ``details`` holds anything else worth keeping in report.json.
    """

    name: str
    value: float
    direction: Literal["higher", "lower", "none"] = "none"
    sd: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
