"""The checkpoint folder written by ``medsynth train diffuseexpand`` and read by its two samplers.

    <workdir>/
      checkpoint.json        the card: component, config, step, latest, labels, channels, size
      loss.csv               step, diffusion, segmentation, type (appended at every checkpoint)
      step-000250/           the latest checkpoint (older ones are removed once it is in place)
        denoiser/            Stage I UNet2DModel (diffusers save_pretrained)
        segmenter/           Stage II NoisySegmenter (diffusers save_pretrained)
        scheduler/           the training noise schedule (DDPMScheduler config)
        training.pt          optimiser states and the training random state, for resuming

A checkpoint goes into a hidden ``.step-XXXXXX.partial`` folder, is renamed into place, and
only then does the card (written atomically) point at it, so a kill at any moment leaves the
previous checkpoint readable.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from medsynth_core import CheckpointError, load_torch, read_checkpoint_card, save_torch

from .networks import NoisySegmenter

NAME = "diffuseexpand"  # the generator's registry name; its card is what both samplers accept
LOSS_LOG = "loss.csv"
LOSS_COLUMNS = ("step", "diffusion", "segmentation", "type")


@dataclass
class Bundle:
    """Everything sampling needs from a checkpoint."""

    denoiser: torch.nn.Module
    segmenter: torch.nn.Module
    schedule: dict[str, Any]  # DDPMScheduler config of training
    values: list[int]  # mask value of each class index
    channels: int
    size: int

    @property
    def classes(self) -> int:
        return len(self.values)


def step_folder(step: int) -> str:
    return f"step-{step:06d}"


def save_step(workdir: Path, step: int, denoiser: UNet2DModel, segmenter: NoisySegmenter,
              scheduler: DDPMScheduler, training: dict[str, Any]) -> str:
    """Write one checkpoint folder into place; return its name (the card is written by the caller)."""
    name = step_folder(step)
    partial = workdir / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    denoiser.save_pretrained(partial / "denoiser", safe_serialization=True)
    segmenter.save_pretrained(partial / "segmenter", safe_serialization=True)
    scheduler.save_config(partial / "scheduler")
    save_torch(partial / "training.pt", training)
    final = workdir / name
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return name


def tidy(workdir: Path, keep: str | None) -> None:
    """Remove checkpoint folders other than ``keep``, and leftovers of an interrupted save."""
    for path in workdir.iterdir():
        if path.is_dir() and path.name != keep and (
                path.name.startswith("step-") or (path.name.startswith(".step-") and path.name.endswith(".partial"))):
            shutil.rmtree(path, ignore_errors=True)


def latest(folder: Path) -> tuple[dict[str, Any], Path]:
    """The card of a diffuseexpand checkpoint folder and its latest step folder."""
    card = read_checkpoint_card(folder, expected=NAME)
    step = folder / str(card.get("latest", ""))
    if not card.get("latest") or not step.is_dir():
        raise CheckpointError(f"{folder}: its card names checkpoint {card.get('latest')!r}, which is missing")
    return card, step


def load_networks(step: Path) -> tuple[UNet2DModel, NoisySegmenter, DDPMScheduler]:
    """The two networks and the training scheduler of one step folder."""
    try:
        denoiser = UNet2DModel.from_pretrained(step / "denoiser")
        segmenter = NoisySegmenter.from_pretrained(step / "segmenter")
        scheduler = DDPMScheduler.from_pretrained(step / "scheduler")
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{step}: cannot load ({str(err).splitlines()[0]})") from None
    return denoiser, segmenter, scheduler


def load_training(step: Path) -> dict[str, Any]:
    return load_torch(step / "training.pt")


def load_bundle(folder: str | Path, device: str) -> Bundle:
    """Read a checkpoint folder for sampling, networks in eval mode on ``device``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found; train one with `medsynth train {NAME}`")
    card, step = latest(folder)
    denoiser, segmenter, scheduler = load_networks(step)
    return Bundle(denoiser.to(device).eval(), segmenter.to(device).eval(), dict(scheduler.config),
                  [int(v) for v in card["values"]], int(card["channels"]), int(card["size"]))
