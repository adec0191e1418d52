"""Datasets: a folder of ``images/`` and ``masks/`` matched by file stem (the Kvasir-SEG layout).

A folder may carry a ``dataset.json`` card (declared ``labels``, name->value) and, when medsynth
wrote it, a ``manifest.jsonl`` whose records become each sample's ``meta``. Images without a
mask are allowed where a component asks for them (semi-supervised methods); by default every
image needs its mask.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError
from .image_io import is_supported, read_image, read_mask, split_suffix
from .layouts import detect_layout, imagestr_loaders, read_declared_labels
from .manifest import read_manifest
from .progress import Progress, SilentProgress
from .sample import Sample

BINARY_LABELS = {"background": 0, "foreground": 1}


@dataclass(frozen=True)
class PairFiles:
    """The files of one pair: an image and, when labelled, its mask."""

    stem: str
    image: Path
    mask: Path | None


class Dataset(Sequence[Sample]):
    """An indexable collection of samples, loaded lazily and (unless ``cache=False``) kept.

    ``labels`` maps label names to mask values (0 is the background). ``root`` is the folder it
    came from, if any. Build one from a folder with :func:`open_dataset`, or from samples in
    memory with :meth:`from_samples`.
    """

    def __init__(
        self,
        loaders: Sequence[Callable[[], Sample]],
        *,
        labels: dict[str, int] | None = None,
        root: Path | None = None,
        name: str = "",
        files: Sequence[PairFiles] = (),
        cache: bool = True,
    ) -> None:
        self._loaders = list(loaders)
        self._cache: dict[int, Sample] = {}
        self._caching = cache
        self.labels = dict(labels or BINARY_LABELS)
        self.root = root
        self.name = name or (root.name if root else "in-memory")
        self.files = list(files)

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], *, labels: dict[str, int] | None = None,
                     name: str = "in-memory") -> Dataset:
        """A dataset over samples already in memory."""
        return cls([lambda s=s: s for s in samples], labels=labels, name=name)

    def __len__(self) -> int:
        return len(self._loaders)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if not self._caching:
            return self._loaders[index]()
        if index not in self._cache:
            self._cache[index] = self._loaders[index]()
        return self._cache[index]

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    @property
    def label_values(self) -> frozenset[int]:
        """The mask values this dataset declares, background included."""
        return frozenset(self.labels.values()) | {0}

    def labelled(self) -> list[int]:
        """Indices of the samples that have a mask."""
        return [i for i, f in enumerate(self.files) if f.mask is not None] if self.files else [
            i for i, s in enumerate(self) if s.mask is not None]

    def validate(self, progress: Progress | None = None) -> None:
        """Read every pair once, raising DatasetError at the first unusable file."""
        progress = progress or SilentProgress()
        with progress.task(f"checking {self.name}", total=len(self)) as task:
            for i in range(len(self)):
                self[i]
                task.advance()


LAYOUTS = ("auto", "medsynth", "nnunet", "msd")


def open_dataset(root: str | Path, *, require_masks: bool = True, labels: dict[str, int] | None = None,
                 layout: str = "auto", slice_axis: int = 2, drop_empty: bool = False) -> Dataset:
    """Open a dataset folder, checking its layout (files are read lazily; call ``validate``).

    ``layout`` is ``"medsynth"`` (images/ + masks/), ``"nnunet"`` (nnU-Net v2 raw), ``"msd"``
    (Decathlon, 3-D NIfTI sliced along ``slice_axis``, empty slices left out with ``drop_empty``)
    or ``"auto"`` to tell from the folder. Raises DatasetError for a missing folder, no images, an
    image without mask (when ``require_masks``), a mask without image or two files with one stem.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout != "medsynth":
        return _open_imagestr(root, layout, require_masks, labels, slice_axis, drop_empty)
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir():
        raise DatasetError(f"{root}: no images/ folder; a dataset is images/ and masks/ matched by file stem")
    images = _index_folder(image_dir)
    masks = _index_folder(mask_dir) if mask_dir.is_dir() else {}
    if not images:
        raise DatasetError(f"{image_dir}: no images found (supported: png, jpg, tif, bmp, nii, nii.gz, dcm)")
    orphan = sorted(set(masks) - set(images))
    if orphan:
        raise DatasetError(f"{masks[orphan[0]]}: mask has no image with stem {orphan[0]!r} in {image_dir}")
    missing = sorted(set(images) - set(masks))
    if missing and require_masks:
        raise DatasetError(f"{images[missing[0]]}: image has no mask with the same stem in {mask_dir}")
    card = _read_card(root)
    declared = labels or card.get("labels") or BINARY_LABELS
    declared = _check_labels(declared, root)
    records = _manifest_by_stem(root)
    allowed = frozenset(declared.values()) | {0}
    files = [PairFiles(stem, images[stem], masks.get(stem)) for stem in sorted(images)]
    loaders = [_loader(f, allowed, records.get(f.stem, {})) for f in files]
    return Dataset(loaders, labels=declared, root=root, name=card.get("name") or root.name, files=files)


def _open_imagestr(root: Path, layout: str, require_masks: bool, labels: dict[str, int] | None,
                   slice_axis: int, drop_empty: bool) -> Dataset:
    if not (root / "imagesTr").is_dir():
        raise DatasetError(f"{root}: no imagesTr/ folder, as the {layout} layout has")
    declared = labels or read_declared_labels(root)
    allowed = frozenset(declared.values()) | {0}
    entries = imagestr_loaders(root, layout, allowed, slice_axis, drop_empty, require_masks)
    name = _read_card(root).get("name") or root.name
    return Dataset([load for _, load in entries], labels=declared, root=root, name=name)


def _loader(files: PairFiles, allowed: frozenset[int], record: dict[str, Any]) -> Callable[[], Sample]:
    def load() -> Sample:
        image = read_image(files.image)
        mask = read_mask(files.mask, allowed) if files.mask is not None else None
        if mask is not None and mask.shape != image.shape[:2]:
            raise DatasetError(
                f"{files.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]} (width x height)")
        meta = {**record, "stem": files.stem}
        return Sample(image=image, mask=mask, meta=meta)

    return load


def _index_folder(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not is_supported(path):
            continue
        stem = split_suffix(path)[0]
        if stem in found:
            raise DatasetError(f"{path}: two files share the stem {stem!r} ({found[stem].name} and {path.name})")
        found[stem] = path
    return found


def _read_card(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(card, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return card


def _check_labels(labels: Any, root: Path) -> dict[str, int]:
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and 0 <= v < 256 for k, v in labels.items()):
        raise DatasetError(f"{root / 'dataset.json'}: 'labels' must map names to integers 0-255")
    return dict(labels)


def _manifest_by_stem(root: Path) -> dict[str, dict[str, Any]]:
    path = root / "manifest.jsonl"
    if not path.is_file():
        return {}
    by_stem = {}
    for rec in read_manifest(path):
        if rec.get("kept") and rec.get("image"):
            by_stem[split_suffix(Path(rec["image"]))[0]] = rec
    return by_stem


def foreground_fraction(mask: np.ndarray) -> float:
    """Share of pixels that are not background."""
    return float(np.count_nonzero(mask)) / float(mask.size) if mask.size else 0.0
