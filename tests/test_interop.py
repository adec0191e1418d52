"""Interop: nnU-Net v2 raw and MSD input; nnU-Net, MONAI and Hugging Face export, checked with their own code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth_cli.app import app
from medsynth_core import DatasetError, open_dataset
from medsynth_core.export import export_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("interop") / "run"
    result = runner.invoke(app, ["-q", "run", "--generator", "augment", "--mask-source", "real-pairs", "--data",
                                 str(demo_dir), "--out", str(out), "-n", "6"])
    assert result.exit_code == 0, result.output
    return out


def _pairs(dataset) -> list[tuple[bytes, bytes]]:
    return [(np.round(s.image * 255).astype(np.uint8).tobytes(), s.mask.tobytes()) for s in dataset]


def test_nnunet_export_passes_nnunet_check_and_round_trips(synthetic_run: Path, demo_dir: Path,
                                                            tmp_path: Path) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    synthetic, real = open_dataset(synthetic_run), open_dataset(demo_dir)
    folder = export_dataset(synthetic, "nnunet", tmp_path / "raw", real=real, name="Lungs", dataset_id=42)
    assert folder.name == "Dataset042_Lungs"
    verify_dataset_integrity(str(folder), 1)  # raises on any problem
    card = json.loads((folder / "dataset.json").read_text())
    assert card["numTraining"] == len(real) + len(synthetic) and card["labels"] == {"background": 0, "lung": 1}
    back = open_dataset(folder)
    names = sorted([f"real_{s.meta['stem']}" for s in real] + [f"syn_{s.meta['stem']}" for s in synthetic])
    expected = {f"real_{s.meta['stem']}": p for s, p in zip(real, _pairs(real))}
    expected |= {f"syn_{s.meta['stem']}": p for s, p in zip(synthetic, _pairs(synthetic))}
    assert {s.meta["case"]: p for s, p in zip(back, _pairs(back))} == expected
    assert sorted(expected) == names


def test_nnunet_splits_keep_every_synthetic_case_out_of_validation(synthetic_run: Path, demo_dir: Path,
                                                                    tmp_path: Path) -> None:
    folder = export_dataset(open_dataset(synthetic_run), "nnunet", tmp_path, real=open_dataset(demo_dir))
    splits = json.loads((folder / "splits_final.json").read_text())
    assert len(splits) == 5
    real = {f"real_case_{i:04d}" for i in range(12)}
    assert set().union(*(set(s["val"]) for s in splits)) == real, "each real case validates once"
    for split in splits:
        assert not any(name.startswith("syn_") for name in split["val"])
        assert sum(name.startswith("syn_") for name in split["train"]) == 6
    provenance = [json.loads(line) for line in (folder / "medsynth_provenance.jsonl").read_text().splitlines()]
    synthetic = [p for p in provenance if p["synthetic"]]
    assert len(synthetic) == 6 and all(p["generator"] == "augment" and p["seed"] for p in synthetic)


def test_monai_datalist_loads_with_monai_and_reads_every_pair(synthetic_run: Path, demo_dir: Path,
                                                              tmp_path: Path) -> None:
    from monai.data import load_decathlon_datalist
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    folder = export_dataset(open_dataset(synthetic_run), "monai", tmp_path / "m", real=open_dataset(demo_dir))
    training = load_decathlon_datalist(str(folder / "datalist.json"), True, "training", base_dir=str(folder))
    validation = load_decathlon_datalist(str(folder / "datalist.json"), True, "validation", base_dir=str(folder))
    assert len(training) + len(validation) == 18 and validation
    assert not any(item["synthetic"] for item in validation)
    load = Compose([LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"])])
    for item in training + validation:
        pair = load(item)
        assert pair["image"].shape == pair["label"].shape == (1, 64, 64)
        assert set(np.unique(np.asarray(pair["label"]))) <= {0, 1}


def test_hf_image_folder_loads_with_datasets_and_round_trips(synthetic_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    import datasets

    synthetic = open_dataset(synthetic_run)
    folder = export_dataset(synthetic, "hf", tmp_path / "hf")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train",
                                   cache_dir=str(tmp_path / "cache"))
    assert {"image", "mask", "synthetic", "seed", "generator"} <= set(loaded.features)
    assert len(loaded) == len(synthetic) and all(loaded["synthetic"])
    assert (folder / "README.md").read_text().startswith("---\n")
    first = np.asarray(loaded[0]["mask"])
    assert set(np.unique(first)) <= {0, 1}
    assert sorted(_pairs(open_dataset(folder))) == sorted(_pairs(synthetic))


def test_export_refuses_a_non_empty_folder_and_unknown_format(synthetic_run: Path, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = runner.invoke(app, ["-q", "export", str(synthetic_run), "--format", "hf", "--out", str(tmp_path / "full")])
    assert result.exit_code == 2 and "not empty" in result.stderr
    result = runner.invoke(app, ["-q", "export", str(synthetic_run), "--format", "coco", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "nnunet, monai, hf" in result.stderr
    assert not (tmp_path / "o").exists()


def _msd(root: Path, *, cases: int = 2, label_values=(0, 1), spacing=(1.0, 1.0, 2.0), label_spacing=None,
         label_shape=None, drop_label: str | None = None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for c in range(cases):
        volume = rng.normal(0, 100, (24, 20, 6)).astype(np.float32)
        label = np.zeros(label_shape or (24, 20, 6), np.uint8)
        label[6:16, 5:12, 2:4] = label_values[-1]
        image = nib.Nifti1Image(volume, np.diag([*spacing, 1.0]))
        nib.save(image, str(root / "imagesTr" / f"lung_{c:03d}.nii.gz"))
        if drop_label != f"lung_{c:03d}":
            nib.save(nib.Nifti1Image(label, np.diag([*(label_spacing or spacing), 1.0])),
                     str(root / "labelsTr" / f"lung_{c:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"name": "Lung", "labels": {"0": "background", "1": "nodule"},
                                                   "modality": {"0": "CT"}}))
    return root


def test_msd_volumes_are_sliced_and_empty_slices_dropped(tmp_path: Path) -> None:
    root = _msd(tmp_path / "msd")
    every = open_dataset(root)
    assert len(every) == 2 * 6 and every.labels == {"background": 0, "nodule": 1}
    sample = every[3]
    assert sample.image.shape == sample.mask.shape == (24, 20) and sample.image.dtype == np.float32
    assert sample.image.min() >= 0.0 and sample.image.max() <= 1.0
    kept = open_dataset(root, drop_empty=True)
    assert len(kept) == 2 * 2 and all(s.mask.any() for s in kept)
    across = open_dataset(root, slice_axis=0, drop_empty=True)
    assert len(across) == 2 * 10 and across[0].image.shape == (20, 6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"label_values": (0, 3)}, r"case 'lung_000': label values \[3\] are not declared"),
    ({"label_shape": (24, 20, 5)}, r"case 'lung_000': label shape \(24, 20, 5\) differs"),
    ({"label_spacing": (1.0, 1.0, 3.0)}, r"case 'lung_000': label spacing"),
    ({"drop_label": "lung_001"}, r"case 'lung_001' has no label file"),
])
def test_msd_bad_cases_give_one_line_naming_the_case(tmp_path: Path, kwargs, message) -> None:
    root = _msd(tmp_path / "msd", **kwargs)
    with pytest.raises(DatasetError, match=message):
        open_dataset(root).validate()
    result = runner.invoke(app, ["-q", "run", "--generator", "augment", "--mask-source", "real-pairs", "--data",
                                 str(root), "--out", str(tmp_path / "out"), "-n", "2"])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and "case 'lung_00" in result.stderr
    assert not (tmp_path / "out").exists()


def test_run_reads_msd_with_layout_flags(tmp_path: Path) -> None:
    root = _msd(tmp_path / "msd")
    result = runner.invoke(app, ["-q", "run", "--generator", "augment", "--mask-source", "real-pairs", "--data",
                                 str(root), "--layout", "msd", "--drop-empty", "--out", str(tmp_path / "out"),
                                 "-n", "3", "--evaluator", "mask-stats"])
    assert result.exit_code == 0, result.output
    assert len(open_dataset(tmp_path / "out")) == 3
    card = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert card["labels"] == {"background": 0, "nodule": 1} and card["pipeline"]["run"]["drop_empty"] is True


def test_nnunet_raw_input_is_read_with_its_labels(synthetic_run: Path, tmp_path: Path) -> None:
    folder = export_dataset(open_dataset(synthetic_run), "nnunet", tmp_path)
    os.remove(sorted((folder / "labelsTr").iterdir())[0])
    with pytest.raises(DatasetError, match=r"case 'syn_000000' has no label file"):
        open_dataset(folder)
    assert len(open_dataset(folder, require_masks=False)) == 6
