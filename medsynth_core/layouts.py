"""Reading the dataset layouts segmentation users already have: nnU-Net v2 raw and the Decathlon (MSD).

Both keep images in ``imagesTr/`` and labels in ``labelsTr/`` beside a ``dataset.json``:

- nnU-Net v2 raw: ``imagesTr/CASE_0000.png`` (one file per channel, ``_0000`` suffix),
  ``labelsTr/CASE.png``; labels declared name -> value; any ``file_ending``.
- MSD: ``imagesTr/CASE.nii.gz`` 3-D (or 4-D, several modalities) NIfTI, ``labelsTr/CASE.nii.gz``;
  labels declared value -> name.

3-D volumes are sliced to 2-D along ``slice_axis``; ``drop_empty`` leaves out slices whose label
is empty. Intensities are scaled per volume between its 0.5th and 99.5th percentiles, so a
slice's brightness does not depend on its neighbours being present.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .image_io import NIFTI_SUFFIXES, is_supported, read_image, read_mask, split_suffix
from .sample import Sample

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def detect_layout(root: Path) -> str:
    """``"medsynth"`` (images/ + masks/), ``"nnunet"`` (``_0000`` files in imagesTr/) or ``"msd"``."""
    if (root / "images").is_dir():
        return "medsynth"
    if (root / "imagesTr").is_dir():
        stems = [split_suffix(p)[0] for p in (root / "imagesTr").iterdir() if is_supported(p)]
        return "nnunet" if stems and all(CHANNEL_SUFFIX.match(s) for s in stems) else "msd"
    raise DatasetError(f"{root}: no images/ (medsynth layout) or imagesTr/ (nnU-Net, MSD) folder found")


def read_declared_labels(root: Path) -> dict[str, int]:
    """Labels from ``dataset.json``, name -> value, whichever way round the file writes them."""
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{root}: no dataset.json; nnU-Net and MSD folders declare their labels there")
    try:
        card = json.loads(path.read_text())
        raw = card["labels"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DatasetError(f"{path}: unreadable or without a 'labels' entry") from None
    labels: dict[str, int] = {}
    for key, value in raw.items():
        if isinstance(value, int) and not isinstance(value, bool):
            labels[str(key)] = value  # nnU-Net v2: name -> value
        elif isinstance(value, str) and str(key).isdigit():
            labels[value] = int(key)  # MSD: "value" -> name
        else:
            raise DatasetError(f"{path}: label {key!r} -> {value!r} is neither name -> value nor value -> name "
                               "(region-based labels are not supported)")
    if 0 not in labels.values():
        raise DatasetError(f"{path}: labels must include the background, value 0")
    return labels


def index_cases(root: Path, layout: str) -> list[tuple[str, list[Path], Path | None]]:
    """(case, image files by channel, label file or None) for every case in imagesTr/."""
    images, labels_dir = root / "imagesTr", root / "labelsTr"
    by_case: dict[str, dict[int, Path]] = {}
    for path in sorted(images.iterdir()):
        if not is_supported(path):
            continue
        stem = split_suffix(path)[0]
        match = CHANNEL_SUFFIX.match(stem) if layout == "nnunet" else None
        case, channel = (match["case"], int(match["channel"])) if match else (stem, 0)
        by_case.setdefault(case, {})[channel] = path
    if not by_case:
        raise DatasetError(f"{images}: no images found")
    labels = {split_suffix(p)[0]: p for p in labels_dir.iterdir() if is_supported(p)} if labels_dir.is_dir() else {}
    cases = []
    for case, channels in sorted(by_case.items()):
        if sorted(channels) != list(range(len(channels))):
            raise DatasetError(f"{images}: case {case!r} has channels {sorted(channels)}; expected 0..N without gaps")
        cases.append((case, [channels[c] for c in sorted(channels)], labels.get(case)))
    return cases


class VolumeCache:
    """Keeps the last few volumes read, so slicing a volume reads it once."""

    def __init__(self, size: int = 2) -> None:
        self._items: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._size = size

    def get(self, path: Path, load: Callable[[Path], np.ndarray]) -> np.ndarray:
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        value = load(path)
        self._items[path] = value
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return value


def imagestr_loaders(root: Path, layout: str, allowed: frozenset[int], slice_axis: int, drop_empty: bool,
                     require_masks: bool) -> list[tuple[str, Callable[[], Sample]]]:
    """(stem, loader) for every 2-D sample of an nnU-Net or MSD folder, checking cases as it goes."""
    cache = VolumeCache()
    out: list[tuple[str, Callable[[], Sample]]] = []
    for case, image_files, label_file in index_cases(root, layout):
        if label_file is None and require_masks:
            raise DatasetError(f"{root / 'labelsTr'}: case {case!r} has no label file")
        if _is_volume(image_files[0]):
            out += _volume_slices(case, image_files, label_file, allowed, slice_axis, drop_empty, cache)
        else:
            out.append((case, _flat_loader(case, image_files, label_file, allowed)))
    return out


def _is_volume(path: Path) -> bool:
    if split_suffix(path)[1] not in NIFTI_SUFFIXES:
        return False
    import nibabel as nib

    return sum(1 for d in nib.load(str(path)).shape if d > 1) >= 3


def _flat_loader(case: str, image_files: list[Path], label_file: Path | None,
                 allowed: frozenset[int]) -> Callable[[], Sample]:
    def load() -> Sample:
        channels = [read_image(p) for p in image_files]
        image = channels[0] if len(channels) == 1 else np.stack([c if c.ndim == 2 else c.mean(2) for c in channels], 2)
        if image.ndim == 3 and image.shape[2] not in (3,):
            raise DatasetError(f"case {case!r}: {image.shape[2]} channels; medsynth reads grey or RGB images")
        mask = read_mask(label_file, allowed) if label_file is not None else None
        if mask is not None and mask.shape != image.shape[:2]:
            raise DatasetError(f"case {case!r}: label shape {mask.shape} differs from image shape {image.shape[:2]}")
        return Sample(image=image, mask=mask, meta={"stem": case, "case": case})

    return load


def read_array_nd(path: Path) -> np.ndarray:
    """A NIfTI volume's voxels, without squeezing to 2-D."""
    import nibabel as nib

    try:
        return np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as err:  # nibabel raises several types for damaged files
        raise DatasetError(f"{path}: cannot read ({str(err).splitlines()[0] if str(err) else type(err).__name__})") \
            from None


