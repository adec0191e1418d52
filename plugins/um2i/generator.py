"""The UM2I generator: image and segmentation from an unsupervised mask, trained semi-supervised.

Training (``medsynth train um2i``), in one checkpoint folder:

1. the unsupervised masks of the real images (Algorithm 1), cached in ``unsupervised-masks.npz``;
2. stage 1: the multi-task generator on the labelled images (image adversarial + perceptual
   loss, segmentation Dice + cross-entropy + adversarial loss);
3. pseudo-labels for the unlabelled images from the segmentation head, with a confidence map;
4. stage 2: labelled and unlabelled images together, the segmentation loss of the latter only
   on confident pixels;
5. the UM GAN (V2UM, ``stylegan.py``) on the same unsupervised masks, for ``um-generator``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_core import (
    CheckpointError,
    Condition,
    ConfigError,
    Dataset,
    Generator,
    PipelineError,
    Sample,
    load_torch,
    numpy_rng,
    option,
    read_checkpoint_card,
    save_torch,
    write_checkpoint_card,
)
from medsynth_core.atomic import write_bytes_atomic, write_json_atomic
from medsynth_core.distributed import current_processes
from medsynth_core.training import make_accelerator, step_generator
from medsynth_plugins.common.images import image_batch, mask_batch

from .diversity import diversity_report
from .networks import (
    MultiTaskGenerator,
    NetArch,
    PatchDiscriminator,
    VGGPerceptual,
    feature_matching_loss,
    load_vgg,
    lsgan_loss,
    masked_segmentation_loss,
)
from .parallel import MicroStatistics, accumulate, average_buffers, frozen, mean_losses, optimiser_step
from .stylegan import (
    GanTraining,
    StyleArch,
    gan_state_dict,
    gan_step,
    load_gan_state,
    new_gan_state,
    sample_masks,
)
from .superpixels import resize_um, snap_to_levels, unsupervised_mask

STATE = "um2i.pt"
UM_CACHE = "unsupervised-masks.npz"
GAN_STATE = "um-gan.pt"
GAN_REPORT = "um-gan.json"
LOSS_LOG = "loss.csv"
GAN_LOG = "um-gan-loss.csv"
LOSS_FIELDS = ("step", "stage", "d_image", "d_seg", "g_adv", "perceptual", "g_perceptual", "g_l1", "g_seg",
               "g_seg_adv", "trusted")
GAN_FIELDS = ("step", "level", "alpha", "d", "g", "r1")


@dataclass(frozen=True)
class UM2IConfig:
    """Options of the UM2I generator (defaults: CPU scale; the paper's values are in the help)."""

    condition: Literal["um", "mask"] = option(
        "um", "'um': the unsupervised mask in Condition.image (UM2I, V2UM2I); 'mask': the real segmentation "
              "mask (the paper's M2I control, same network).")
    size: int = option(64, "Training resolution, a power of two >= 16 (paper: 1024 montages).")
    um_segments: int = option(512, "M: superpixels per image (Algorithm 1; paper: 512). Use the same in slic-um.")
    um_gap: float = option(50.0, "t: intensity gap between UM levels on a 0-255 scale (paper: 50); larger = fewer.")
    um_superpixels: Literal["slic", "felzenszwalb"] = option(
        "slic", "Superpixel method: SLIC (the paper's) or Felzenszwalb's graph-based one (its Table VI).")
    um_compactness: float = option(
        0.1, "SLIC compactness on the 0-100 (Lab L) scale: low follows intensity edges, high gives squares.")
    um_colour: bool = option(True, "Colour images give colour UMs (each channel averaged and quantised).")
    ngf: int = option(16, "Generator base channels (paper: 64).")
    down: int = option(2, "Down-sampling blocks (paper: 4); as many up-sampling blocks follow.")
    residual: int = option(3, "Residual blocks (paper: 9).")
    norm: Literal["batch", "instance"] = option("batch", "Normalisation in the generator (paper: batch).")
    ndf: int = option(16, "Discriminator base channels (pix2pix: 64).")
    d_layers: int = option(2, "PatchGAN layers (pix2pix's 70 px patches: 3).")
    supervised_steps: int = option(400, "Stage 1: steps on the labelled images.")
    semi_steps: int = option(200, "Stage 2: steps on labelled and pseudo-labelled images; 0 = fully supervised.")
    batch_size: int = option(4, "Images per step (paper: 4 per GPU).")
    lr: float = option(2e-4, "Adam learning rate of generator and discriminators (pix2pix).")
    labelled_fraction: float = option(
        1.0, "Share of the real masks used; the rest are hidden (seeded) to simulate scarce labels, e.g. 0.75.")
    confidence: Literal["softmax", "discriminator"] = option(
        "softmax", "Confidence map of a pseudo-label: the top class probability, or the segmentation "
                   "discriminator's patch score (Hung et al., the paper's D2S).")
    confidence_threshold: float = option(0.9, "Pixels of a pseudo-label with confidence below this are ignored.")
    lambda_perceptual: float = option(10.0, "Weight of the perceptual loss (VGG, else discriminator features).")
    lambda_l1: float = option(0.0, "Weight of a pixel L1 loss to the real image (not in the paper; 0 = off).")
    lambda_seg: float = option(10.0, "Weight of the Dice + cross-entropy segmentation loss.")
    lambda_seg_adv: float = option(0.1, "Weight of the segmentation's adversarial loss.")
    vgg_weights: Path | None = option(
        None, "torchvision vgg16/vgg19 state_dict (.pth) for the VGG loss; without it, discriminator feature "
              "matching stands in (named so in loss.csv).")
    checkpoint_every: int = option(100, "Save the training state every this many steps.")
    seed: int = option(0, "Training seed: initial weights, batches, hidden masks.")
    vum_steps: int = option(2000, "Steps of the UM GAN (V2UM) trained after UM2I; 0 skips it.")
    vum_latent: int = option(64, "UM GAN: size of z and w (StyleGAN: 512).")
    vum_mapping_layers: int = option(4, "UM GAN: mapping network layers (StyleGAN: 8).")
    vum_channels: int = option(16, "UM GAN: channels at full resolution, doubling per halving.")
    vum_max_channels: int = option(128, "UM GAN: channel cap (StyleGAN: 512).")
    vum_batch_size: int = option(4, "UM GAN: batch size (paper: 128 at low resolution down to 8).")
    vum_lr: float = option(2e-3, "UM GAN: Adam learning rate (paper: 0.003).")
    vum_r1: float = option(1.0, "UM GAN: R1 penalty weight on real masks.")
    vum_progressive: bool = option(True, "UM GAN: progressive growing from 8 px, each level faded in (paper).")
    vum_augment: bool = option(True, "UM GAN: flip/translate reals and fakes for the discriminator (small sets).")

    def __post_init__(self) -> None:
        if self.um_segments < 1:
            raise ConfigError(f"um_segments must be >= 1, got {self.um_segments}")
        if not 0 < self.um_gap < 256:
            raise ConfigError(f"um_gap must be in (0, 255], got {self.um_gap}")
        if self.um_compactness <= 0:
            raise ConfigError(f"um_compactness must be > 0, got {self.um_compactness}")
        if self.size < 16 or self.size & (self.size - 1):
            raise ConfigError(f"size must be a power of two >= 16, got {self.size}")
        if self.size % 2**self.down:
            raise ConfigError(f"down must leave size {self.size} divisible by 2**down, got {self.down}")
        for name in ("ngf", "ndf", "batch_size", "checkpoint_every", "vum_latent", "vum_mapping_layers",
                     "vum_channels", "vum_max_channels", "vum_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("down", "residual", "supervised_steps", "semi_steps", "vum_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.d_layers <= 5:
            raise ConfigError(f"d_layers must be 1-5, got {self.d_layers}")
        if not 0.0 < self.labelled_fraction <= 1.0:
            raise ConfigError(f"labelled_fraction must be in (0, 1], got {self.labelled_fraction}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ConfigError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
        for name in ("lr", "vum_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lambda_perceptual", "lambda_l1", "lambda_seg", "lambda_seg_adv", "vum_r1"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    def um_settings(self) -> dict[str, Any]:
        """The UM options as keyword arguments of ``unsupervised_mask``."""
        return {"segments": self.um_segments, "gap": self.um_gap, "method": self.um_superpixels,
                "colour": self.um_colour, "compactness": self.um_compactness}


@dataclass
class TrainingData:
    """The real set at training size, as tensors: what every step draws from."""

    images: torch.Tensor  # N x C x S x S uint8
    conditions: torch.Tensor  # N x Cin x S x S float in [-1, 1] (UM) or one-hot (mask)
    targets: torch.Tensor  # N x S x S int64 class indices; -1 where there is no (visible) mask
    labelled: list[int]
    unlabelled: list[int]
    hidden: list[str]
    values: list[int]
    ums: torch.Tensor  # N x Cu x S x S float in [0, 1]


class UM2IGenerator(Generator):
    """Image and segmentation from an unsupervised mask (UM2I, "Less is More"), trained semi-supervised."""

    Config = UM2IConfig
    trainable = True
    requires = frozenset({"image"})
    makes = frozenset({"mask", "soft_mask"})
    recipe = {  # CPU-sized V2UM2I: unsupervised masks from the UM GAN, images and segmentations from them
        "train": {"vum_steps": 800},
        "mask_source": {"name": "um-generator", "checkpoint": "{checkpoint}"},
    }

    def __init__(self, config: UM2IConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        # the UM travels in Condition.image; the M2I control reads a real mask instead
        self.requires = frozenset({"image"}) if self.config.condition == "um" else frozenset({"mask"})
        self._warned_gap = False

    # ----------------------------------------------------------------- training
    def fit(self, dataset: Dataset, workdir: Path) -> Path:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        cfg, device = self.config, self.context.device
        data = self._training_data(dataset, workdir)
        arch = self._arch(data)
        # one Accelerator for both trainings: --processes, --mixed-precision, --grad-accum
        acc = make_accelerator(self.context)
        main = acc.is_main_process  # only the main process writes; every process reads
        nets = self._networks(arch, device, acc)
        perceptual = load_vgg(cfg.vgg_weights).to(device) if cfg.vgg_weights else None
        kind = perceptual_kind(perceptual)
        self.context.log(f"um2i: {len(data.labelled)} labelled, {len(data.unlabelled)} unlabelled images "
                         f"({len(data.hidden)} masks hidden); perceptual loss: {kind}"
                         + (f"; {acc.num_processes} processes" if acc.num_processes > 1 else ""))
        state = self._resume(workdir, arch, nets, data)
        total = cfg.supervised_steps + cfg.semi_steps
        if main:
            _trim_log(workdir / LOSS_LOG, LOSS_FIELDS, state["step"])
        extra = {**self._card_extra(data, kind), "processes": acc.num_processes}
        with self.context.progress.task("training um2i", total=total) as task:
            task.advance(min(state["step"], total))
            while state["step"] < total:
                if state["step"] >= cfg.supervised_steps and state["pseudo"] is None and cfg.condition == "um":
                    state["pseudo"] = self._pseudo_labels(nets, data)  # every process, from equal networks
                losses = self._step(nets, perceptual, data, state, kind)
                state["step"] += 1
                if main:
                    _append_log(workdir / LOSS_LOG, LOSS_FIELDS, {"step": state["step"], **losses})
                task.advance()
                task.show(loss=f"{losses['g_adv'] + losses['g_seg']:.3f}", stage=losses["stage"])
                if state["step"] % cfg.checkpoint_every == 0 or state["step"] == total:
                    if main:
                        self._save(workdir, nets, state, arch, data, extra)
                    acc.wait_for_everyone()
        if main and not (workdir / STATE).is_file():  # zero steps asked: still leave a loadable checkpoint
            self._save(workdir, nets, state, arch, data, extra)
        acc.wait_for_everyone()
        if cfg.condition == "um" and cfg.vum_steps > 0:
            extra["um_gan"] = self._fit_gan(data, workdir, acc)
            if main:
                write_checkpoint_card(workdir, self, state["step"], **extra)
            acc.wait_for_everyone()
        elif cfg.condition == "mask" and cfg.vum_steps > 0:
            self.context.log("um2i: condition='mask' (M2I) trains no UM GAN")
        return workdir

    def _training_data(self, dataset: Dataset, workdir: Path) -> TrainingData:
        cfg = self.config
        if len(dataset) == 0:
            raise ConfigError("um2i: the dataset is empty")
        stems = [dataset.files[i].stem if dataset.files else str(dataset[i].meta.get("stem", i))
                 for i in range(len(dataset))]
        with_mask = dataset.labelled()
        rng = numpy_rng(cfg.seed)
        keep = int(round(cfg.labelled_fraction * len(with_mask)))
        visible = set(np.sort(rng.permutation(with_mask)[:keep]).tolist()) if with_mask else set()
        hidden = sorted(stems[i] for i in with_mask if i not in visible)
        if not visible:
            raise ConfigError(f"um2i: no labelled images to train on ({len(with_mask)} masks in {dataset.name!r}, "
                              f"labelled_fraction {cfg.labelled_fraction}); UM2I needs a few masks")
        values = sorted(dataset.label_values)
        lut = np.zeros(256, dtype=np.int64)
        lut[values] = np.arange(len(values))
        colour = any(dataset[i].image.ndim == 3 for i in range(len(dataset)))
        channels = 3 if colour else 1
        ums = self._unsupervised_masks(dataset, stems, workdir) if cfg.condition == "um" else torch.zeros(0)
        images, targets = [], []
        for i in range(len(dataset)):
            s = dataset[i]
            images.append((image_batch([s.image], cfg.size, channels)[0] * 255).round().to(torch.uint8))
            if i in visible:
                targets.append(torch.from_numpy(lut[mask_batch([s.mask], cfg.size)[0].numpy()]))
            else:
                targets.append(torch.full((cfg.size, cfg.size), -1, dtype=torch.int64))
        images_t, targets_t = torch.stack(images), torch.stack(targets)
        if cfg.condition == "mask":
            conditions = _one_hot(targets_t.clamp(min=0), len(values))
            unlabelled: list[int] = []  # M2I can only learn from labelled images
        else:
            conditions = ums * 2 - 1
            unlabelled = [i for i in range(len(dataset)) if i not in visible]
        return TrainingData(images_t, conditions, targets_t, sorted(visible), unlabelled, hidden, values, ums)

    def _unsupervised_masks(self, dataset: Dataset, stems: list[str], workdir: Path) -> torch.Tensor:
        """UMs of every real image at its own size (as slic-um makes them), resized to the training size."""
        procs = current_processes()
        if not procs.is_main:
            procs.barrier()  # the main process computes and caches them; the others read the cache
        try:
            return self._compute_unsupervised_masks(dataset, stems, workdir, write=procs.is_main)
        finally:
            if procs.is_main:
                procs.barrier()

    def _compute_unsupervised_masks(self, dataset: Dataset, stems: list[str], workdir: Path,
                                    write: bool) -> torch.Tensor:
        """The UMs from the cache in ``workdir`` when it matches, else computed (and cached if ``write``)."""
        cfg = self.config
        key = hashlib.sha256(json.dumps([cfg.um_settings(), cfg.size, stems]).encode()).hexdigest()[:16]
        cache = workdir / UM_CACHE
        if cache.is_file():
            with np.load(cache) as saved:
                if str(saved["key"]) == key:
                    return torch.from_numpy(saved["ums"].astype(np.float32))
        out = []
        with self.context.progress.task("unsupervised masks", total=len(dataset)) as task:
            for i in range(len(dataset)):
                um = resize_um(unsupervised_mask(dataset[i].image, **cfg.um_settings()), (cfg.size, cfg.size))
                out.append(um[None] if um.ndim == 2 else np.moveaxis(um, -1, 0))
                task.advance()
        channels = max(u.shape[0] for u in out)
        levels = np.stack([np.repeat(u, channels // u.shape[0], axis=0) for u in out]).astype(np.float32)
        if write:
            buf = io.BytesIO()  # UMs are piecewise constant: they compress to almost nothing
            np.savez_compressed(buf, ums=levels, key=np.array(key), stems=np.array(stems))
            write_bytes_atomic(cache, buf.getvalue())
        return torch.from_numpy(levels)

    def _arch(self, data: TrainingData) -> NetArch:
        cfg = self.config
        return NetArch(in_channels=data.conditions.shape[1], image_channels=data.images.shape[1],
                       classes=len(data.values), ngf=cfg.ngf, down=cfg.down, residual=cfg.residual, ndf=cfg.ndf,
                       d_layers=cfg.d_layers, norm=cfg.norm)

    def _networks(self, arch: NetArch, device: str, acc: Any | None = None) -> dict[str, Any]:
        """Generator, discriminators and their optimisers (prepared by ``acc``, made from the context if None).

        Every process seeds the same initial weights. The networks stay unwrapped (see
        ``parallel.py`` for why DDP does not suit this GAN); ``nets["acc"]`` is the accelerator.
        """
        cfg = self.config
        acc = make_accelerator(self.context) if acc is None else acc
        torch.manual_seed(cfg.seed)
        nets: dict[str, Any] = {
            "g": MultiTaskGenerator(arch).to(device),
            "d_image": PatchDiscriminator(arch.in_channels + arch.image_channels, arch.ndf, arch.d_layers).to(device),
            "d_seg": PatchDiscriminator(arch.in_channels + arch.classes, arch.ndf, arch.d_layers).to(device),
        }
        nets["opt_g"] = torch.optim.Adam(nets["g"].parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        d_params = [*nets["d_image"].parameters(), *nets["d_seg"].parameters()]
        nets["opt_d"] = torch.optim.Adam(d_params, lr=cfg.lr, betas=(0.5, 0.999))
        # prepared: steps skipped until a step's last micro-batch, fp16 gradients unscaled; we place tensors
        nets["opt_g"], nets["opt_d"] = acc.prepare(nets["opt_g"], nets["opt_d"], device_placement=[False, False])
        nets["acc"] = acc
        return nets

    def _resume(self, workdir: Path, arch: NetArch, nets: dict[str, Any], data: TrainingData) -> dict[str, Any]:
        path = workdir / STATE
        if not path.is_file():
            return {"step": 0, "pseudo": None}
        saved = load_torch(path)
        if saved.get("arch") != asdict(arch) or saved.get("condition") != self.config.condition:
            raise CheckpointError(f"{workdir}: trained with {saved.get('arch')} (condition "
                                  f"{saved.get('condition')!r}); resume with the same options or another --out")
        if saved.get("um") != self.config.um_settings() or saved.get("hidden", data.hidden) != data.hidden:
            raise CheckpointError(f"{workdir}: trained with other unsupervised or hidden masks (um_*, "
                                  "labelled_fraction, seed or data differ); resume with the same options or another "
                                  "--out")
        for key in ("g", "d_image", "d_seg", "opt_g", "opt_d"):
            nets[key].load_state_dict(saved[key])
        self.context.log(f"um2i: resuming at step {saved['step']}")
        return {"step": saved["step"], "pseudo": saved.get("pseudo")}

    def _save(self, workdir: Path, nets: dict[str, Any], state: dict[str, Any], arch: NetArch,
              data: TrainingData, extra: dict[str, Any]) -> None:
        unwrap = nets["acc"].unwrap_model
        save_torch(workdir / STATE, {
            "step": state["step"], "arch": asdict(arch), "condition": self.config.condition,
            "values": data.values, "hidden": data.hidden, "size": self.config.size, "um": self.config.um_settings(),
            "pseudo": state["pseudo"], **{k: unwrap(nets[k]).state_dict() for k in ("g", "d_image", "d_seg")},
            **{k: nets[k].state_dict() for k in ("opt_g", "opt_d")}})
        write_checkpoint_card(workdir, self, state["step"], **extra)

    def _card_extra(self, data: TrainingData, kind: str) -> dict[str, Any]:
        extra: dict[str, Any] = {"condition": self.config.condition, "size": self.config.size,
                                 "labelled": len(data.labelled), "unlabelled": len(data.unlabelled),
                                 "hidden_masks": data.hidden, "label_values": data.values, "perceptual": kind}
        if self.config.condition == "um":
            extra["um"] = self.config.um_settings()
        return extra

    def _batch(self, data: TrainingData, state: dict[str, Any], rng: torch.Generator) -> dict[str, torch.Tensor]:
        """Conditions, images, targets and per-pixel weights of one batch (flipped at random, jointly)."""
        cfg, device = self.config, self.context.device
        pseudo = state["pseudo"]
        pool = list(data.labelled) + (list(pseudo["indices"]) if pseudo is not None else [])
        pick = torch.tensor(pool)[torch.randint(len(pool), (min(cfg.batch_size, len(pool)),), generator=rng)]
        cond = data.conditions[pick]
        image = data.images[pick].float() / 127.5 - 1
        target = data.targets[pick].clone()
        weight = (target >= 0).float()
        labelled_set = set(data.labelled)
        labelled = torch.tensor([i in labelled_set for i in pick.tolist()])
        if pseudo is not None:
            where = {int(i): k for k, i in enumerate(pseudo["indices"])}
            for row, idx in enumerate(pick.tolist()):
                if idx in where:
                    target[row] = pseudo["labels"][where[idx]].long()
                    weight[row] = pseudo["trusted"][where[idx]].float()
        target = target.clamp(min=0)
        flip = torch.rand(len(pick), generator=rng) < 0.5
        cond = torch.where(flip[:, None, None, None], cond.flip(-1), cond)
        image = torch.where(flip[:, None, None, None], image.flip(-1), image)
        target = torch.where(flip[:, None, None], target.flip(-1), target)
        weight = torch.where(flip[:, None, None], weight.flip(-1), weight)
        return {"cond": cond.to(device), "image": image.to(device), "target": target.to(device),
                "weight": weight.to(device), "labelled": labelled.to(device)}

    def _step(self, nets: dict[str, Any], perceptual: VGGPerceptual | None, data: TrainingData,
              state: dict[str, Any], kind: str) -> dict[str, Any]:
        """One training step: one update of both discriminators, then one of the generator.

        Each update takes this process's ``--grad-accum`` micro-batches, micro-batch ``m`` drawn from
        ``step_generator(seed, step, m * world + rank)``; their gradients add up and are averaged
        over the processes before the update (``parallel.py``). Returns the losses averaged over
        the micro-batches and the processes.
        """
        cfg, acc = self.config, nets["acc"]
        step, micros = state["step"], acc.gradient_accumulation_steps
        # per step, micro-batch and process: processes draw different batches, a resumed run the same ones
        batches = [self._batch(data, state, step_generator(cfg.seed, step, m * acc.num_processes + acc.process_index))
                   for m in range(micros)]
        g, d_image, d_seg = nets["g"], nets["d_image"], nets["d_seg"]
        g.train()
        seg_on = cfg.condition == "um"
        zero = torch.zeros((), device=batches[0]["cond"].device)
        # one micro-batch keeps its generator forward for the generator's update; several run it
        # again there, so memory stays that of one micro-batch
        keep = micros == 1
        # batch-norm statistics: each micro-batch's from the step's start, then their mean (as over processes)
        stats = None if keep else MicroStatistics([g])
        rows: list[dict[str, float]] = []
        for m, b in enumerate(batches):
            cond, real, target, lab = b["cond"], b["image"], b["target"], b["labelled"]
            with accumulate(acc, m):
                with torch.set_grad_enabled(keep), acc.autocast():
                    fake, logits = g(cond)
                with acc.autocast():
                    d_img_loss = 0.5 * (lsgan_loss(d_image(torch.cat([cond, real], 1))[0].float(), True)
                                        + lsgan_loss(d_image(torch.cat([cond, fake.detach()], 1))[0].float(), False))
                    d_seg_loss = zero
                    if seg_on and bool(lab.any()):
                        onehot = _one_hot(target[lab], logits.shape[1])
                        prob = logits[lab].float().softmax(1).detach()
                        d_seg_loss = 0.5 * (lsgan_loss(d_seg(torch.cat([cond[lab], onehot], 1))[0].float(), True)
                                            + lsgan_loss(d_seg(torch.cat([cond[lab], prob], 1))[0].float(), False))
                acc.backward(d_img_loss + d_seg_loss)
                optimiser_step(acc, nets["opt_d"], [d_image, d_seg])
            if keep:
                b["fake"], b["logits"] = fake, logits
            trusted = float(b["weight"][~lab].mean()) if bool((~lab).any()) else 1.0
            rows.append({"d_image": d_img_loss.item(), "d_seg": d_seg_loss.item(), "trusted": trusted})

        for m, b in enumerate(batches):
            cond, real, target, lab = b["cond"], b["image"], b["target"], b["labelled"]
            with accumulate(acc, m):
                # the discriminators take no gradient from the generator's loss
                with frozen([d_image, d_seg]), acc.autocast():
                    if stats is None:
                        fake, logits = b.pop("fake"), b.pop("logits")
                    else:
                        stats.restore()
                        fake, logits = g(cond)
                        stats.collect()
                    score, fake_feats = d_image(torch.cat([cond, fake], 1))
                    g_adv = lsgan_loss(score.float(), True)
                    if perceptual is not None:
                        g_perc = perceptual(fake, real).float()
                    else:
                        with torch.no_grad():
                            real_feats = d_image(torch.cat([cond, real], 1))[1]
                        g_perc = feature_matching_loss(fake_feats, real_feats).float()
                    g_l1 = F.l1_loss(fake.float(), real) if cfg.lambda_l1 > 0 else zero
                    g_seg = g_seg_adv = zero
                    if seg_on:
                        g_seg = masked_segmentation_loss(logits.float(), target, b["weight"])
                        if bool(lab.any()):
                            g_seg_adv = lsgan_loss(d_seg(torch.cat([cond[lab], logits[lab].float().softmax(1)], 1))[0]
                                                   .float(), True)
                    total = (g_adv + cfg.lambda_perceptual * g_perc + cfg.lambda_l1 * g_l1 + cfg.lambda_seg * g_seg
                             + cfg.lambda_seg_adv * g_seg_adv)
                acc.backward(total)
                optimiser_step(acc, nets["opt_g"], [g])
            rows[m].update(g_adv=g_adv.item(), g_perceptual=g_perc.item(), g_l1=g_l1.item(), g_seg=g_seg.item(),
                           g_seg_adv=g_seg_adv.item())
        if stats is not None:
            stats.finish()
        average_buffers(acc, [g, d_image, d_seg])  # batch-norm statistics of every process's batches
        stage = 1 if step < cfg.supervised_steps or not seg_on else 2  # M2I has no semi-supervised stage
        means = {key: sum(row[key] for row in rows) / micros for key in rows[0]}
        return mean_losses(acc, {"stage": stage, "perceptual": kind, **means})

    @torch.no_grad()
    def _pseudo_labels(self, nets: dict[str, Any], data: TrainingData) -> dict[str, Any]:
        """Segment the unlabelled images with the stage-1 generator; keep labels and where they are confident."""
        cfg, device = self.config, self.context.device
        g, d_seg = nets["g"], nets["d_seg"]
        g.eval()
        labels, trusted = [], []
        for start in range(0, len(data.unlabelled), 16):
            idx = data.unlabelled[start:start + 16]
            cond = data.conditions[idx].to(device)
            prob = g(cond)[1].softmax(1)
            conf = confidence_map(prob, cond, d_seg if cfg.confidence == "discriminator" else None)
            labels.append(prob.argmax(1).to(torch.uint8).cpu())
            trusted.append((conf >= cfg.confidence_threshold).cpu())
        g.train()
        if not labels:
            self.context.log("um2i: no unlabelled images; stage 2 continues on the labelled ones")
            return {"indices": [], "labels": torch.zeros(0), "trusted": torch.zeros(0)}
        trusted_t = torch.cat(trusted)
        self.context.log(f"um2i: pseudo-labelled {len(data.unlabelled)} images; "
                         f"{float(trusted_t.float().mean()):.0%} of their pixels trusted")
        return {"indices": list(data.unlabelled), "labels": torch.cat(labels), "trusted": trusted_t}

    def _fit_gan(self, data: TrainingData, workdir: Path, acc: Any) -> dict[str, Any]:
        """Train the UM GAN (V2UM) on the UMs, data-parallel through ``acc``; its variety report (main process)."""
        cfg, device = self.config, self.context.device
        main = acc.is_main_process
        arch = StyleArch(size=cfg.size, channels=data.ums.shape[1], latent=cfg.vum_latent,
                         mapping_layers=cfg.vum_mapping_layers, base_channels=cfg.vum_channels,
                         max_channels=cfg.vum_max_channels)
        settings = GanTraining(steps=cfg.vum_steps, batch_size=cfg.vum_batch_size, lr=cfg.vum_lr, r1=cfg.vum_r1,
                               progressive=cfg.vum_progressive, augment=cfg.vum_augment, seed=cfg.seed)
        path = workdir / GAN_STATE
        if path.is_file():
            saved = load_torch(path)
            if saved.get("arch") != asdict(arch):
                raise CheckpointError(f"{workdir}: UM GAN trained with {saved.get('arch')}; resume with the same "
                                      "vum_ options or another --out")
            state = load_gan_state(saved["training"], settings, device)
        else:
            state = new_gan_state(arch, settings, device)
        state["opt_g"], state["opt_d"] = acc.prepare(state["opt_g"], state["opt_d"], device_placement=[False, False])
        reals = (data.ums * 2 - 1).to(device)
        if main:
            _trim_log(workdir / GAN_LOG, GAN_FIELDS, state["step"])
        acc.wait_for_everyone()  # everyone has read the state before the main process writes it again

        def save() -> None:
            if main:
                save_torch(path, {"arch": asdict(arch), "gap": cfg.um_gap, "training": gan_state_dict(state),
                                  "g_ema": acc.unwrap_model(state["g_ema"]).state_dict()})
            acc.wait_for_everyone()

        with self.context.progress.task("training UM GAN", total=cfg.vum_steps) as task:
            task.advance(min(state["step"], cfg.vum_steps))
            while state["step"] < cfg.vum_steps:
                losses = mean_losses(acc, gan_step(state, reals, settings, acc))
                if main:
                    _append_log(workdir / GAN_LOG, GAN_FIELDS, {"step": state["step"], **losses})
                task.advance()
                task.show(d=f"{losses['d']:.3f}", g=f"{losses['g']:.3f}", px=4 * 2 ** losses["level"])
                if state["step"] % cfg.checkpoint_every == 0:
                    save()
        save()
        if not main:
            return {}  # the variety report goes into the card, which the main process writes
        n = min(64, max(8, len(data.ums)))
        generated = (sample_masks(state["g_ema"], list(range(n)), psi=1.0, device=device).cpu() + 1) / 2
        generated = torch.from_numpy(snap_to_levels(generated.numpy(), cfg.um_gap))
        report = {"step": state["step"], "truncation_psi": 1.0, **diversity_report(generated, data.ums[:n])}
        write_json_atomic(workdir / GAN_REPORT, report)
        self.context.log(f"um2i: UM GAN variety: MS-SSIM {report['ms_ssim_generated']} generated vs "
                         f"{report['ms_ssim_real']} real (lower = more varied); pixel std ratio {report['std_ratio']}")
        return report

    # ---------------------------------------------------------------- inference
    def networks(self) -> list[Any]:
        """The multi-task generator, once loaded."""
        g = getattr(self, "_g", None)
        return [] if g is None else [g]

    def load(self, checkpoint: Path) -> None:
        checkpoint = Path(checkpoint)
        read_checkpoint_card(checkpoint, expected=self.name)
        saved = load_torch(checkpoint / STATE)
        if saved["condition"] != self.config.condition:
            raise CheckpointError(f"{checkpoint}: trained with condition={saved['condition']!r}; set "
                                  f"condition = {saved['condition']!r} in [generator]")
        self._arch_loaded = NetArch(**saved["arch"])
        self._g = MultiTaskGenerator(self._arch_loaded)
        self._g.load_state_dict(saved["g"])
        self._g.to(self.context.device).eval()
        self._values = np.asarray(saved["values"], dtype=np.uint8)
        self._size = int(saved["size"])
        self._gap = saved["um"]["gap"]

    @torch.no_grad()
    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        if not hasattr(self, "_g"):
            raise PipelineError(f"{self.name}: load(checkpoint) before generate()")
        if not conditions:
            return []
        out = []
        for c in conditions:
            # one at a time: a batched convolution may round differently, and a pair must not depend on its batch
            image, logits = self._g(self._input(c)[None].to(self.context.device))
            ref = c.image if self.config.condition == "um" else c.mask
            out.append(self._sample(image[0], logits[0], ref.shape[:2], c))
        return out

    def _input(self, c: Condition) -> torch.Tensor:
        size = (self._size, self._size)
        if self.config.condition == "mask":
            if c.mask is None:
                raise PipelineError(f"{self.name}: condition='mask' needs a real mask in each condition; "
                                    "use mask source 'real-masks'")
            lut = np.zeros(256, dtype=np.int64)
            lut[self._values] = np.arange(len(self._values))
            idx = mask_batch([lut[c.mask]], self._size)
            return _one_hot(idx, len(self._values))[0]
        if c.image is None:
            raise PipelineError(f"{self.name}: needs an unsupervised mask in each condition's image; "
                                "use mask source 'slic-um' or 'um-generator'")
        gap = c.meta.get("gap")
        if gap is not None and gap != self._gap and not self._warned_gap:
            self._warned_gap = True
            self.context.log(f"um2i: the mask source's gap {gap} differs from training's {self._gap}")
        um = resize_um(np.asarray(c.image, dtype=np.float32), size)
        um_t = torch.from_numpy(um[None] if um.ndim == 2 else np.moveaxis(um, -1, 0).copy())
        channels = self._arch_loaded.in_channels
        if um_t.shape[0] != channels:  # a grey UM for a colour model or the other way round
            um_t = um_t.mean(0, keepdim=True).expand(channels, -1, -1)
        return um_t * 2 - 1

    def _sample(self, image: torch.Tensor, logits: torch.Tensor, size: tuple[int, int], c: Condition) -> Sample:
        if tuple(image.shape[-2:]) != size:
            shrink = min(image.shape[-2:]) > min(size)
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]
            logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        arr = ((image.clamp(-1, 1) + 1) / 2).cpu().numpy().astype(np.float32)
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
        prob = logits.softmax(0).cpu().numpy()
        # M2I: the pair's mask is its condition
        mask = np.asarray(c.mask) if self.config.condition == "mask" else self._values[prob.argmax(0)]
        soft = (1.0 - prob[0]).astype(np.float32)
        return Sample(image=np.ascontiguousarray(arr), mask=mask.astype(np.uint8),
                      soft_mask=np.clip(soft, 0, 1), meta={"um2i": self.config.condition})


def confidence_map(prob: torch.Tensor, cond: torch.Tensor, d_seg: PatchDiscriminator | None) -> torch.Tensor:
    """Per-pixel confidence of a segmentation: its top probability, or the discriminator's upsampled score."""
    if d_seg is None:
        return prob.max(dim=1).values
    score = d_seg(torch.cat([cond, prob], 1))[0]
    return F.interpolate(score, size=prob.shape[-2:], mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)


def perceptual_kind(perceptual: VGGPerceptual | None) -> str:
    """The perceptual loss's name in logs: the VGG variant, or discriminator feature matching."""
    return "feature-matching" if perceptual is None else perceptual.arch


def _one_hot(index: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(index.long(), classes).permute(0, 3, 1, 2).float()


def _append_log(path: Path, fields: Sequence[str], row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in row.items()})


def _trim_log(path: Path, fields: Sequence[str], step: int) -> None:
    """Drop rows past the resumed step (logged after the last checkpoint of a killed run)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode())

