"""Feature extractors and distances shared by the fid, kid, inception-score, mm-fid and mm-std evaluators.

An extractor is named by a spec: ``inception`` (clean-fid's InceptionV3 from local weights),
``segmenter`` (encoder of a U-Net trained on the real masks), ``discriminator`` (a small CNN
trained to tell real from synthetic) or ``labels:<column>`` (a small CNN trained on a column of
``labels.csv`` in the real dataset folder). The distances are clean-fid's own functions:
``frechet_distance`` on ``np.mean``/``np.cov(rowvar=False)`` statistics and ``kernel_distance``.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsynth_core import ConfigError, Dataset, DatasetError
from medsynth_core.image_io import is_supported, split_suffix
from medsynth_plugins.common.features import (
    INCEPTION_SIZE,
    ClassifierFeatures,
    InceptionFeatures,
    SegmenterFeatures,
    inception_weights,
)
from medsynth_plugins.common.segmenter import SegmenterRecipe, train_segmenter

BUILT_IN = ("inception", "segmenter", "discriminator")
LABELS_FILE = "labels.csv"
LABELS_PREFIX = "labels:"
AUTO_SIZE_CAP = 256  # CPU-sized: the trained extractors learn at this size at most
MIN_SCALE = 32
STEM_COLUMNS = ("stem", "image", "file", "filename", "name", "id")


def check_extractor_spec(spec: str, option: str = "extractor") -> None:
    """Raise ConfigError unless ``spec`` names a known extractor (the label column is checked later)."""
    if spec in BUILT_IN or (spec.startswith(LABELS_PREFIX) and spec[len(LABELS_PREFIX):].strip()):
        return
    raise ConfigError(f"{option} must be one of {', '.join(map(repr, BUILT_IN))} or 'labels:<column>', got {spec!r}")


def check_size(value: int, option: str) -> None:
    """Sizes are 0 (automatic) or a positive multiple of 8 (the segmenter halves the input three times)."""
    if value < 0 or value % 8:
        raise ConfigError(f"{option} must be 0 (automatic) or a positive multiple of 8, got {value}")


def auto_size(images: Sequence[np.ndarray], cap: int = AUTO_SIZE_CAP) -> int:
    """The real images' median longer side rounded to a multiple of 8, between 32 and ``cap``."""
    side = float(np.median([max(im.shape[:2]) for im in images]))
    return int(min(cap, max(MIN_SCALE, 8 * round(side / 8))))


def auto_scales(base: int) -> tuple[int, ...]:
    """Four scales doubling from max(32, base/4): 32-256 px for 64 px images, 128-1024 for 512 px (the paper's)."""
    low = max(MIN_SCALE, 8 * round(base / 4 / 8))
    return tuple(low * 2**k for k in range(4))


def images_of(dataset: Dataset, what: str, minimum: int = 2) -> list[np.ndarray]:
    """Every image of ``dataset``; DatasetError when there are fewer than ``minimum``."""
    images = [s.image for s in dataset]
    if len(images) < minimum:
        raise DatasetError(f"{dataset.name}: the {what} set needs at least {minimum} images, got {len(images)}")
    return images


