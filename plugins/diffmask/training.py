"""``medsynth train sd-attention``: the small base (or a given SD folder), then optional token grounding.

Grounding fine-tunes the base's UNet and text encoder with the denoising loss plus a token-level grounding
loss on the real masks (TokenCompose, Wang et al., CVPR 2024): for every class word of a training prompt,
the pixel loss is the binary cross-entropy between the word's cross-attention share at each cell and the
class's share of that cell, and the token loss is ``(1 - attention inside the class / all its attention)^2``.
Stable Diffusion learned to localise words from billions of captioned images; a small base trained on a
few dozen images with one prompt does not, and grounding gives it that ability from the masks the user
already has. With a given SD folder it is off by default (the paper uses SD as is).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medsynth_core import Dataset, DatasetError, Sample, write_checkpoint_card
from medsynth_plugins.common.images import image_batch, mask_batch
from medsynth_plugins.common.sd_base import (
    SMALL,
    LossLog,
    SmallBaseRecipe,
    StepCheckpoints,
    check_resumable,
    check_size,
    diffusion_loss,
    frozen_dtype,
    load_scaler,
    load_sd_base,
    mask_prompt,
    quiet_hub,
    save_sd_base,
    train_small_base,
    train_step,
    training_accelerator,
)

from .attention import grid_size, record_attention, token_positions

SMALL_RESOLUTION = 64
PROMPT_DROPOUT = 0.1  # as the small base: keeps the unconditional prediction for guidance


class GroundingLoss:
    """Reads the class words' cross-attention during one UNet forward and scores it against the masks.

    ``selection`` (batch x prompt tokens x words) sums the tokens of each word; ``targets`` (batch x words x
    H x W) are the classes' masks in [0, 1] at the UNet input's size; ``valid`` (batch x words) says which
    words are in a row's prompt and its mask.
    """

    def __init__(self, selection: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> None:
        self.selection, self.targets, self.valid = selection, targets, valid
        self.latent_hw = tuple(targets.shape[-2:])
        self.terms: list[torch.Tensor] = []

    def next_step(self) -> None:
        """Part of the store interface; grounding looks at one forward at a time."""

    def wants(self, place: str, hw: tuple[int, int]) -> bool:
        return True

    def map_size(self, tokens: int) -> tuple[int, int]:
        return grid_size(tokens, self.latent_hw)

    def add(self, probs: torch.Tensor, heads: int, hw: tuple[int, int]) -> None:
        n = self.selection.shape[0]
        total = probs.shape[0] // heads
        p = probs.reshape(total, heads, probs.shape[1], probs.shape[2])[total - n:].float().mean(1)
        words = torch.bmm(p, self.selection.to(p))  # n x cells x words: each word's attention share
        words = words.transpose(1, 2).reshape(n, -1, *hw).clamp(1e-6, 1 - 1e-6)
        target = F.adaptive_avg_pool2d(self.targets.to(p), hw)
        valid = self.valid.to(p)
        if not valid.any():
            return
        pixel = F.binary_cross_entropy(words, target, reduction="none").mean(dim=(2, 3))
        inside = (words * target).sum(dim=(2, 3)) / words.sum(dim=(2, 3)).clamp_min(1e-6)
        token = (1 - inside) ** 2
        self.terms.append(((pixel + token) * valid).sum() / valid.sum())

    def value(self) -> torch.Tensor | None:
        """Mean of the terms of every layer read since the last call; None if none was read."""
        if not self.terms:
            return None
        out = torch.stack(self.terms).mean()
        self.terms = []
        return out


def grounding_batch(tokenizer: Any, prompts: Sequence[str], masks: torch.Tensor, labels: dict[str, int],
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selection, targets and validity of :class:`GroundingLoss` for prompts and label maps (N x H x W)."""
    words = [(name.replace("_", " "), value) for name, value in sorted(labels.items(), key=lambda kv: kv[1])
             if value != 0]
    n, length = len(prompts), tokenizer.model_max_length
    selection = torch.zeros(n, length, len(words))
    valid = torch.zeros(n, len(words))
    targets = torch.stack([(masks == value).float() for _, value in words], dim=1)
    for row, prompt in enumerate(prompts):
        for col, (word, _) in enumerate(words):
            if not prompt or word not in prompt or not targets[row, col].any():
                continue
            positions = token_positions(tokenizer, prompt, [word])
            selection[row, positions, col] = 1.0
            valid[row, col] = 1.0
    return selection, targets, valid


