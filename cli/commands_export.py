"""``medsynth export``: hand a synthetic set to nnU-Net, MONAI or Hugging Face datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from medsynth_core import open_dataset
from medsynth_core.export import FORMATS, export_dataset

from .app import app
from .console import RichProgress, log, settings
from .errors import reports_errors

NEXT_STEP = {
    "nnunet": "copy splits_final.json to $nnUNet_preprocessed/{name}/ after planning, then "
              "`nnUNetv2_plan_and_preprocess -d {id} && nnUNetv2_train {id} 2d 0`",
    "monai": "load it with `monai.data.load_decathlon_datalist('{path}/datalist.json', base_dir='{path}')`",
    "hf": "load it with `datasets.load_dataset('imagefolder', data_dir='{path}')`",
}


@app.command("export")
@reports_errors
def export(
    dataset: Path = typer.Argument(..., help="A synthetic set written by `medsynth run`."),
    fmt: str = typer.Option(..., "--format", "-f", help=f"One of {', '.join(FORMATS)}."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write into (nnU-Net: its nnUNet_raw)."),
    real: Path | None = typer.Option(None, "--real", help="Real pairs to merge in (synthetic only when absent)."),
    name: str = typer.Option("Medsynth", "--name", help="Dataset name (nnU-Net: DatasetNNN_<name>)."),
    dataset_id: int = typer.Option(501, "--id", help="nnU-Net dataset id (1-999)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation split of real pairs."),
) -> None:
    """Write a synthetic set (optionally merged with real pairs) as nnU-Net raw, MONAI datalist or HF image folder."""
    synthetic = open_dataset(dataset)
    real_set = open_dataset(real) if real is not None else None
    progress = RichProgress(quiet=settings.quiet)
    for ds in (synthetic, *([real_set] if real_set else [])):
        ds.validate(progress)
    folder = export_dataset(synthetic, fmt, out, real=real_set, name=name, dataset_id=dataset_id, seed=seed)
    log(f"wrote {folder}")
    log("next: " + NEXT_STEP[fmt].format(name=folder.name, id=dataset_id, path=folder))
