"""CT montages (the paper's Fig. 4): four axial slices of a 3-D volume tiled 2 x 2, with their masks.

From each NIfTI volume and its mask: drop the top and bottom slices whose foreground (lung)
covers less than ``min_foreground`` of the slice, split the remaining slices into ``grid**2``
groups by axial position, take one slice per group (seeded), window the Hounsfield units
(-1500..100 by default) to [0, 1] and tile the slices, superior first, in reading order. The
result is a medsynth dataset folder (images/, masks/, dataset.json).

    python -m medsynth_plugins.um2i.montage VOLUMES OUT --window -1500 100 --tile-size 256

``VOLUMES`` holds ``images/`` and ``masks/`` with NIfTI files matched by stem.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medsynth_core import ConfigError, DatasetError, MedsynthError, write_png_image, write_png_mask
from medsynth_core.atomic import write_json_atomic
from medsynth_core.image_io import split_suffix

NIFTI = (".nii", ".nii.gz")


@dataclass
class MontageResult:
    """What ``make_montages`` wrote and skipped."""

    out: Path
    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    slices: dict[str, list[int]] = field(default_factory=dict)


def make_montages(volumes_dir: str | Path, out_dir: str | Path, *, window: tuple[float, float] = (-1500.0, 100.0),
                  min_foreground: float = 0.1, grid: int = 2, pick: Literal["random", "middle"] = "random",
                  seed: int = 0, tile_size: int | None = None, foreground_labels: Sequence[int] | None = None,
                  labels: dict[str, int] | None = None) -> MontageResult:
    """Write one montage (image + mask) per volume of ``volumes_dir`` into the dataset folder ``out_dir``.

    ``foreground_labels`` are the mask values counted as foreground for ``min_foreground`` (default:
    any non-zero, e.g. lung + lesion); ``labels`` names the mask values in ``dataset.json``
    (default: from the values found). A volume with fewer than ``grid**2`` kept slices is skipped
    and reported. The files go to a hidden sibling folder first, so a failure leaves nothing.
    """
    volumes_dir, out_dir = Path(volumes_dir), Path(out_dir)
    _check_options(window, min_foreground, grid, pick, tile_size)
    pairs = _find_pairs(volumes_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir}: exists and is not an empty folder; choose another output folder")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    result = MontageResult(out_dir)
    values: set[int] = set()
    try:
        for stem, (image_path, mask_path) in pairs.items():
            volume, mask = _load_pair(image_path, mask_path)
            fg = np.isin(mask, list(foreground_labels)) if foreground_labels else mask > 0
            chosen = choose_slices(fg.mean(axis=(0, 1)), min_foreground, grid, pick, _volume_seed(seed, stem))
            if chosen is None:
                result.skipped[stem] = f"fewer than {grid * grid} slices with >= {min_foreground:.0%} foreground"
                continue
            image_tiles = [window_hu(_axial(volume, k), window) for k in chosen]
            mask_tiles = [_axial(mask, k) for k in chosen]
            image, montage_mask = tile(image_tiles, grid, tile_size, False), tile(mask_tiles, grid, tile_size, True)
            write_png_image(tmp / "images" / f"{stem}.png", image)
            write_png_mask(tmp / "masks" / f"{stem}.png", montage_mask)
            values |= {int(v) for v in np.unique(montage_mask)}
            result.written.append(stem)
            result.slices[stem] = [int(k) for k in chosen]
        if not result.written:
            raise DatasetError(f"{volumes_dir}: no volume had {grid * grid} slices with >= {min_foreground:.0%} "
                               "foreground; lower --min-foreground or check the masks")
        write_json_atomic(tmp / "dataset.json", {
            "name": out_dir.name,
            "description": f"CT montages ({grid}x{grid} axial slices) made by medsynth_plugins.um2i.montage",
            "labels": labels or _default_labels(values),
            "pairs": len(result.written),
            "montage": {"window": list(window), "min_foreground": min_foreground, "grid": grid, "pick": pick,
                        "seed": seed, "tile_size": tile_size, "slices": result.slices, "skipped": result.skipped},
        })
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def choose_slices(foreground: np.ndarray, min_foreground: float, grid: int, pick: str, seed: int
                  ) -> list[int] | None:
    """Indices of the chosen axial slices (superior first), or None if too few slices are kept.

    ``foreground`` is the foreground fraction of each slice along the axial axis (inferior to
    superior); slices from the first to the last one reaching ``min_foreground`` are kept.
    """
    kept = np.flatnonzero(foreground >= min_foreground)
    groups = grid * grid
    if kept.size == 0 or kept[-1] - kept[0] + 1 < groups:
        return None
    span = np.arange(kept[0], kept[-1] + 1)
    rng = np.random.default_rng(seed)
    chosen = [int(g[len(g) // 2]) if pick == "middle" else int(rng.choice(g)) for g in np.array_split(span, groups)]
    return chosen[::-1]


def window_hu(slice_hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip Hounsfield units to ``window`` and scale to [0, 1]."""
    lo, hi = window
    return ((np.clip(slice_hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def tile(tiles: Sequence[np.ndarray], grid: int, size: int | None, is_mask: bool) -> np.ndarray:
    """Tile ``grid * grid`` slices in reading order, each resized to ``size`` x ``size`` when given."""
    if size is not None:
        tiles = [_resize(t, size, is_mask) for t in tiles]
    shapes = {t.shape for t in tiles}
    if len(shapes) != 1:
        raise DatasetError(f"slices differ in shape {sorted(shapes)}; pass --tile-size")
    rows = [np.concatenate(tiles[r * grid:(r + 1) * grid], axis=1) for r in range(grid)]
    return np.concatenate(rows, axis=0)


def _resize(arr: np.ndarray, size: int, is_mask: bool) -> np.ndarray:
    from skimage.transform import resize

    if is_mask:
        return resize(arr, (size, size), order=0, preserve_range=True, anti_aliasing=False).astype(arr.dtype)
    return np.clip(resize(arr, (size, size), order=1, anti_aliasing=True), 0, 1).astype(np.float32)


def _axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice k of a RAS-canonical volume in the radiological view (anterior up, patient's right on the left)."""
    return np.ascontiguousarray(volume[:, :, k].T[::-1, ::-1])


def _load_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(str(image_path)))
        mask = nib.as_closest_canonical(nib.load(str(mask_path)))
        volume = np.squeeze(image.get_fdata(dtype=np.float32))
        labels = np.rint(np.squeeze(np.asanyarray(mask.dataobj))).astype(np.int64)
    except Exception as err:  # nibabel raises several types for damaged files
        raise DatasetError(f"{image_path}: cannot read the volume or its mask ({err})") from None
    if volume.ndim != 3:
        raise DatasetError(f"{image_path}: expected a 3-D volume, got shape {volume.shape}")
    if labels.shape != volume.shape:
        raise DatasetError(f"{mask_path}: mask shape {labels.shape} differs from its volume's {volume.shape}")
    if labels.min() < 0 or labels.max() > 255:
        raise DatasetError(f"{mask_path}: mask values must be labels 0-255, got {labels.min()}..{labels.max()}")
    return volume, labels.astype(np.uint8)


def _find_pairs(root: Path) -> dict[str, tuple[Path, Path]]:
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise DatasetError(f"{root}: expected images/ and masks/ folders of NIfTI volumes matched by stem")

    def index(folder: Path) -> dict[str, Path]:
        return {split_suffix(p)[0]: p for p in sorted(folder.iterdir()) if p.name.endswith(NIFTI)}

    images, masks = index(root / "images"), index(root / "masks")
    if not images:
        raise DatasetError(f"{root / 'images'}: no NIfTI volumes (.nii, .nii.gz)")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DatasetError(f"{images[missing[0]]}: no mask with the same stem in {root / 'masks'}")
    return {stem: (images[stem], masks[stem]) for stem in images}


def _volume_seed(seed: int, stem: str) -> int:
    """A seed per volume from the run seed and the file stem, so results do not depend on the file order."""
    return int(np.random.SeedSequence([seed, zlib.crc32(stem.encode())]).generate_state(1)[0])


def _default_labels(values: set[int]) -> dict[str, int]:
    found = sorted(values - {0})
    if found == [1]:
        return {"background": 0, "foreground": 1}
    return {"background": 0, **{f"label_{v}": v for v in found}}


def _check_options(window: tuple[float, float], min_foreground: float, grid: int, pick: str,
                   tile_size: int | None) -> None:
    if len(window) != 2 or window[0] >= window[1]:
        raise ConfigError(f"window must be two HU values low < high, got {window}")
    if not 0.0 <= min_foreground < 1.0:
        raise ConfigError(f"min_foreground must be in [0, 1), got {min_foreground}")
    if grid < 1:
        raise ConfigError(f"grid must be >= 1, got {grid}")
    if pick not in ("random", "middle"):
        raise ConfigError(f"pick must be 'random' or 'middle', got {pick!r}")
    if tile_size is not None and tile_size < 8:
        raise ConfigError(f"tile_size must be >= 8, got {tile_size}")


def _parse_label(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. lung=1, got {text!r}")
    return name.strip(), int(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m medsynth_plugins.um2i.montage VOLUMES OUT [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m medsynth_plugins.um2i.montage",
        description="Make 2x2 CT montages (a medsynth dataset) from 3-D NIfTI volumes with masks (UM2I, Fig. 4).")
    parser.add_argument("volumes", type=Path, help="folder with images/ and masks/ of NIfTI volumes matched by stem")
    parser.add_argument("out", type=Path, help="dataset folder to write (images/, masks/, dataset.json)")
    parser.add_argument("--window", type=float, nargs=2, default=(-1500.0, 100.0), metavar=("LOW", "HIGH"),
                        help="HU window mapped to [0, 1] (default: -1500 100)")
    parser.add_argument("--min-foreground", type=float, default=0.1,
                        help="drop top/bottom slices whose foreground covers less than this share (default: 0.1)")
    parser.add_argument("--grid", type=int, default=2, help="tiles per side; grid**2 axial groups (default: 2)")
    parser.add_argument("--pick", choices=("random", "middle"), default="random",
                        help="slice taken from each group: seeded random (the paper) or the middle one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random picks (default: 0)")
    parser.add_argument("--tile-size", type=int, default=None, help="resize each slice to N x N (default: keep)")
    parser.add_argument("--foreground-label", type=int, action="append", default=None, dest="foreground_labels",
                        help="mask value counted as foreground (repeatable; default: any non-zero)")
    parser.add_argument("--label", type=_parse_label, action="append", default=None, dest="labels",
                        help="name a mask value in dataset.json, e.g. --label lung=1 --label lesion=2")
    args = parser.parse_args(argv)
    try:
        result = make_montages(args.volumes, args.out, window=tuple(args.window), min_foreground=args.min_foreground,
                               grid=args.grid, pick=args.pick, seed=args.seed, tile_size=args.tile_size,
                               foreground_labels=args.foreground_labels,
                               labels=({"background": 0, **dict(args.labels)} if args.labels else None))
    except MedsynthError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for stem, reason in result.skipped.items():
        print(f"skipped {stem}: {reason}", file=sys.stderr)
    print(f"{len(result.written)} montages in {result.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
