"""Writing a dataset in the layouts trainers read: nnU-Net v2 raw, a MONAI datalist, a Hugging Face image folder.

Synthetic pairs can be merged with real ones; synthetic cases are named ``syn_*`` and real ones
``real_*`` so that they can be told apart, and no synthetic case ever lands in a validation
split. The manifest's provenance (generator, seed, config, filter scores) travels with each
case where the format has room, and into ``medsynth_provenance.jsonl`` where it has none.
Everything is written into a hidden staging folder and renamed into place at the end.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_bytes_atomic, write_json_atomic
from .dataset import Dataset
from .errors import ConfigError, DatasetError
from .image_io import encode_png_image
from .provenance import now_iso, package_version
from .sample import Sample

FORMATS = ("nnunet", "monai", "hf")
PROVENANCE_FILE = "medsynth_provenance.jsonl"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Case:
    """One exported pair: its case name, whether it is synthetic, and its sample."""

    name: str
    synthetic: bool
    sample: Sample

    def provenance(self) -> dict[str, Any]:
        """The manifest facts of a synthetic pair (seed, stages, scores), or the real file's stem."""
        meta = self.sample.meta
        if not self.synthetic:
            return {"case": self.name, "synthetic": False, "source": meta.get("stem")}
        stages = meta.get("provenance", [])
        return {"case": self.name, "synthetic": True, "index": meta.get("index"), "seed": meta.get("seed"),
                "generator": next((s["name"] for s in stages if s.get("role") == "generator"), None),
                "stages": stages, "scores": meta.get("scores", {}), "condition": meta.get("meta", {}).get("condition")}


def export_dataset(synthetic: Dataset, fmt: str, out: str | Path, *, real: Dataset | None = None,
                   name: str = "Medsynth", dataset_id: int = 501, folds: int = 5, val_fraction: float = 0.2,
                   seed: int = 0) -> Path:
    """Write ``synthetic`` (and ``real``, if given) as ``fmt`` under ``out``; return the folder written."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not _NAME.match(name):
        raise ConfigError(f"dataset name {name!r} may hold only letters, digits, '_' and '-'")
    if not 1 <= dataset_id <= 999:
        raise ConfigError(f"nnU-Net dataset ids are 1-999, got {dataset_id}")
    out = Path(out)
    target = out / f"Dataset{dataset_id:03d}_{name}" if fmt == "nnunet" else out
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DatasetError(f"{target}: already exists and is not empty; choose another --out")
    labels = dict((real or synthetic).labels)
    cases = _cases(synthetic, real)
    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        writer = {"nnunet": _write_nnunet, "monai": _write_monai, "hf": _write_hf}[fmt]
        writer(staging, cases, labels, name=name, folds=folds, val_fraction=val_fraction, seed=seed)
        _write_provenance(staging / PROVENANCE_FILE, cases)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _cases(synthetic: Dataset, real: Dataset | None) -> list[Case]:
    cases = [Case(f"real_{_safe(s.meta.get('stem', i))}", False, s) for i, s in enumerate(real or [])]
    cases += [Case(f"syn_{_safe(s.meta.get('stem', i))}", True, s) for i, s in enumerate(synthetic)]
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise DatasetError("two pairs would get the same case name; their file stems collide")
    for case in cases:
        if case.sample.mask is None:
            raise DatasetError(f"case {case.name!r} has no mask; only labelled pairs can be exported")
    return cases


def _safe(stem: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", str(stem))


def _label_png(mask: np.ndarray) -> bytes:
    """Labels as their values (nnU-Net and MONAI read values, not 0/255 pictures)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _validation_split(cases: Sequence[Case], fraction: float, seed: int) -> set[str]:
    real = sorted(c.name for c in cases if not c.synthetic)
    rng = np.random.default_rng(seed)
    count = int(round(fraction * len(real))) if len(real) > 1 else 0
    return set(rng.permutation(real)[:count].tolist()) if count else set()


