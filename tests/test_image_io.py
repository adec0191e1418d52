"""Tests of image and mask reading in PNG/JPEG/TIFF, NIfTI and DICOM, and of PNG writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsynth_core import DatasetError, read_image, read_mask, write_png_image, write_png_mask
from medsynth_core.image_io import SUPPORTED_SUFFIXES, is_supported, read_array, split_suffix, to_unit_float


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _blob_mask(h: int = 24, w: int = 32) -> np.ndarray:
    """A {0, 1} mask with one filled ellipse, not square so that a transposition shows."""
    yy, xx = np.mgrid[:h, :w]
    return (((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 <= 1).astype(np.uint8)


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert str(path) in message
    assert "\n" not in message
    assert "Traceback" not in message
    assert err.value.__suppress_context__ or err.value.__context__ is None


def _write_dicom(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2",
                 slope: float | None = None, intercept: float | None = None) -> None:
    """Write a minimal uncompressed 16-bit greyscale DICOM file."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.PixelData = arr.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _write_nifti(path: Path, arr: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


# --- PNG, JPEG and TIFF -------------------------------------------------------------------------


def test_grey_png_round_trip(tmp_path: Path) -> None:
    image = _rng(1).random((24, 32), dtype=np.float32)
    path = tmp_path / "nested" / "grey.png"
    write_png_image(path, image)
    back = read_image(path)
    assert back.shape == (24, 32) and back.dtype == np.float32
    assert np.abs(back - image).max() <= 1 / 255
    assert not list(path.parent.glob(".tmp-*"))


def test_rgb_png_round_trip(tmp_path: Path) -> None:
    image = _rng(2).random((24, 32, 3), dtype=np.float32)
    path = tmp_path / "rgb.png"
    write_png_image(path, image)
    back = read_image(path)
    assert back.shape == (24, 32, 3) and back.dtype == np.float32
    assert np.abs(back - image).max() <= 1 / 255


def test_image_with_one_channel_is_written_grey(tmp_path: Path) -> None:
    image = _rng(3).random((10, 12, 1), dtype=np.float32)
    write_png_image(tmp_path / "g.png", image)
    back = read_image(tmp_path / "g.png")
    assert back.shape == (10, 12)
    assert np.abs(back - image[..., 0]).max() <= 1 / 255


def test_out_of_range_values_are_clipped_on_write(tmp_path: Path) -> None:
    image = np.array([[-0.5, 0.5], [1.5, 1.0]], dtype=np.float32)
    write_png_image(tmp_path / "c.png", image)
    back = read_image(tmp_path / "c.png")
    assert back.min() == 0.0 and back.max() == 1.0
    assert abs(back[0, 1] - 0.5) <= 1 / 255


def test_alpha_and_grey_alpha_channels_are_dropped(tmp_path: Path) -> None:
    rgba = (_rng(4).random((8, 9, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    back = read_image(tmp_path / "rgba.png")
    assert back.shape == (8, 9, 3)
    np.testing.assert_allclose(back, rgba[..., :3] / 255.0, atol=1e-6)

    la = (_rng(5).random((8, 9, 2)) * 255).astype(np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    back = read_image(tmp_path / "la.png")
    assert back.shape == (8, 9)
    np.testing.assert_allclose(back, la[..., 0] / 255.0, atol=1e-6)


def test_palette_png_reads_as_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((6, 7, 3), dtype=np.uint8)
    rgb[2:4, 3:6] = (200, 40, 10)
    palette = Image.fromarray(rgb, "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "p.png")
    back = read_image(tmp_path / "p.png")
    assert back.shape == (6, 7, 3)
    assert np.abs(back - rgb / 255.0).max() <= 2 / 255


def test_16_bit_png_is_scaled_by_65535(tmp_path: Path) -> None:
    raw = (_rng(6).random((12, 10)) * 65535).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / "deep.png")
    back = read_image(tmp_path / "deep.png")
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, raw / 65535.0, atol=1e-6)


def test_float_tiff_is_scaled_by_its_range(tmp_path: Path) -> None:
    raw = (_rng(7).random((12, 10)) * 300 - 100).astype(np.float32)
    Image.fromarray(raw, "F").save(tmp_path / "f.tif")
    back = read_image(tmp_path / "f.tif")
    assert back.min() == 0.0 and back.max() == 1.0
    np.testing.assert_allclose(back, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-5)


def test_flat_float_image_reads_as_zeros() -> None:
    assert not to_unit_float(np.full((3, 3), 7.0)).any()


def test_stray_non_finite_pixels_do_not_flatten_the_image() -> None:
    raw = np.arange(16, dtype=np.float64).reshape(4, 4)
    raw[0, 0], raw[0, 1], raw[0, 2] = np.nan, np.inf, -np.inf
    out = to_unit_float(raw)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert out[3, 3] == 1.0 and out[0, 3] == 0.0
    with pytest.raises(DatasetError, match="no finite values"):
        to_unit_float(np.full((2, 2), np.nan))


@pytest.mark.parametrize("stored", [255, 1])
def test_binary_png_masks_load_as_zero_one(tmp_path: Path, stored: int) -> None:
    mask = _blob_mask()
    Image.fromarray(mask * np.uint8(stored)).save(tmp_path / "m.png")
    back = read_mask(tmp_path / "m.png")
    assert back.dtype == np.uint8 and back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)


def test_write_png_mask_stores_binary_as_255_and_reads_back(tmp_path: Path) -> None:
    mask = _blob_mask()
    write_png_mask(tmp_path / "m.png", mask)
    stored = np.asarray(Image.open(tmp_path / "m.png"))
    assert set(np.unique(stored)) == {0, 255}
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)


def test_multi_label_mask_keeps_declared_labels(tmp_path: Path) -> None:
    mask = _blob_mask()
    mask[:4, :4] = 2
    write_png_mask(tmp_path / "m.png", mask)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "m.png")))) == {0, 1, 2}
    back = read_mask(tmp_path / "m.png", frozenset({0, 1, 2}))
    np.testing.assert_array_equal(back, mask)


