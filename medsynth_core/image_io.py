"""Reading images and masks in the formats of the field, and writing PNG pairs.

Images come back as float32 in [0, 1] (H x W or H x W x 3); masks as uint8 label maps.
PNG/JPEG/TIFF/BMP go through Pillow, NIfTI through nibabel, DICOM through pydicom.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .atomic import write_bytes_atomic
from .errors import DatasetError

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUPPORTED_SUFFIXES = RASTER_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES


def split_suffix(path: Path) -> tuple[str, str]:
    """The stem and the (possibly double, like ``.nii.gz``) suffix of a file name, lowercased suffix."""
    name = path.name
    if name.lower().endswith(".nii.gz"):
        return name[: -len(".nii.gz")], ".nii.gz"
    return path.stem, path.suffix.lower()


def is_supported(path: Path) -> bool:
    """Whether medsynth can read this file as an image or a mask."""
    return split_suffix(path)[1] in SUPPORTED_SUFFIXES and not path.name.startswith(".")


def read_array(path: Path) -> np.ndarray:
    """Read the raw pixel array of any supported file, or raise DatasetError naming it."""
    suffix = split_suffix(path)[1]
    try:
        if suffix in RASTER_SUFFIXES:
            return _read_raster(path)
        if suffix in NIFTI_SUFFIXES:
            return _read_nifti(path)
        if suffix in DICOM_SUFFIXES:
            return _read_dicom(path)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, UnidentifiedImageError, Exception) as err:  # decoders raise many types
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DatasetError(f"{path}: cannot read ({first})") from None
    raise DatasetError(f"{path}: unsupported file type {suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def read_image(path: Path) -> np.ndarray:
    """Read an image as float32 in [0, 1], grey H x W or colour H x W x 3."""
    arr = read_array(path)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]  # alpha carries no anatomy
    if arr.ndim == 3 and arr.shape[2] == 2:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise DatasetError(f"{path}: expected a 2-D image, got an array of shape {arr.shape}")
    try:
        return to_unit_float(arr)
    except DatasetError as err:
        raise DatasetError(f"{path}: {err}") from None


def read_mask(path: Path, allowed: frozenset[int] | None = None) -> np.ndarray:
    """Read a mask as a uint8 label map.

    Values among ``allowed`` (the dataset's declared labels, {0, 1} by default) are kept as they
    are; otherwise a binary mask stored as {0, 255} gives {0, 1}. Lossy JPEG masks are binarised
    at half range, since compression smears their edges. Any other values must be among
    ``allowed`` (the dataset's declared labels), else DatasetError.
    """
    arr = read_array(path)
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[2] in (1, 2) else arr[..., :3].max(axis=2)
    if arr.ndim != 2:
        raise DatasetError(f"{path}: expected a 2-D mask, got an array of shape {arr.shape}")
    if split_suffix(path)[1] in LOSSY_SUFFIXES:
        top = 255 if arr.max() > 1 else 1
        return (arr > top / 2).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(arr == np.round(arr)):
        raise DatasetError(f"{path}: mask has fractional values; masks must hold integer labels")
    values = {int(v) for v in np.unique(arr)}
    labels = allowed if allowed is not None else frozenset({0, 1})
    if values <= labels:
        return arr.astype(np.uint8)
    if values <= {0, 255}:
        return (arr > 0).astype(np.uint8)
    shown = ", ".join(str(v) for v in sorted(values)[:8]) + (", ..." if len(values) > 8 else "")
    raise DatasetError(
        f"{path}: mask values {{{shown}}} are not a binary mask ({{0, 1}} or {{0, 255}}) "
        f"nor the declared labels {{{', '.join(map(str, sorted(labels)))}}}; declare labels in dataset.json"
    )


def to_unit_float(arr: np.ndarray) -> np.ndarray:
    """Scale integer images by their type's range and float images by their min and max."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    out = arr.astype(np.float64)
    finite = out[np.isfinite(out)]
    if not finite.size:
        raise DatasetError("image holds no finite values")
    lo, hi = float(finite.min()), float(finite.max())  # a stray inf or NaN must not flatten the rest
    out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    return np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0).astype(np.float32)


def encode_png_image(image: np.ndarray) -> bytes:
    """PNG bytes of a float image in [0, 1] (8-bit grey or RGB)."""
    arr = np.clip(np.round(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return _png_bytes(arr)


def encode_png_mask(mask: np.ndarray) -> bytes:
    """PNG bytes of a label map; binary masks are stored as {0, 255} so that viewers show them."""
    arr = np.asarray(mask, dtype=np.uint8)
    if arr.max(initial=0) <= 1:
        arr = arr * np.uint8(255)
    return _png_bytes(arr)


def write_png_image(path: Path, image: np.ndarray) -> None:
    """Write an image as PNG atomically."""
    write_bytes_atomic(path, encode_png_image(image))


def write_png_mask(path: Path, mask: np.ndarray) -> None:
    """Write a mask as PNG atomically."""
    write_bytes_atomic(path, encode_png_mask(mask))


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _read_raster(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("L" if img.mode == "1" else "RGB")
        return np.asarray(img)


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    data = np.asanyarray(nib.load(str(path)).dataobj)
    data = np.squeeze(data)
    if data.ndim != 2:
        raise DatasetError(f"{path}: NIfTI volume has shape {data.shape}; medsynth reads 2-D slices")
    return data


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(str(path))
    data = ds.pixel_array.astype(np.float64)
    data = np.squeeze(data)
    if data.ndim != 2:
        raise DatasetError(f"{path}: DICOM pixel data has shape {data.shape}; medsynth reads single 2-D frames")
    data = data * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        data = data.max() - data  # MONOCHROME1 shows low values bright
    return data