def _header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    import nibabel as nib

    img = nib.load(str(path))
    return tuple(img.shape[:3]), tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])


def _volume_slices(case: str, image_files: list[Path], label_file: Path | None, allowed: frozenset[int],
                   axis: int, drop_empty: bool, cache: VolumeCache) -> list[tuple[str, Callable[[], Sample]]]:
    image_shape, image_spacing = _header(image_files[0])
    if not 0 <= axis < 3:
        raise DatasetError(f"slice axis must be 0, 1 or 2, got {axis}")
    if label_file is not None:
        label_shape, label_spacing = _header(label_file)
        if label_shape != image_shape:
            raise DatasetError(f"case {case!r}: label shape {label_shape} differs from image shape {image_shape}")
        if label_spacing != image_spacing:
            raise DatasetError(f"case {case!r}: label spacing {label_spacing} differs from image spacing "
                               f"{image_spacing}")
    indices = list(range(image_shape[axis]))
    if label_file is not None:
        labels = cache.get(label_file, read_array_nd)
        values = {int(v) for v in np.unique(labels)}
        if not values <= allowed:
            raise DatasetError(f"case {case!r}: label values {sorted(values - allowed)} are not declared in "
                               "dataset.json")
        if drop_empty:
            indices = [i for i in indices if np.take(labels, i, axis=axis).any()]

    def normalised(path: Path) -> np.ndarray:
        data = read_array_nd(path).astype(np.float32)
        if data.ndim == 4:
            data = data[..., 0]  # several modalities: the first one, as MSD lists them
        lo, hi = np.percentile(data, [0.5, 99.5])
        return np.clip((data - lo) / (hi - lo), 0, 1).astype(np.float32) if hi > lo else np.zeros_like(data)

    def loader(index: int) -> Callable[[], Sample]:
        def load() -> Sample:
            volume = cache.get(image_files[0], normalised)
            image = np.ascontiguousarray(np.take(volume, index, axis=axis))
            mask = None
            if label_file is not None:
                mask = np.ascontiguousarray(np.take(cache.get(label_file, read_array_nd), index, axis=axis))
                mask = mask.astype(np.uint8)
            return Sample(image=image, mask=mask, meta={"stem": f"{case}_s{index:04d}", "case": case,
                                                        "slice": index, "axis": axis})
        return load

    return [(f"{case}_s{i:04d}", loader(i)) for i in indices]