def test_labels_beyond_declared_raise_naming_the_file(tmp_path: Path) -> None:
    mask = _blob_mask()
    mask[:4, :4] = 2
    path = tmp_path / "three.png"
    write_png_mask(path, mask)
    with pytest.raises(DatasetError, match="declare labels in dataset.json") as err:
        read_mask(path)
    _assert_one_line_naming(err, path)
    assert "{0, 1, 2}" in str(err.value)
    with pytest.raises(DatasetError):
        read_mask(path, frozenset({0, 2}))


def test_mask_mixing_one_and_255_is_refused(tmp_path: Path) -> None:
    mask = _blob_mask() * np.uint8(255)
    mask[0, 0] = 1  # neither {0, 1} nor {0, 255}: a damaged or mislabelled mask
    path = tmp_path / "mixed.png"
    Image.fromarray(mask).save(path)
    with pytest.raises(DatasetError, match=r"mask values \{0, 1, 255\}") as err:
        read_mask(path)
    _assert_one_line_naming(err, path)


def test_many_mask_values_are_shown_shortened(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10)).save(path)
    with pytest.raises(DatasetError, match=r"\{0, 1, 2, 3, 4, 5, 6, 7, \.\.\.\}"):
        read_mask(path)


def test_rgb_mask_is_reduced_to_one_channel(tmp_path: Path) -> None:
    mask = _blob_mask()
    rgb = np.zeros((*mask.shape, 3), dtype=np.uint8)
    rgb[..., 1] = mask * 255  # drawn in green only
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png"), mask)


def test_jpeg_mask_is_binarised(tmp_path: Path) -> None:
    mask = _blob_mask(48, 64)
    path = tmp_path / "m.jpg"
    Image.fromarray(mask * np.uint8(255)).save(path, quality=60)
    smeared = np.asarray(Image.open(path))
    assert len(np.unique(smeared)) > 2  # the premise: compression left in-between values
    back = read_mask(path)
    assert set(np.unique(back)) == {0, 1}
    assert (back == mask).mean() > 0.98


def test_jpeg_image_reads(tmp_path: Path) -> None:
    image = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (16, 1))
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "i.jpeg", quality=95)
    back = read_image(tmp_path / "i.jpeg")
    assert back.shape == (16, 32)
    assert np.abs(back - image).max() < 0.05


# --- NIfTI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("shape", [(12, 10), (12, 10, 1)])
def test_nifti_slice_is_read(tmp_path: Path, suffix: str, shape: tuple[int, ...]) -> None:
    raw = (_rng(8).random(shape) * 2000 - 1000).astype(np.int16)
    path = tmp_path / f"slice{suffix}"
    _write_nifti(path, raw)
    arr = read_array(path)
    assert arr.shape == (12, 10)
    np.testing.assert_array_equal(arr, raw.reshape(12, 10))
    image = read_image(path)
    flat = raw.reshape(12, 10).astype(np.float64)
    np.testing.assert_allclose(image, (flat - flat.min()) / (flat.max() - flat.min()), atol=1e-6)


def test_nifti_mask_is_read(tmp_path: Path) -> None:
    mask = _blob_mask()
    _write_nifti(tmp_path / "m.nii.gz", mask.astype(np.float32))  # float labels are common in NIfTI
    back = read_mask(tmp_path / "m.nii.gz")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)


def test_nifti_mask_with_fractional_values_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "soft.nii.gz"
    _write_nifti(path, _blob_mask().astype(np.float32) * 0.5)
    with pytest.raises(DatasetError, match="fractional") as err:
        read_mask(path)
    _assert_one_line_naming(err, path)