@dataclass
class Extractor:
    """A ready feature extractor: ``encode(images, size)`` gives N x D float64 features."""

    name: str
    encode: Callable[[Sequence[np.ndarray], int | None], np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    def input(self, size: int | None) -> str:
        """What the network sees at ``size``, for report details."""
        if self.name != "inception":
            return f"{size} x {size} px"
        if size is None:
            return f"{INCEPTION_SIZE} x {INCEPTION_SIZE} px, clean-fid 'clean' resize from the images' own size"
        return f"{INCEPTION_SIZE} x {INCEPTION_SIZE} px, clean-fid 'clean' resize of a {size} x {size} px view"


@dataclass(frozen=True)
class Training:
    """How the trained extractors (segmenter, discriminator, label classifier) learn: seeded, CPU-sized."""

    size: int
    steps: int
    seed: int


def build_extractor(spec: str, real: Dataset, real_images: Sequence[np.ndarray],
                    synthetic_images: Sequence[np.ndarray], training: Training, *, weights: Path | None,
                    device: str = "cpu") -> Extractor:
    """Load or train the extractor ``spec`` names (see the module docstring)."""
    check_extractor_spec(spec)
    trained = {"train_size": training.size, "train_steps": training.steps, "seed": training.seed}
    if spec == "inception":
        path = inception_weights(str(weights) if weights else None)
        model = InceptionFeatures(path, device=device)
        return Extractor(spec, lambda images, size: model.features(images, size), {"weights": str(path)})
    if spec == "segmenter":
        labelled = [s for s in real if s.mask is not None]
        classes = max(2, max(real.label_values) + 1)
        recipe = SegmenterRecipe(size=training.size, steps=training.steps, seed=training.seed)
        segmenter = SegmenterFeatures(train_segmenter(labelled, recipe, classes=classes, device=device))
        return Extractor(spec, lambda images, size: segmenter.features(images, size or training.size),
                         {**trained, "task": f"segment the {len(labelled)} real masks ({classes} classes)",
                          "encoder": recipe.encoder})
    if spec == "discriminator":
        images = [*real_images, *synthetic_images]
        labels = [0] * len(real_images) + [1] * len(synthetic_images)
        model = ClassifierFeatures.train(spec, images, labels, size=training.size, steps=training.steps,
                                         seed=training.seed, device=device)
        return Extractor(spec, lambda images, size: model.features(images, size or training.size),
                         {**trained, "task": "tell real (0) from synthetic (1)"})
    column = spec[len(LABELS_PREFIX):].strip()
    by_stem, classes = read_label_column(real, column)
    picked = [(im, by_stem[stem]) for im, stem in zip(real_images, stems(real)) if stem in by_stem]
    if len(picked) < 2:
        raise ConfigError(f"extractor {spec!r}: fewer than two real images have a {column!r} label in {LABELS_FILE}")
    model = ClassifierFeatures.train(spec, [p[0] for p in picked], [p[1] for p in picked], size=training.size,
                                     steps=training.steps, seed=training.seed, device=device)
    return Extractor(f"{LABELS_PREFIX}{column}", lambda images, size: model.features(images, size or training.size),
                     {**trained, "task": f"classify {column!r} ({', '.join(classes)}) on {len(picked)} real images"})


class ExtractorCache:
    """Extractors that depend on the real set alone (inception, segmenter, label classifiers), kept per real set.

    ``medsynth evaluate`` scores several synthetic sets against one real set with one evaluator:
    the segmenter is trained once. The discriminator learns from each synthetic set, so it is
    never kept.
    """

    def __init__(self) -> None:
        self._kept: list[tuple[str, Dataset, Training, Path | None, Extractor]] = []

    def get(self, spec: str, real: Dataset, real_images: Sequence[np.ndarray],
            synthetic_images: Sequence[np.ndarray], training: Training, *, weights: Path | None,
            device: str = "cpu") -> Extractor:
        for kept_spec, kept_real, kept_training, kept_weights, extractor in self._kept:
            if (kept_spec, kept_training, kept_weights) == (spec, training, weights) and kept_real is real:
                return extractor
        extractor = build_extractor(spec, real, real_images, synthetic_images, training, weights=weights,
                                    device=device)
        if spec != "discriminator":
            self._kept.append((spec, real, training, weights, extractor))
        return extractor


def stems(dataset: Dataset) -> list[str]:
    """Each sample's file stem (``meta['stem']``, or the file list of a folder dataset)."""
    if dataset.files:
        return [f.stem for f in dataset.files]
    return [str(s.meta.get("stem", i)) for i, s in enumerate(dataset)]


def label_columns(real: Dataset) -> list[str]:
    """The label columns of ``labels.csv`` in the real folder (none when there is no such file)."""
    path = _labels_path(real)
    if path is None:
        return []
    header, _ = _read_labels(path)
    return header[1:]


def read_label_column(real: Dataset, column: str) -> tuple[dict[str, int], list[str]]:
    """``labels.csv`` column as stem -> class index, and the class names in index order."""
    path = _labels_path(real)
    if path is None:
        where = real.root if real.root else f"the in-memory set {real.name!r}"
        raise ConfigError(f"extractor 'labels:{column}': no {LABELS_FILE} in {where}")
    header, rows = _read_labels(path)
    if column not in header[1:]:
        raise ConfigError(f"{path}: no label column {column!r}; columns: {', '.join(header[1:]) or 'none'}")
    values = {row[header[0]].strip(): (row.get(column) or "").strip() for row in rows}
    names = sorted({v for v in values.values() if v})
    index = {name: k for k, name in enumerate(names)}
    return {_stem(key): index[v] for key, v in values.items() if v}, names


def _labels_path(real: Dataset) -> Path | None:
    if real.root is None or not (real.root / LABELS_FILE).is_file():
        return None
    return real.root / LABELS_FILE


def _read_labels(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header with the stem column first, and the rows."""
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{k.strip(): v for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{path}: cannot read ({err})") from None
    if len(header) < 2:
        raise DatasetError(f"{path}: needs a stem column and at least one label column")
    stem_column = next((h for h in header if h.lower() in STEM_COLUMNS), header[0])
    return [stem_column, *(h for h in header if h != stem_column)], rows


def _stem(key: str) -> str:
    path = Path(key)
    return split_suffix(path)[0] if is_supported(path) else key


def shuffled_pixels(images: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
    """Each image with its pixel positions permuted: structure destroyed, intensity histogram kept."""
    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        flat = image.reshape(image.shape[0] * image.shape[1], -1)
        out.append(flat[rng.permutation(len(flat))].reshape(image.shape))
    return out


def frechet(real_features: np.ndarray, synthetic_features: np.ndarray) -> tuple[float, dict[str, Any]]:
    """clean-fid's ``frechet_distance`` on the sets' mean and ``np.cov(rowvar=False)``, and notes.

    With fewer images than feature dimensions the covariances are singular; clean-fid then adds
    1e-6 to their diagonals itself. If ``sqrtm`` still leaves a large imaginary part (clean-fid
    raises ValueError), the diagonals get a growing offset relative to the mean variance, and the
    notes record it.
    """
    from cleanfid.fid import frechet_distance

    mu1, sigma1 = np.mean(real_features, axis=0), np.cov(real_features, rowvar=False)
    mu2, sigma2 = np.mean(synthetic_features, axis=0), np.cov(synthetic_features, rowvar=False)
    notes: dict[str, Any] = {"feature_dim": int(mu1.shape[0])}
    if min(len(real_features), len(synthetic_features)) <= mu1.shape[0]:
        notes["covariance"] = "singular: fewer images than feature dimensions"
    scale = float(np.mean(np.atleast_1d(np.diag(np.atleast_2d(sigma1))))) or 1.0
    for offset in (0.0, 1e-6, 1e-4, 1e-2):
        eye = np.eye(mu1.shape[0]) * offset * scale
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):  # clean-fid prints its own regularisation notice
                value = float(frechet_distance(mu1, sigma1 + eye, mu2, sigma2 + eye))
        except ValueError:
            continue
        if printed.getvalue().strip():
            notes["clean_fid"] = printed.getvalue().strip()
        if offset:
            notes["regularised"] = f"{offset:g} x mean variance added to the covariance diagonals"
        return value, notes
    raise ConfigError("FID: the covariance product has no real square root even after regularisation")


def kid_subsets(real_features: np.ndarray, synthetic_features: np.ndarray, subsets: int, subset_size: int,
                seed: int) -> tuple[np.ndarray, int]:
    """KID of each seeded subset pair, each through clean-fid's ``kernel_distance``; and the subset size.

    ``kernel_distance`` averages over subsets drawn from numpy's global random state and returns
    only the mean; calling it once per subset we draw ourselves gives the same estimator, seeded,
    with a spread. When both sets are used whole every subset is the same, so one is computed.
    """
    from cleanfid.fid import kernel_distance

    m = min(len(real_features), len(synthetic_features), subset_size)
    if m < 2:
        raise DatasetError(f"KID needs subsets of at least 2 images, got {m}")
    whole = m == len(real_features) == len(synthetic_features)
    rng = np.random.default_rng(seed)
    state = np.random.get_state()  # kernel_distance permutes with the global state; leave it as found
    try:
        values = []
        for _ in range(1 if whole else subsets):
            y = real_features[rng.choice(len(real_features), m, replace=False)]
            x = synthetic_features[rng.choice(len(synthetic_features), m, replace=False)]
            values.append(kernel_distance(y, x, num_subsets=1, max_subset_size=m))
    finally:
        np.random.set_state(state)
    return np.asarray(values, dtype=np.float64), m
