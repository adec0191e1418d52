"""What made a file: versions of the software involved, and time stamps."""

from __future__ import annotations

import importlib.metadata
import platform
from datetime import UTC, datetime

_PACKAGES = ("medsynth", "torch", "diffusers", "numpy", "scikit-image", "segmentation-models-pytorch")


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def software_versions() -> dict[str, str]:
    """Versions of Python and the main libraries, for dataset cards and checkpoints."""
    return {"python": platform.python_version(), **{p: package_version(p) for p in _PACKAGES}}


def now_iso() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()