def test_nifti_volume_gives_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "vol.nii.gz"
    _write_nifti(path, np.zeros((8, 8, 3), dtype=np.int16))
    with pytest.raises(DatasetError, match=r"\(8, 8, 3\).*2-D slices") as err:
        read_image(path)
    _assert_one_line_naming(err, path)


def test_nifti_without_finite_values_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nan.nii.gz"
    _write_nifti(path, np.full((4, 4), np.nan, dtype=np.float32))
    with pytest.raises(DatasetError, match="no finite values") as err:
        read_image(path)
    _assert_one_line_naming(err, path)


# --- DICOM ----------------------------------------------------------------------------------------


def _dicom_pixels() -> np.ndarray:
    return (np.arange(6 * 8, dtype=np.uint16).reshape(6, 8) * 500 + 100).astype(np.uint16)


def test_dicom_monochrome2_is_read(tmp_path: Path) -> None:
    raw = _dicom_pixels()
    path = tmp_path / "a.dcm"
    _write_dicom(path, raw)
    np.testing.assert_array_equal(read_array(path), raw)
    image = read_image(path)
    assert image.shape == (6, 8) and image.dtype == np.float32
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    raw = _dicom_pixels()
    _write_dicom(tmp_path / "m2.dcm", raw)
    _write_dicom(tmp_path / "m1.dicom", raw, photometric="MONOCHROME1")
    normal = read_image(tmp_path / "m2.dcm")
    inverted = read_image(tmp_path / "m1.dicom")
    np.testing.assert_allclose(inverted, 1.0 - normal, atol=1e-6)
    assert inverted[0, 0] == 1.0 and inverted[-1, -1] == 0.0


def test_dicom_rescale_slope_and_intercept_apply(tmp_path: Path) -> None:
    raw = _dicom_pixels()
    path = tmp_path / "ct.dcm"
    _write_dicom(path, raw, slope=2.0, intercept=-1024.0)
    np.testing.assert_allclose(read_array(path), raw.astype(np.float64) * 2.0 - 1024.0)


def test_dicom_negative_slope_flips_the_image(tmp_path: Path) -> None:
    raw = _dicom_pixels()
    _write_dicom(tmp_path / "plain.dcm", raw)
    _write_dicom(tmp_path / "neg.dcm", raw, slope=-1.0, intercept=0.0)
    np.testing.assert_allclose(read_image(tmp_path / "neg.dcm"), 1.0 - read_image(tmp_path / "plain.dcm"),
                               atol=1e-6)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bad.png", "bad.jpg", "bad.tif", "bad.nii.gz", "bad.nii", "bad.dcm"])
def test_corrupt_file_gives_one_line_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(_rng(9).integers(0, 256, 512, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetError) as err:
        read_image(path)
    _assert_one_line_naming(err, path)
    with pytest.raises(DatasetError):
        read_mask(path)


@pytest.mark.parametrize("name", ["gone.png", "gone.nii.gz", "gone.dcm"])
def test_missing_file_gives_one_line_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(DatasetError, match="file not found") as err:
        read_image(path)
    _assert_one_line_naming(err, path)


@pytest.mark.parametrize("name", ["picture.gif", "notes.txt", "no_suffix"])
def test_unsupported_suffix_lists_the_supported_ones(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"GIF89a")
    with pytest.raises(DatasetError, match="unsupported file type") as err:
        read_image(path)
    _assert_one_line_naming(err, path)
    for suffix in SUPPORTED_SUFFIXES:
        assert suffix in str(err.value)
    with pytest.raises(DatasetError, match="unsupported file type"):
        read_mask(path)


def test_array_that_is_not_an_image_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medsynth_core.image_io as image_io

    path = tmp_path / "odd.png"
    monkeypatch.setattr(image_io, "read_array", lambda p: np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"expected a 2-D image, got an array of shape \(4, 4, 5\)") as err:
        read_image(path)
    _assert_one_line_naming(err, path)
    monkeypatch.setattr(image_io, "read_array", lambda p: np.zeros((2, 4, 4, 1), dtype=np.uint8))
    with pytest.raises(DatasetError, match="expected a 2-D mask") as err:
        read_mask(path)
    _assert_one_line_naming(err, path)


# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stem", "suffix", "supported"),
    [
        ("case_1.png", "case_1", ".png", True),
        ("CASE.PNG", "CASE", ".png", True),
        ("scan.nii.gz", "scan", ".nii.gz", True),
        ("scan.NII.GZ", "scan", ".nii.gz", True),
        ("a.b.dcm", "a.b", ".dcm", True),
        ("x.tiff", "x", ".tiff", True),
        (".tmp-abc.png", ".tmp-abc", ".png", False),
        ("archive.gz", "archive", ".gz", False),
        ("readme.txt", "readme", ".txt", False),
    ],
)
def test_split_suffix_and_is_supported(name: str, stem: str, suffix: str, supported: bool) -> None:
    assert split_suffix(Path(name)) == (stem, suffix)
    assert is_supported(Path(name)) is supported
