"""``ddpm4``: image+mask DDPMs, one per appearance cluster (the paper's Diff) or one for all (Full-Diff)."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from medsynth_core import (
    CheckpointError,
    Condition,
    ConfigError,
    Dataset,
    DatasetError,
    Generator,
    Sample,
    load_torch,
    numpy_rng,
    option,
    read_checkpoint_card,
    save_torch,
    torch_generator,
    write_checkpoint_card,
)
from medsynth_core.atomic import write_json_atomic
from medsynth_core.checkpoint import CARD
from medsynth_core.distributed import current_processes
from medsynth_core.training import make_accelerator, step_generator

from .bundle import CLUSTERS_FILE, DiffusionBundle, model_dir, recover_dir, replace_dir
from .clustering import Clusters, ExtractorName, choose_k, cluster_pairs, read_clusters
from .diffusion import (
    TRAIN_STEPS,
    Schedule,
    SchedulerName,
    hybrid_loss,
    image_to_numpy,
    make_scheduler,
    pairs_to_tensor,
    soft_mask_to_numpy,
)
from .unet import build_unet, check_architecture

TRAIN_STATE = "train_state.pt"
TRAIN_STEP = "train_step.json"
LOSS_LOG = "loss.csv"
# options that shape the models or their data: resuming with other values would mix two trainings
_FIXED_ON_RESUME = ("per_cluster", "clusters", "min_cluster_size", "features", "size", "block_out_channels",
                    "layers_per_block", "attention_resolutions", "attention_head_dim", "norm_num_groups",
                    "resblock_updown", "learn_sigma", "dropout", "seed")


@dataclass(frozen=True)
class DDPM4Config:
    """Options of the ddpm4 generator (training options are read back from the checkpoint when sampling)."""

    per_cluster: bool = option(True, "One model per cluster (the paper's Diff); false: one model for the whole "
                                     "set (Full-Diff).")
    clusters: int = option(20, "KMeans clusters k (the paper: 20); fewer when the set is small (min_cluster_size).")
    min_cluster_size: int = option(8, "Use at most pairs // min_cluster_size clusters, so no model sees too few pairs.")
    features: ExtractorName = option("auto", "Clustering features: 'inception' (the paper's; needs local weights), "
                                             "'random-cnn' (a fixed random CNN, no download), 'auto' (inception when "
                                             "weights are given).")
    inception_weights: str | None = option(None, "clean-fid's inception-2015-12-05.pt (file or folder); default: "
                                                 "$MEDSYNTH_INCEPTION_WEIGHTS.")
    size: int = option(64, "Model resolution in px; pairs are resized to size x size (the paper: 256).")
    block_out_channels: tuple[int, ...] = option((32, 64, 128), "UNet channels per level (the paper: 256, 256, "
                                                                "512, 512, 1024, 1024).")
    layers_per_block: int = option(2, "Residual blocks per level (the paper: 2).")
    attention_resolutions: tuple[int, ...] = option((16, 8), "Feature-map sizes in px that get self-attention "
                                                             "(the paper: 16, 8); the middle block always has it.")
    attention_head_dim: int = option(32, "Channels per attention head (the paper: 64).")
    norm_num_groups: int = option(32, "GroupNorm groups; must divide every channel count.")
    resblock_updown: bool = option(True, "Residual blocks for down/up-sampling (the paper: true).")
    learn_sigma: bool = option(True, "Learn the reverse variance with the hybrid loss (Nichol & Dhariwal; the "
                                     "paper: true).")
    dropout: float = option(0.0, "Dropout in the residual blocks (the paper: 0).")
    steps: int = option(2000, "Training iterations per model (the paper: 110000).")
    batch_size: int = option(4, "Pairs per training step (the paper: 1).")
    lr: float = option(1e-4, "AdamW learning rate (the paper: 1e-4).")
    weight_decay: float = option(0.0, "AdamW weight decay (the paper: 0).")
    flip: bool = option(True, "Random horizontal flips of the training pairs.")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "Autocast on CUDA (the paper trained in fp16).")
    save_every: int = option(500, "Write a checkpoint every this many steps of a model (and at its end).")
    seed: int = option(0, "Training seed: initial weights, batches, timesteps and noise.")
    scheduler: SchedulerName = option("ddpm", "Sampler: 'ddpm' (the paper's, respaced to inference_steps), 'ddim', "
                                              "'dpm-solver++'.")
    inference_steps: int = option(200, "Sampling steps (the paper: timestep_respacing 200; dpm-solver++: ~20).")
    cluster: int | None = option(None, "Sample only this cluster (default: clusters drawn in proportion to size).")
    max_models_in_memory: int = option(4, "Cluster models kept loaded at once while sampling.")

    def __post_init__(self) -> None:
        for name in ("clusters", "min_cluster_size", "steps", "batch_size", "save_every", "inference_steps",
                     "max_models_in_memory"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.inference_steps > TRAIN_STEPS:
            raise ConfigError(f"inference_steps must be <= {TRAIN_STEPS}, got {self.inference_steps}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"lr must be > 0, weight_decay >= 0 and dropout in [0, 1); got {self.lr}, "
                              f"{self.weight_decay}, {self.dropout}")
        if self.cluster is not None and self.cluster < 0:
            raise ConfigError(f"cluster must be >= 0, got {self.cluster}")
        check_architecture(self.size, self.block_out_channels, self.attention_resolutions, self.attention_head_dim,
                           self.norm_num_groups, self.layers_per_block)


class DDPM4Generator(Generator):
    """Image+mask diffusion: new pairs from noise, one DDPM per appearance cluster (Saragih's Diff) or one for all.

    Training clusters the real pairs (InceptionV3 or random-CNN features of image and mask, KMeans),
    then trains a UNet on each cluster whose input and output are the image channels plus one mask
    channel, with the DDPM loss (linear schedule, 1000 steps, learned variance optional). Sampling
    draws the cluster of sample i from its seed in proportion to the cluster sizes and denoises with
    any diffusers sampler; the mask comes out as a soft mask for a refiner such as ``threshold``.
    """

    Config = DDPM4Config
    trainable = True
    makes = frozenset({"soft_mask"})
    recipe = {  # CPU-sized: one small 32 px image+mask model (Full-Diff), a few CPU-minutes, DPM-Solver++
        "train": {"size": 32, "per_cluster": False, "block_out_channels": [32, 64], "attention_resolutions": [16],
                  "attention_head_dim": 32, "layers_per_block": 1, "steps": 2000, "save_every": 500},
        "generator": {"scheduler": "dpm-solver++", "inference_steps": 25},
        "refiners": [{"name": "threshold"}],
    }

    # ---- training ----------------------------------------------------------------------------
    def fit(self, dataset: Dataset, workdir: Path) -> Path:
        cfg = self.config
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        stems, images, masks = _labelled_pairs(dataset)
        channels = 3 if any(im.ndim == 3 for im in images) else 1
        procs = current_processes()
        self._card = None
        error = None
        if procs.is_main:  # clustering and the card are written once; the other processes read them
            try:
                clusters = self._clusters(workdir, stems, images, masks)
                count = clusters.k if cfg.per_cluster else 1
                previous = read_checkpoint_card(workdir).get("models", {}) if (workdir / CARD).is_file() else {}
                self._card = {"channels": channels, "clusters": clusters, "steps": self._model_steps(workdir, count),
                              "losses": {name: m.get("loss") for name, m in previous.items()},
                              "masks": dict(zip(stems, masks))}
                self._write_card(workdir)
            except Exception as err:  # re-raised on every process by agree()
                error = err
        procs.agree(error)
        if not procs.is_main:
            clusters = read_clusters(workdir / CLUSTERS_FILE)
        count = clusters.k if cfg.per_cluster else 1
        data = pairs_to_tensor(images, masks, cfg.size, channels)
        index_of = {s: i for i, s in enumerate(stems)}
        members = [[index_of[s] for s in clusters.members(c)] for c in range(clusters.k)] if cfg.per_cluster \
            else [list(range(len(stems)))]
        # the option asks for autocast on CUDA only; the command's --mixed-precision overrides it
        cuda = str(self.context.device).startswith("cuda")
        accelerator = make_accelerator(self.context, mixed_precision=cfg.mixed_precision if cuda else "no")
        with self.context.progress.task(f"training ddpm4 ({count} model{'s' * (count > 1)})",
                                        total=count * cfg.steps) as task:
            if self._card is not None:
                task.advance(sum(min(s, cfg.steps) for s in self._card["steps"].values()))
            for index in range(count):
                self._train_model(workdir, index, data[members[index]], channels, accelerator, task)
        if self._card is not None:
            del self._card["masks"]
        return workdir

    def _clusters(self, workdir: Path, stems: list[str], images, masks) -> Clusters:
        cfg = self.config
        path = workdir / CLUSTERS_FILE
        if path.is_file() and (workdir / CARD).is_file():  # without its card, clustering was cut short: redo it
            card = read_checkpoint_card(workdir, expected=self.name)
            changed = [k for k in _FIXED_ON_RESUME if _jsonish(card["config"].get(k)) != _jsonish(getattr(cfg, k))]
            if changed:
                key = changed[0]
                raise CheckpointError(f"{workdir}: trained with {key}={card['config'].get(key)!r}; cannot resume "
                                      f"with {key}={_jsonish(getattr(cfg, key))!r}")
            clusters = read_clusters(path)
            if set(clusters.assignments) != set(stems):
                raise CheckpointError(f"{workdir}: was trained on other pairs than this dataset; use another --out")
            return clusters
        if cfg.per_cluster:
            k = choose_k(len(stems), cfg.clusters, cfg.min_cluster_size)
            clusters = cluster_pairs(stems, images, masks, k=k, extractor=cfg.features,
                                     weights=cfg.inception_weights, seed=cfg.seed, device=self.context.device,
                                     log=self.context.log)
        else:
            clusters = Clusters.single(stems)
            self.context.log(f"diffusegen: one model for all {len(stems)} pairs (Full-Diff)")
        write_json_atomic(path, clusters.to_json())
        return clusters

    def _model_steps(self, workdir: Path, count: int) -> dict[str, int]:
        steps = {}
        for index in range(count):
            path = model_dir(workdir, index, self.config.per_cluster)
            recover_dir(path)
            done = path / TRAIN_STEP
            steps[path.name] = int(json.loads(done.read_text())["step"]) if done.is_file() else 0
        return steps

    def _train_model(self, workdir: Path, index: int, data: torch.Tensor, channels: int, accelerator,
                     task) -> None:
        """Train (or go on training) the model of cluster ``index``; every process runs this, each on its own
        batches, and the main process writes the checkpoints."""
        cfg = self.config
        path = model_dir(workdir, index, cfg.per_cluster)
        if (path / TRAIN_STATE).is_file():
            from diffusers import UNet2DModel

            unet = UNet2DModel.from_pretrained(str(path))
            state = load_torch(path / TRAIN_STATE)
        else:
            torch.manual_seed(cfg.seed * 1009 + index)
            unet = build_unet(size=cfg.size, planes=channels + 1, learn_sigma=cfg.learn_sigma,
                              block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                              attention_resolutions=cfg.attention_resolutions,
                              attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups,
                              resblock_updown=cfg.resblock_updown, dropout=cfg.dropout)
            state = {"step": 0, "optimizer": None}
        if state["step"] >= cfg.steps:
            return
        unet.to(accelerator.device).train()
        optimiser = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if state["optimizer"] is not None:
            optimiser.load_state_dict(state["optimizer"])
            for group in optimiser.param_groups:  # the saved state carries the old lr; the options win
                group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
        model, optimiser = accelerator.prepare(unet, optimiser)
        trainer = _Trainer(model, optimiser, cfg, accelerator, seed=cfg.seed * 1009 + index + 1)
        step, window = state["step"], []
        while step < cfg.steps:
            loss, mse, vb = trainer.step(data, step)
            step += 1
            window.append((loss, mse, vb))
            task.advance()
            task.show(model=path.name, loss=f"{loss:.4f}")
            if step % cfg.save_every == 0 or step == cfg.steps:
                mean = accelerator.reduce(torch.tensor(np.mean(window, axis=0), dtype=torch.float32,
                                                       device=accelerator.device), reduction="mean")
                if accelerator.is_main_process:
                    self._save(workdir, path, accelerator.unwrap_model(model), optimiser, step,
                               mean.cpu().numpy())
                accelerator.wait_for_everyone()  # no process reads a model before it is written
                window = []
        accelerator.free_memory()  # the next model starts its own accumulation cycle

    def _save(self, workdir: Path, path: Path, unet, optimiser, step: int, mean: np.ndarray) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unet.save_pretrained(str(tmp))
        save_torch(tmp / TRAIN_STATE, {"step": step, "optimizer": optimiser.state_dict()})
        (tmp / TRAIN_STEP).write_text(json.dumps({"step": step}))  # read without loading the optimiser state
        replace_dir(tmp, path)
        _append_loss(workdir / LOSS_LOG, path.name, step, mean)
        self._card["steps"][path.name] = step
        self._card["losses"][path.name] = round(float(mean[0]), 6)
        self._write_card(workdir)

    def _write_card(self, workdir: Path) -> None:
        cfg, card = self.config, self._card
        clusters: Clusters = card["clusters"]
        masks = card.get("masks", {})
        summary = []
        for c in range(clusters.k):
            stems = clusters.members(c)
            fg = [float(np.count_nonzero(masks[s])) / masks[s].size for s in stems if s in masks]
            name = model_dir(workdir, c, cfg.per_cluster).name
            summary.append({"cluster": c, "pairs": len(stems), "mean_lesion_fraction": round(float(np.mean(fg)), 4)
                            if fg else None, "model": name if cfg.per_cluster else "all",
                            "step": card["steps"].get(name, card["steps"].get("all", 0)), "first_stems": stems[:5]})
        write_checkpoint_card(
            workdir, self, sum(card["steps"].values()),
            model={"image_channels": card["channels"], "size": cfg.size, "learn_sigma": cfg.learn_sigma,
                   "per_cluster": cfg.per_cluster, "planes": card["channels"] + 1},
            complete=all(s >= cfg.steps for s in card["steps"].values()),
            models={name: {"step": s, "loss": card["losses"].get(name)} for name, s in card["steps"].items()},
            clustering={"extractor": clusters.extractor, "k": clusters.k, "sizes": clusters.sizes(),
                        "clusters": summary},
            assignments=dict(sorted(clusters.assignments.items())),
        )

    # ---- sampling ----------------------------------------------------------------------------
    def load(self, checkpoint: Path) -> None:
        self.bundle = DiffusionBundle.open(checkpoint, device=self.context.device,
                                           max_models=self.config.max_models_in_memory)
        self.bundle.on_load = self.tune  # cluster models load on demand
        card = read_checkpoint_card(checkpoint, expected=self.name)
        if not card.get("complete", False):
            self.context.log(f"diffusegen: {checkpoint} is not fully trained ({card.get('models')})")
        self._check_cluster()

    def use(self, bundle: DiffusionBundle) -> None:
        """Sample from models already in memory instead of a checkpoint folder."""
        self.bundle = bundle
        self.bundle.on_load = self.tune
        self._check_cluster()

    def _check_cluster(self) -> None:
        k = self.bundle.clusters.k
        if self.config.cluster is not None and self.config.cluster >= k:
            raise ConfigError(f"cluster must be < {k} (the checkpoint's clusters), got {self.config.cluster}")

    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        bundle = getattr(self, "bundle", None)
        if bundle is None:
            raise CheckpointError(f"{self.name}: no model loaded; pass a checkpoint from `medsynth train ddpm4`")
        chosen = [self.config.cluster if self.config.cluster is not None else bundle.weighted_cluster(numpy_rng(s))
                  for s in seeds]
        out: list[Sample | None] = [None] * len(seeds)
        for cluster in sorted(set(chosen)):
            idx = [i for i, c in enumerate(chosen) if c == cluster]
            x = sample_pairs(bundle, cluster, [seeds[i] for i in idx], self.config.scheduler,
                             self.config.inference_steps)
            for k, i in enumerate(idx):
                out[i] = Sample(image=image_to_numpy(x[k, :bundle.channels], bundle.channels),
                                soft_mask=soft_mask_to_numpy(x[k, bundle.channels]), meta={"cluster": cluster})
        return out  # type: ignore[return-value]


class _Trainer:
    """One DDPM training step: noise a batch of pairs at uniform timesteps, regress the noise.

    A step is one optimiser update: ``grad_accum`` batches, all drawn from the generator of
    (seed, step, process), so each process sees its own batches and a resumed training draws what
    an uninterrupted one would.
    """

    def __init__(self, unet, optimiser, cfg: DDPM4Config, accelerator, *, seed: int) -> None:
        self.unet, self.optimiser, self.cfg, self.accelerator, self.seed = unet, optimiser, cfg, accelerator, seed
        self.schedule = Schedule()

    def step(self, data: torch.Tensor, step: int) -> tuple[float, float, float]:
        """Train on the batches of ``step``; return this process's mean loss, MSE and VB term."""
        acc = self.accelerator
        gen = step_generator(self.seed, step, acc.process_index)
        totals = np.zeros(3)
        for _ in range(acc.gradient_accumulation_steps):
            x0, xt, noise, t = self._batch(data, gen)
            with acc.accumulate(self.unet):
                with acc.autocast():
                    output = self.unet(xt, t).sample
                loss, mse, vb = hybrid_loss(self.schedule, x0, xt, t, noise, output.float())
                acc.backward(loss)
                self.optimiser.step()  # skipped by accelerate until the last batch of the step
                self.optimiser.zero_grad(set_to_none=True)
            totals += (float(loss.detach()), float(mse), float(vb))
        return tuple(totals / acc.gradient_accumulation_steps)

    def _batch(self, data: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        bs = self.cfg.batch_size
        pick = torch.randint(len(data), (bs,), generator=gen)
        x0 = data[pick].clone()
        flips = torch.rand(bs, generator=gen) < 0.5
        if self.cfg.flip:
            x0[flips] = x0[flips].flip(-1)
        t = torch.randint(0, TRAIN_STEPS, (bs,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        if self.cfg.dropout > 0:  # dropout draws from the global generators: seed them per batch too
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        xt = self.schedule.q_sample(x0, t, noise)
        device = self.accelerator.device
        return tuple(v.to(device) for v in (x0, xt, noise, t))


@torch.no_grad()
def sample_pairs(bundle: DiffusionBundle, cluster: int, seeds: Sequence[int], scheduler: SchedulerName,
                 steps: int) -> torch.Tensor:
    """Denoise pure noise into image+mask pairs (B x planes x size x size, [-1, 1], on the CPU).

    Each sample draws its noise from its own seed (CPU generators, so pairs do not depend on the
    batch or the device). Only the DDPM sampler uses the learned variance; DDIM and DPM-Solver++
    take the predicted noise alone.
    """
    from diffusers.utils.torch_utils import randn_tensor

    unet = bundle.unet(cluster)
    sched = make_scheduler(scheduler, bundle.learn_sigma)
    sched.set_timesteps(steps)
    gens = [torch_generator(s) for s in seeds]
    shape = (len(seeds), bundle.planes, bundle.size, bundle.size)
    x = randn_tensor(shape, generator=gens, device=torch.device(bundle.device)) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t).sample
        if scheduler != "ddpm" or not bundle.learn_sigma:
            out = out[:, :bundle.planes]
        x = sched.step(out, t, x, generator=gens).prev_sample
    return x.float().cpu()


def _labelled_pairs(dataset: Dataset) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    stems, images, masks = [], [], []
    for i in dataset.labelled():
        s = dataset[i]
        stems.append(str(s.meta.get("stem", f"{i:06d}")))
        images.append(s.image)
        masks.append(s.mask)
    if not stems:
        raise DatasetError(f"{dataset.name}: ddpm4 trains on image + mask pairs, and this set has no masks")
    return stems, images, masks


def _append_loss(path: Path, model: str, step: int, mean: np.ndarray) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["model", "step", "loss", "mse", "vb"])
        writer.writerow([model, step, *(f"{v:.6f}" for v in mean)])


def _jsonish(value):
    return json.loads(json.dumps(value, default=list)) if isinstance(value, (tuple, list)) else value