@quiet_hub()
def train(component: Any, dataset: Dataset, workdir: Path) -> Path:
    """``SDAttentionGenerator.fit``: the base, then grounding, resumable; returns ``workdir``.

    Runs on every process of a ``medsynth train --processes N`` group (data parallel); only the main
    process writes.
    """
    cfg, ctx = component.config, component.context
    samples = [s for s in dataset if s.mask is not None]
    if not samples:
        raise DatasetError(f"{dataset.name}: no image has a mask; the prompts name the classes of the masks")
    acc = training_accelerator(ctx, cfg.mixed_precision, seed=cfg.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    check_resumable(workdir, cfg, write=acc.is_main_process)
    labels = dict(dataset.labels)
    channels = 3 if any(s.image.ndim == 3 for s in samples) else 1
    dtype = frozen_dtype(acc)
    if cfg.base == SMALL:
        recipe = SmallBaseRecipe(
            resolution=cfg.resolution or SMALL_RESOLUTION, channels=channels, latent=cfg.small_base == "latent",
            widths=cfg.base_widths, steps=cfg.base_steps, vae_steps=cfg.vae_steps, batch_size=cfg.batch_size,
            lr=cfg.base_lr, template=cfg.prompt_template, words=tuple(labels), checkpoint_every=cfg.checkpoint_every,
            seed=cfg.seed)
        source: str | Path = train_small_base(dataset, workdir, recipe, progress=ctx.progress, log=ctx.log,
                                              labels=labels, accelerator=acc)
        base_ref = "base"
    else:
        local = Path(cfg.base).expanduser()
        source = base_ref = str(local.resolve()) if local.exists() else cfg.base
    steps = cfg.grounding()
    trained = cfg.base_steps if cfg.base == SMALL else 0
    if steps:
        trained += _ground(component, acc, samples, labels, source, workdir, steps)
        base_ref = "grounded"
    base = load_sd_base(workdir / base_ref if base_ref in ("base", "grounded") else base_ref, device="cpu",
                        dtype=dtype)
    size = cfg.resolution or base.resolution
    check_size(base, size)
    if acc.is_main_process:
        write_checkpoint_card(workdir, component, trained, base=base_ref, resolution=size, channels=channels,
                              labels=labels, template=cfg.prompt_template)
    acc.wait_for_everyone()
    return workdir


def _ground(component: Any, acc: Any, samples: Sequence[Sample], labels: dict[str, int], source: str | Path,
            workdir: Path, steps: int) -> int:
    """Fine-tune the base with denoising + grounding losses into ``workdir/grounded``; returns the steps done.

    The UNet and text encoder go through ``acc`` (data parallel over its processes); batches come
    from :func:`train_step`'s per-step generators, seeded with ``seed + 1``.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg, ctx = component.config, component.context
    out = workdir / "grounded"
    if (out / "model_index.json").is_file():
        return steps
    device = acc.device
    base = load_sd_base(source, device="cpu")
    ckpts = StepCheckpoints(workdir / "grounding-train")
    step, state = 0, None
    latest = ckpts.latest()
    if latest is not None:
        state = torch.load(latest / "state.pt", map_location="cpu", weights_only=False)
        base.unet = UNet2DConditionModel.from_pretrained(latest / "unet")
        base.text_encoder = CLIPTextModel.from_pretrained(latest / "text_encoder")
        step = int(state["step"])
        ctx.log(f"resuming grounding at step {step} from {latest}")
    acc.wait_for_everyone()  # every process has read the checkpoint before the main one writes the next
    base.to(device)
    size = cfg.resolution or base.resolution
    trainable = [base.unet, base.text_encoder]
    for module in trainable:
        module.train().requires_grad_(True)
    if base.vae is not None:
        base.vae.requires_grad_(False).eval()
    optimiser = torch.optim.AdamW([p for m in trainable for p in m.parameters()], lr=cfg.base_lr, weight_decay=1e-2)
    if state is not None:
        optimiser.load_state_dict(state["optimiser"])
        load_scaler(acc, state)
    unet, text_encoder, optimiser = acc.prepare(base.unet, base.text_encoder, optimiser)
    images = image_batch([s.image for s in samples], size, base.image_channels)
    cells = size // base.vae_factor
    masks = mask_batch([s.mask for s in samples], cells)
    prompts = [mask_prompt(s.mask, labels, cfg.prompt_template) for s in samples]
    losses = LossLog(workdir / "loss.csv")

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        """Denoising plus weighted grounding loss of one batch drawn with ``gen``."""
        pick = torch.randint(len(samples), (min(cfg.batch_size, len(samples)),), generator=gen)
        drop = (torch.rand(len(pick), generator=gen) < PROMPT_DROPOUT).tolist()
        batch_prompts = ["" if d else prompts[i] for i, d in zip(pick.tolist(), drop)]
        selection, targets, valid = grounding_batch(base.tokenizer, batch_prompts, masks[pick], labels)
        grounding = GroundingLoss(selection.to(device), targets.to(device), valid.to(device))
        with torch.no_grad():
            clean = base.to_model_space(images[pick].to(device) * 2 - 1, gen)
        ids = base.tokenizer(batch_prompts, padding="max_length", max_length=base.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        emb = text_encoder(ids)[0]
        with record_attention(base.unet, grounding):
            denoising = diffusion_loss(base.scheduler, lambda x, t: unet(x, t, emb).sample, clean, gen)
        ground = grounding.value()
        return denoising if ground is None else denoising + cfg.grounding_weight * ground

    def save() -> None:
        """Write a grounding checkpoint (main process only)."""
        def write(folder: Path) -> None:
            base.unet.save_pretrained(folder / "unet")
            base.text_encoder.save_pretrained(folder / "text_encoder")
            scaler = acc.scaler
            torch.save({"step": step, "optimiser": optimiser.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None}, folder / "state.pt")

        ckpts.save(step, write)
        losses.flush()

    with ctx.progress.task("grounding the class words' attention", total=steps) as task:
        task.advance(step)
        while step < steps:
            value = train_step(acc, [unet, text_encoder], optimiser, cfg.seed + 1, step, loss_of)
            step += 1
            task.advance()
            task.show(loss=f"{value:.4f}")
            if acc.is_main_process:
                losses.add("grounding", step, value)
                if step % cfg.checkpoint_every == 0 or step == steps:
                    save()
            acc.wait_for_everyone()
    acc.free_memory()
    base.freeze()
    if acc.is_main_process:
        save_sd_base(base, out)
        shutil.rmtree(workdir / "grounding-train", ignore_errors=True)
    acc.wait_for_everyone()
    return step
