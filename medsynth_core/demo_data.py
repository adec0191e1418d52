"""The embedded default dataset: seeded chest-radiograph phantoms with lung masks.

``write_demo_dataset`` writes a folder in the medsynth layout (images/, masks/, dataset.json),
so every command runs on a fresh machine with nothing to download. The same seed gives the
same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .atomic import write_json_atomic
from .errors import ConfigError, DatasetError
from .image_io import write_png_image, write_png_mask
from .phantom import make_phantom
from .progress import Progress, SilentProgress
from .provenance import now_iso, package_version

MIN_SIZE, MAX_SIZE = 32, 512
DESCRIPTION = "medsynth demo: synthetic chest-radiograph phantoms with lung masks"


def write_demo_dataset(out: str | Path, n: int = 32, size: int = 128, seed: int = 0, nodules: bool = False,
                       progress: Progress | None = None) -> Path:
    """Write ``n`` phantom pairs of ``size`` px into ``out``; return the folder.

    A folder already holding the demo set of the same parameters is left as it is (so the
    README's command can be pasted twice); any other non-empty ``out`` is refused. The files go
    to a hidden sibling folder first and are moved into place at the end, so an interrupted
    call leaves nothing behind.
    """
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"size must be {MIN_SIZE}-{MAX_SIZE} px, got {size}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if _same_demo_set(out, n=n, size=size, seed=seed, nodules=nodules):
            return out
        raise DatasetError(f"{out}: already exists and is not empty; choose another folder")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    progress = progress or SilentProgress()
    try:
        with progress.task("writing demo pairs", total=n) as task:
            for i in range(n):
                rng = np.random.default_rng([seed, i])
                image, mask = make_phantom(rng, size=size, nodules=nodules)
                write_png_image(staging / "images" / f"case_{i:04d}.png", image)
                write_png_mask(staging / "masks" / f"case_{i:04d}.png", mask)
                task.advance()
        write_json_atomic(staging / "dataset.json", {
            "name": out.name,
            "description": DESCRIPTION,
            "labels": {"background": 0, "lung": 1},
            "pairs": n,
            "size": size,
            "seed": seed,
            "nodules": nodules,
            "created": now_iso(),
            "medsynth_version": package_version("medsynth"),
        })
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _same_demo_set(out: Path, **params: object) -> bool:
    """Whether ``out`` is a complete demo set written with ``params``."""
    try:
        card = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    expected = {("pairs" if k == "n" else k): v for k, v in params.items()}
    complete = all(len(list((out / sub).glob("*.png"))) == expected["pairs"] for sub in ("images", "masks"))
    return card.get("description") == DESCRIPTION and all(card.get(k) == v for k, v in expected.items()) and complete
