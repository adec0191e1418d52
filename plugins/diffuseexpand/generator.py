"""The ``diffuseexpand`` generator: trains Stages I-II and samples the image of each mask (Stage III)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from medsynth_core import (
    CheckpointError,
    Condition,
    ConfigError,
    Dataset,
    Generator,
    PipelineError,
    Sample,
    option,
    torch_generator,
    write_checkpoint_card,
)
from medsynth_core.atomic import write_bytes_atomic
from medsynth_core.distributed import current_processes
from medsynth_core.training import make_accelerator

from . import store
from .networks import NoisySegmenter, adapt_pretrained, build_denoiser, encode_masks
from .sampling import Phase, SamplingOptions, initial_noise, sample
from .training import Trainer, class_lookup, training_set

# options that fix the networks or the data they see; a resumed training must keep them
ARCHITECTURE = ("size", "block_channels", "layers_per_block", "attention", "segmenter_channels", "train_timesteps",
                "beta_schedule", "pretrained")


@dataclass(frozen=True)
class DiffuseExpandConfig(SamplingOptions):
    """Options of the diffuseexpand generator: training (Stages I-II) and image sampling (Stage III)."""

    size: int = option(32, "Training: side of the square training images, in px (the paper: 256).")
    block_channels: tuple[int, ...] = option(
        (32, 64), "Training: widths of the denoiser UNet levels (each level halves the resolution).")
    layers_per_block: int = option(1, "Training: ResNet layers per UNet level (denoiser and segmenter).")
    attention: bool = option(False, "Training: self-attention at the coarsest denoiser level.")
    segmenter_channels: tuple[int, ...] = option((16, 32), "Training: widths of the Stage II segmenter UNet levels.")
    steps: int = option(800, "Training: iterations, each updating the denoiser and the segmenter (the paper: 30000).")
    batch_size: int = option(8, "Training: pairs per iteration (the paper: 16).")
    lr: float = option(5e-4, "Training: Adam learning rate of both networks (the paper: 1e-4).")
    cond_drop: float = option(0.1, "Training: probability of dropping the mask condition of an image "
                                   "(classifier-free training).")
    train_timesteps: int = option(1000, "Training: diffusion timesteps T.")
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = option("linear", "Training: noise schedule.")
    pretrained: str | None = option(
        None, "Training: local diffusers UNet2DModel folder (or hub id) to fine-tune from; default: random weights.")
    save_every: int = option(200, "Training: write a checkpoint every this many iterations (and at the end).")
    seed: int = option(0, "Training: seed of the initial weights and of every batch.")
    cfg_scale: float = option(3.0, "Sampling: classifier-free guidance weight w (eps_u + w (eps_c - eps_u)); "
                                   "1 = conditional prediction only.")
    type_guidance: bool = option(True, "Sampling: also guide by the segmenter's image-or-mask head, "
                                       "grad log p(y1 = image | x_t).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size < 8 or self.size % 2 ** (len(self.block_channels) - 1) or \
                self.size % 2 ** (len(self.segmenter_channels) - 1):
            raise ConfigError(f"size must be >= 8 and divisible by 2^(levels - 1) of both UNets, got {self.size}")
        for name in ("block_channels", "segmenter_channels"):
            widths = getattr(self, name)
            if not widths or any(w < 4 or w % 4 for w in widths):
                raise ConfigError(f"{name} must be one or more widths that are multiples of 4, got {widths}")
        for name in ("layers_per_block", "steps", "batch_size", "train_timesteps", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ConfigError(f"cond_drop is a probability in [0, 1), got {self.cond_drop}")
        if self.cfg_scale < 0:
            raise ConfigError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


class DiffuseExpandGenerator(Generator):
    """DiffuseExpand: the image of each mask from a mask-conditioned DPM with segmenter guidance (Shao et al.)."""

    Config = DiffuseExpandConfig
    trainable = True
    requires = frozenset({"mask"})
    makes = frozenset()  # the pair's mask is the conditioning mask
    recipe = {  # CPU-sized DiffuseExpand: masks and images from the same checkpoint, Dice-filtered
        "train": {"steps": 600},
        "mask_source": {"name": "diffuseexpand-masks", "checkpoint": "{checkpoint}"},
        "filters": [{"name": "dice-filter"}],
    }

    bundle: store.Bundle | None = None

    # ---- Stages I and II -------------------------------------------------------------------------------------

    def fit(self, dataset: Dataset, workdir: Path) -> Path:
        cfg = self.config
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        data = training_set(dataset, cfg.size)
        card = self._resume_card(workdir, data.values, data.channels)
        main = current_processes().is_main  # only the main process touches the folder
        if card is None:
            if main:
                store.tidy(workdir, keep=None)
                (workdir / store.LOSS_LOG).unlink(missing_ok=True)  # rows of a run that never reached a checkpoint
            denoiser, segmenter, scheduler = self._fresh_networks(data.channels, data.classes)
            step, training = 0, None
        else:
            step = int(card["step"])
            if main:
                store.tidy(workdir, keep=card["latest"])
                _truncate_log(workdir / store.LOSS_LOG, step)
            if step >= cfg.steps:
                self.context.log(f"{workdir}: already trained for {step} of {cfg.steps} steps")
                return workdir
            step_dir = workdir / card["latest"]
            denoiser, segmenter, scheduler = store.load_networks(step_dir)
            training = store.load_training(step_dir)
        accelerator = make_accelerator(self.context)
        trainer = Trainer(denoiser, segmenter, scheduler, data, lr=cfg.lr, batch_size=cfg.batch_size,
                          cond_drop=cfg.cond_drop, device=self.context.device, seed=cfg.seed,
                          accelerator=accelerator, start=step)
        if training is not None:
            trainer.restore(training)
        rows: list[tuple] = []
        with self.context.progress.task("training diffuseexpand (denoiser + segmenter)", total=cfg.steps) as task:
            task.advance(step)
            while step < cfg.steps:
                losses = trainer.step()
                step += 1
                rows.append((losses.diffusion, losses.segmentation, losses.type))
                task.advance()
                task.show(loss=f"{losses.diffusion:.4f}", seg=f"{losses.segmentation + losses.type:.3f}")
                if step % cfg.save_every == 0 or step == cfg.steps:
                    # the logged losses are the means over the processes
                    means = accelerator.reduce(torch.tensor(rows, dtype=torch.float32, device=accelerator.device),
                                               reduction="mean").cpu().tolist()
                    if accelerator.is_main_process:
                        first = step - len(rows) + 1
                        self._save(workdir, step, trainer, data, [(first + i, *m) for i, m in enumerate(means)])
                    accelerator.wait_for_everyone()
                    rows = []
        return workdir

    def _fresh_networks(self, channels: int, classes: int):
        cfg = self.config
        torch.manual_seed(cfg.seed)
        if cfg.pretrained:
            try:
                base = UNet2DModel.from_pretrained(cfg.pretrained)
            except (OSError, ValueError) as err:
                raise CheckpointError(f"pretrained {cfg.pretrained!r}: cannot load a diffusers UNet2DModel "
                                      f"({str(err).splitlines()[0]})") from None
            denoiser = adapt_pretrained(base, channels, cfg.size)
        else:
            denoiser = build_denoiser(channels, cfg.size, cfg.block_channels, cfg.layers_per_block, cfg.attention)
        segmenter = NoisySegmenter(in_channels=channels, classes=classes, block_channels=tuple(cfg.segmenter_channels),
                                   layers_per_block=cfg.layers_per_block, sample_size=cfg.size)
        scheduler = DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule)
        return denoiser, segmenter, scheduler

    def _resume_card(self, workdir: Path, values: list[int], channels: int) -> dict | None:
        if not (workdir / "checkpoint.json").is_file():
            return None
        card, _ = store.latest(workdir)
        trained = card.get("config", {})
        now = self.config
        for name in ARCHITECTURE:
            ours = getattr(now, name)
            ours = list(ours) if isinstance(ours, tuple) else ours
            if trained.get(name) != ours:
                raise ConfigError(f"{workdir}: trained with {name} = {trained.get(name)!r}, now {ours!r}; "
                                  "resume with the same value")
        if card.get("values") != values or card.get("channels") != channels:
            raise ConfigError(f"{workdir}: trained on mask values {card.get('values')} and {card.get('channels')} "
                              f"channel(s), this dataset has {values} and {channels}; use the same data to resume")
        return card

    def _save(self, workdir: Path, step: int, trainer: Trainer, data, rows: list[tuple]) -> None:
        name = store.save_step(workdir, step, *trainer.networks(), trainer.scheduler, trainer.state())
        write_checkpoint_card(workdir, self, step, latest=name, values=data.values, channels=data.channels,
                              size=self.config.size)
        _append_log(workdir / store.LOSS_LOG, rows)
        store.tidy(workdir, keep=name)

    # ---- Stage III ------------------------------------------------------------------------------------------

    def networks(self) -> list[Any]:
        """The denoiser and the noisy segmenter, once loaded."""
        return [] if self.bundle is None else [self.bundle.denoiser, self.bundle.segmenter]

    def load(self, checkpoint: Path) -> None:
        self.bundle = store.load_bundle(checkpoint, self.context.device)

    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        bundle = self.bundle
        if bundle is None:
            raise PipelineError(f"{self.name}: load(checkpoint) before generate()")
        device = self.context.device
        lookup = class_lookup(bundle.values)
        target = torch.stack([self._target(c, lookup, bundle.size) for c in conditions]).to(device)
        noise, generators = initial_noise((bundle.channels, bundle.size, bundle.size), seeds, device,
                                          torch_generator)
        phase = Phase(y1=1, condition=encode_masks(target, bundle.classes, 1), target=target,
                      cfg_scale=self.config.cfg_scale, type_guidance=self.config.type_guidance)
        x0 = sample(bundle.denoiser, bundle.segmenter, bundle.schedule, self.config, phase, noise, generators,
                    bundle.classes)
        images = ((x0 + 1.0) / 2.0).clamp(0.0, 1.0).float().cpu()
        return [Sample(image=_to_numpy(img, c.mask.shape)) for img, c in zip(images, conditions)]

    def _target(self, condition: Condition, lookup: np.ndarray, size: int) -> torch.Tensor:
        if condition.mask is None:
            raise PipelineError(f"{self.name}: every condition needs a mask")
        index = lookup[condition.mask]
        if (index < 0).any():
            unknown = sorted(set(np.unique(condition.mask[index < 0]).tolist()))
            raise PipelineError(f"{self.name}: mask values {unknown} were not in the training masks "
                                f"({[int(v) for v in np.flatnonzero(lookup >= 0)]})")
        tensor = torch.from_numpy(index)[None, None].float()
        return F.interpolate(tensor, size=(size, size), mode="nearest")[0, 0].long()


def _to_numpy(image: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """C x S x S in [0, 1] -> float32 H x W (grey) or H x W x 3 at the mask's own size."""
    if tuple(image.shape[-2:]) != tuple(shape[:2]):
        image = F.interpolate(image[None], size=tuple(shape[:2]), mode="bilinear", align_corners=False)[0]
    array = image.clamp(0.0, 1.0).numpy()
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    return np.ascontiguousarray(array, dtype=np.float32)


def _append_log(path: Path, rows: list[tuple]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(store.LOSS_COLUMNS)
        writer.writerows((step, f"{d:.6f}", f"{s:.6f}", f"{t:.6f}") for step, d, s, t in rows)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past the checkpoint being resumed (written just before a kill)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if line.split(",")[0].isdigit() and int(line.split(",")[0]) <= step]
    if len(kept) != len(lines):
        write_bytes_atomic(path, ("\n".join(kept) + "\n").encode())