def _write_nnunet(folder: Path, cases: list[Case], labels: dict[str, int], *, name: str, folds: int,
                  val_fraction: float, seed: int) -> None:
    colour = any(c.sample.image.ndim == 3 for c in cases)
    for case in cases:
        image = case.sample.image if not colour or case.sample.image.ndim == 3 else \
            np.repeat(case.sample.image[..., None], 3, axis=2)
        write_bytes_atomic(folder / "imagesTr" / f"{case.name}_0000.png", encode_png_image(image))
        write_bytes_atomic(folder / "labelsTr" / f"{case.name}.png", _label_png(case.sample.mask))
    write_json_atomic(folder / "dataset.json", {
        "name": name,
        "description": "real and medsynth-synthetic pairs" if any(not c.synthetic for c in cases)
        else "medsynth-synthetic pairs",
        "channel_names": {"0": "R", "1": "G", "2": "B"} if colour else {"0": "grey"},
        "labels": dict(sorted(labels.items(), key=lambda kv: kv[1])),
        "numTraining": len(cases),
        "file_ending": ".png",
        "medsynth": {"version": package_version("medsynth"), "exported": now_iso(),
                     "synthetic_cases": sum(c.synthetic for c in cases), "provenance": PROVENANCE_FILE},
    })
    # nnU-Net reads splits from nnUNet_preprocessed/<dataset>/splits_final.json: copy it there before training
    real = sorted(c.name for c in cases if not c.synthetic)
    synthetic = sorted(c.name for c in cases if c.synthetic)
    order = np.random.default_rng(seed).permutation(real).tolist()
    splits = []
    for k in range(folds):
        val = sorted(order[k::folds])
        splits.append({"train": sorted(set(real) - set(val)) + synthetic, "val": val})
    write_json_atomic(folder / "splits_final.json", splits)


def _write_pairs(folder: Path, cases: list[Case], mask_dir: str) -> list[tuple[Case, str, str]]:
    written = []
    for case in cases:
        image_rel, mask_rel = f"images/{case.name}.png", f"{mask_dir}/{case.name}.png"
        write_bytes_atomic(folder / image_rel, encode_png_image(case.sample.image))
        write_bytes_atomic(folder / mask_rel, _label_png(case.sample.mask))
        written.append((case, image_rel, mask_rel))
    return written


def _write_monai(folder: Path, cases: list[Case], labels: dict[str, int], *, name: str, folds: int,
                 val_fraction: float, seed: int) -> None:
    validation = _validation_split(cases, val_fraction, seed)
    training, checking = [], []
    for case, image_rel, mask_rel in _write_pairs(folder, cases, "masks"):
        entry = {"image": image_rel, "label": mask_rel, "case": case.name, "synthetic": case.synthetic}
        if case.synthetic:
            entry["seed"] = case.sample.meta.get("seed")
        (checking if case.name in validation else training).append(entry)
    write_json_atomic(folder / "dataset.json", {"name": name, "labels": labels})
    write_json_atomic(folder / "datalist.json", {
        "name": name, "labels": {str(v): k for k, v in sorted(labels.items(), key=lambda kv: kv[1])},
        "training": training, "validation": checking,
    })


def _write_hf(folder: Path, cases: list[Case], labels: dict[str, int], *, name: str, folds: int,
              val_fraction: float, seed: int) -> None:
    lines = []
    for case, image_rel, mask_rel in _write_pairs(folder, cases, "masks"):
        prov = case.provenance()
        lines.append(json.dumps({
            "file_name": image_rel, "mask_file_name": mask_rel, "case": case.name, "synthetic": case.synthetic,
            "seed": prov.get("seed"), "generator": prov.get("generator"),
            "scores": json.dumps(prov.get("scores", {}), sort_keys=True),
        }, sort_keys=True))
    write_bytes_atomic(folder / "metadata.jsonl", ("\n".join(lines) + "\n").encode())
    synthetic = sum(c.synthetic for c in cases)
    card = "\n".join([
        "---", "task_categories:", "- image-segmentation", "tags:", "- medical", "- synthetic", "- medsynth", "---",
        "", f"# {name}", "",
        f"{len(cases)} image/mask pairs ({synthetic} synthetic, {len(cases) - synthetic} real) exported by "
        f"medsynth {package_version('medsynth')} on {now_iso()}.", "",
        "Load with `datasets.load_dataset(\"imagefolder\", data_dir=...)`: columns `image` and `mask` "
        "(label values: " + ", ".join(f"{v} = {k}" for k, v in sorted(labels.items(), key=lambda kv: kv[1])) + "), "
        "`synthetic`, `seed`, `generator`, `scores` (JSON).", "",
        f"Full provenance of every synthetic pair is in `{PROVENANCE_FILE}`.", "",
    ])
    write_bytes_atomic(folder / "README.md", card.encode())
    write_json_atomic(folder / "dataset.json", {"name": name, "labels": labels})


def _write_provenance(path: Path, cases: list[Case]) -> None:
    body = "".join(json.dumps(c.provenance(), sort_keys=True, default=str) + "\n" for c in cases)
    write_bytes_atomic(path, body.encode())
