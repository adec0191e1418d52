"""Tests of dataset folders: layout checks, lazy loading, labels, manifests and in-memory datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsynth_core import Dataset, DatasetError, PairFiles, Sample, foreground_fraction, open_dataset
from medsynth_core.dataset import BINARY_LABELS


def _write_mask(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_demo_folder_opens(demo_dir: Path) -> None:
    ds = open_dataset(demo_dir)
    assert len(ds) == 12
    card = json.loads((demo_dir / "dataset.json").read_text())
    assert ds.labels == card["labels"] == {"background": 0, "lung": 1}
    assert ds.label_values == frozenset({0, 1})
    assert ds.root == demo_dir and ds.name == card["name"]
    assert [f.stem for f in ds.files] == sorted(p.stem for p in (demo_dir / "images").iterdir())
    assert all(isinstance(f, PairFiles) and f.mask is not None for f in ds.files)
    assert ds.labelled() == list(range(12))


def test_demo_samples_have_the_contract_types(demo_dir: Path) -> None:
    ds = open_dataset(demo_dir)
    sample = ds[0]
    assert isinstance(sample, Sample)
    assert sample.image.dtype == np.float32 and sample.image.shape == (64, 64)
    assert sample.image.min() >= 0.0 and sample.image.max() <= 1.0
    assert sample.mask is not None and sample.mask.dtype == np.uint8 and sample.mask.shape == (64, 64)
    assert set(np.unique(sample.mask)) == {0, 1}
    assert sample.meta == {"stem": ds.files[0].stem}
    sample.check("demo")
    assert 0.0 < foreground_fraction(sample.mask) < 1.0


def test_indexing_caches_slices_and_iterates(demo_dir: Path) -> None:
    ds = open_dataset(demo_dir)
    assert ds[0] is ds[0]
    assert ds[-1].meta["stem"] == ds.files[-1].stem
    assert [s.meta["stem"] for s in ds[2:5]] == [f.stem for f in ds.files[2:5]]
    assert [s.meta["stem"] for s in ds] == [f.stem for f in ds.files]
    for bad in (12, -13):
        with pytest.raises(IndexError):
            ds[bad]


def test_files_are_read_lazily(demo_copy: Path) -> None:
    ds = open_dataset(demo_copy)
    gone = ds.files[5].image
    gone.unlink()  # after opening: only loading sample 5 can notice
    assert ds[4].image.shape == (64, 64)
    with pytest.raises(DatasetError, match="file not found") as err:
        ds[5]
    assert str(gone) in str(err.value)
    with pytest.raises(DatasetError):
        ds.validate()


def test_validate_reads_every_pair(demo_copy: Path) -> None:
    ds = open_dataset(demo_copy)
    ds.validate()
    shutil.rmtree(demo_copy / "images")  # every pair was read and kept, so nothing is read again
    assert [s.image.shape for s in ds] == [(64, 64)] * 12


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset folder not found") as err:
        open_dataset(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"no images/ \(medsynth layout\) or imagesTr/"):
        open_dataset(tmp_path)


def test_empty_images_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".tmp-abc.png").write_bytes(b"half written")
    with pytest.raises(DatasetError, match="no images found") as err:
        open_dataset(tmp_path)
    assert str(tmp_path / "images") in str(err.value)


def test_image_without_mask(demo_copy: Path) -> None:
    (demo_copy / "masks" / "case_0003.png").unlink()
    with pytest.raises(DatasetError, match="image has no mask") as err:
        open_dataset(demo_copy)
    assert str(demo_copy / "images" / "case_0003.png") in str(err.value)

    ds = open_dataset(demo_copy, require_masks=False)
    assert len(ds) == 12
    assert ds.labelled() == [i for i in range(12) if i != 3]
    assert ds[3].mask is None and ds[3].image.shape == (64, 64)
    assert ds[2].mask is not None


def test_no_masks_folder_allowed_when_masks_are_optional(demo_copy: Path) -> None:
    shutil.rmtree(demo_copy / "masks")
    with pytest.raises(DatasetError, match="image has no mask"):
        open_dataset(demo_copy)
    ds = open_dataset(demo_copy, require_masks=False)
    assert ds.labelled() == []
    assert all(s.mask is None for s in ds)


def test_mask_without_image(demo_copy: Path) -> None:
    (demo_copy / "images" / "case_0002.png").unlink()
    with pytest.raises(DatasetError, match="mask has no image") as err:
        open_dataset(demo_copy, require_masks=False)
    assert str(demo_copy / "masks" / "case_0002.png") in str(err.value)


@pytest.mark.parametrize("folder", ["images", "masks"])
def test_duplicate_stems(demo_copy: Path, folder: str) -> None:
    shutil.copy(demo_copy / folder / "case_0000.png", demo_copy / folder / "case_0000.jpg")
    with pytest.raises(DatasetError, match="two files share the stem 'case_0000'") as err:
        open_dataset(demo_copy)
    message = str(err.value)
    assert "case_0000.png" in message and "case_0000.jpg" in message


def test_pairs_match_across_formats(demo_copy: Path) -> None:
    png = demo_copy / "masks" / "case_0000.png"
    mask = np.asarray(Image.open(png))
    png.unlink()
    Image.fromarray(mask).save(demo_copy / "masks" / "case_0000.tif")
    ds = open_dataset(demo_copy)
    assert ds.files[0].mask == demo_copy / "masks" / "case_0000.tif"
    np.testing.assert_array_equal(ds[0].mask, (mask > 0).astype(np.uint8))


def test_size_mismatch_names_the_mask_and_both_sizes(demo_copy: Path) -> None:
    bad = demo_copy / "masks" / "case_0001.png"
    _write_mask(bad, np.zeros((32, 48)))  # 48 wide, 32 high
    ds = open_dataset(demo_copy)  # layout is fine; sizes show on load
    assert ds[0].mask is not None
    with pytest.raises(DatasetError) as err:
        ds[1]
    message = str(err.value)
    assert message.startswith(str(bad))
    assert "48x32" in message and "64x64" in message
    with pytest.raises(DatasetError, match="48x32"):
        open_dataset(demo_copy).validate()


def test_non_binary_mask_needs_declared_labels(demo_copy: Path) -> None:
    bad = demo_copy / "masks" / "case_0004.png"
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:20, 10:20], mask[30:40, 30:40] = 1, 7
    _write_mask(bad, mask)
    with pytest.raises(DatasetError, match="not a binary mask") as err:
        open_dataset(demo_copy)[4]
    assert str(bad) in str(err.value)

    ds = open_dataset(demo_copy, labels={"background": 0, "lung": 1, "nodule": 7})
    np.testing.assert_array_equal(ds[4].mask, mask)
    assert ds.label_values == frozenset({0, 1, 7})

    card = json.loads((demo_copy / "dataset.json").read_text())
    card["labels"] = {"background": 0, "lung": 1, "nodule": 7}
    (demo_copy / "dataset.json").write_text(json.dumps(card))
    np.testing.assert_array_equal(open_dataset(demo_copy)[4].mask, mask)


@pytest.mark.parametrize(
    "card_text",
    [
        json.dumps({"labels": {"lung": "one"}}),
        json.dumps({"labels": [0, 1]}),
        json.dumps({"labels": {"lung": 300}}),
        json.dumps({"labels": {"lung": -1}}),
        json.dumps({"labels": {"lung": 1.5}}),
        json.dumps(["not", "an", "object"]),
        "{not json",
    ],
)
def test_bad_dataset_card(demo_copy: Path, card_text: str) -> None:
    (demo_copy / "dataset.json").write_text(card_text)
    with pytest.raises(DatasetError) as err:
        open_dataset(demo_copy)
    assert str(demo_copy / "dataset.json") in str(err.value)
    assert "\n" not in str(err.value)


def test_folder_without_card_is_binary(demo_copy: Path) -> None:
    (demo_copy / "dataset.json").unlink()
    ds = open_dataset(demo_copy)
    assert ds.labels == BINARY_LABELS
    assert ds.name == demo_copy.name


def test_manifest_records_become_sample_meta(demo_copy: Path) -> None:
    records = [
        {"index": 0, "kept": True, "image": "images/case_0000.png", "mask": "masks/case_0000.png",
         "seed": 1234, "generator": "augment"},
        {"index": 1, "kept": False, "image": "images/case_0001.png", "dropped_by": "mask-area"},
        {"index": 2, "kept": True, "image": None},
    ]
    (demo_copy / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = open_dataset(demo_copy)
    meta = ds[0].meta
    assert meta["seed"] == 1234 and meta["generator"] == "augment" and meta["index"] == 0
    assert meta["stem"] == "case_0000"
    assert ds[1].meta == {"stem": "case_0001"}  # a dropped candidate describes no file here
    assert ds[2].meta == {"stem": "case_0002"}


def test_from_samples() -> None:
    image = np.zeros((8, 8), dtype=np.float32)
    with_mask = Sample(image=image, mask=np.ones((8, 8), dtype=np.uint8), meta={"i": 0})
    without = Sample(image=image, meta={"i": 1})
    ds = Dataset.from_samples([with_mask, without, with_mask])
    assert len(ds) == 3
    assert ds[0] is with_mask and ds[1] is without
    assert ds.labels == BINARY_LABELS and ds.name == "in-memory" and ds.root is None
    assert ds.labelled() == [0, 2]
    assert list(ds) == [with_mask, without, with_mask]
    named = Dataset.from_samples([without], labels={"background": 0, "vessel": 3}, name="mine")
    assert named.name == "mine" and named.label_values == frozenset({0, 3})
    assert named.labelled() == []
    empty = Dataset.from_samples([])
    assert len(empty) == 0 and list(empty) == []
