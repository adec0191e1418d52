"""Training: the small base first when there are no weights, then the ControlNet on (mask -> image, prompt)
pairs with the base frozen; resumable checkpoints, a loss log and validation grids (the paper's Fig. 2)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth_core import (
    Context,
    Dataset,
    DatasetError,
    Sample,
    read_image,
    write_checkpoint_card,
    write_png_image,
)
from medsynth_plugins.common.images import image_batch
from medsynth_plugins.common.sd_base import (
    SMALL,
    LossLog,
    SDBase,
    SmallBaseRecipe,
    StepCheckpoints,
    check_resumable,
    check_size,
    diffusion_loss,
    frozen_dtype,
    load_scaler,
    load_sd_base,
    mask_prompt,
    move,
    quiet_hub,
    train_small_base,
    train_step,
    training_accelerator,
)

from .conditions import condition_batch, grid, grid_tiles
from .sampling import ControlNetSampler, SamplingOptions

# options that fix the networks: a resumed run must keep them
SMALL_RESOLUTION = 64


def embedding_channels(vae_factor: int) -> tuple[int, ...]:
    """Channels of the ControlNet's condition encoder: one stride-2 stage per halving the VAE does.

    SD's factor 8 gives diffusers' default (16, 32, 96, 256); a pixel-space base (factor 1) keeps
    the condition at full resolution.
    """
    halvings = int(np.log2(vae_factor))
    return (16, 32, 96, 256, 256, 256)[:halvings + 1]


class ControlNetTrainer:
    """Optimises a ControlNet on top of a frozen base with the denoising loss, one step at a time.

    The ControlNet and its optimiser go through ``accelerator`` (one process, or one of a data-parallel
    group); the frozen base is only moved to its device. Step ``k`` draws its batches with
    :func:`~medsynth_core.training.step_generator` from ``seed``, ``k`` and the process.
    """

    def __init__(self, base: SDBase, controlnet: Any, samples: Sequence[Sample], prompts: Sequence[str], size: int, *,
                 lr: float, batch_size: int, empty_prompt_rate: float, seed: int = 0, accelerator: Any = None,
                 gradient_checkpointing: bool = False) -> None:
        if len(samples) != len(prompts):
            raise ValueError("one prompt per sample")
        self.base, self.controlnet, self.samples, self.prompts, self.size = base, controlnet, samples, prompts, size
        self.batch_size, self.empty_prompt_rate, self.seed = batch_size, empty_prompt_rate, seed
        self.accelerator = acc = accelerator or training_accelerator(Context(), "no")
        self.device, self.frozen_dtype = acc.device, frozen_dtype(acc)
        base.freeze().to(self.device, self.frozen_dtype)
        move(controlnet, self.device, torch.float32).train().requires_grad_(True)  # fp32 master weights
        if gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
            base.unet.enable_gradient_checkpointing()  # the loss backpropagates through the frozen decoder
        optimiser = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=1e-2)
        self.model, self.optimiser = acc.prepare(controlnet, optimiser)
        self.steps_done = 0

    def step(self) -> float:
        """One optimisation step (``--grad-accum`` micro-batches on every process); returns the mean loss."""
        loss = train_step(self.accelerator, [self.model], self.optimiser, self.seed, self.steps_done, self._loss)
        self.steps_done += 1
        return loss

    def _loss(self, gen: torch.Generator) -> torch.Tensor:
        """The denoising loss of one random batch drawn with ``gen``."""
        pick = torch.randint(len(self.samples), (min(self.batch_size, len(self.samples)),), generator=gen).tolist()
        drop = (torch.rand(len(pick), generator=gen) < self.empty_prompt_rate).tolist()
        batch = [self.samples[i] for i in pick]
        prompts = ["" if d else self.prompts[i] for i, d in zip(pick, drop)]
        channels = self.base.image_channels
        images = image_batch([s.image for s in batch], self.size, channels).to(self.device) * 2 - 1
        conditions = condition_batch([s.mask for s in batch], self.size).to(self.device)
        with torch.no_grad():
            clean = self.base.to_model_space(images, gen).float()
            context = self.base.encode_prompts(prompts, self.device)

        def predict(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            down, mid = self.model(noisy, t, encoder_hidden_states=context, controlnet_cond=conditions,
                                   return_dict=False)
            return self.base.unet(noisy.to(self.frozen_dtype), t, context, down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid).sample

        return diffusion_loss(self.base.scheduler, predict, clean, gen)

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, gradient scaler and step count, for resuming."""
        scaler = self.accelerator.scaler
        return {"optimiser": self.optimiser.state_dict(), "step": self.steps_done,
                "scaler": scaler.state_dict() if scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.optimiser.load_state_dict(state["optimiser"])
        self.steps_done = int(state.get("step", self.steps_done))
        load_scaler(self.accelerator, state)


@quiet_hub()
def train(component: Any, dataset: Dataset, workdir: Path) -> Path:
    """``ControlNetGenerator.fit``: train (or resume) into ``workdir``; return it.

    Runs on every process of a ``medsynth train --processes N`` group: each draws its own batches,
    the gradients are averaged, and only the main process writes checkpoints, grids and logs.
    """
    from diffusers import ControlNetModel

    cfg, ctx = component.config, component.context
    samples = [s for s in dataset if s.mask is not None]
    if not samples:
        raise DatasetError(f"{dataset.name}: no image has a mask; ControlNet learns from (mask, image) pairs")
    labels = dict(dataset.labels)
    channels = 3 if any(s.image.ndim == 3 for s in dataset) else 1
    acc = training_accelerator(ctx, cfg.mixed_precision, seed=cfg.seed)
    main, dtype = acc.is_main_process, frozen_dtype(acc)
    base: SDBase | None = None
    if cfg.base == SMALL:
        recipe = SmallBaseRecipe(
            resolution=cfg.resolution or SMALL_RESOLUTION, channels=channels, latent=cfg.small_base == "latent",
            widths=cfg.base_widths, steps=cfg.base_steps, vae_steps=cfg.vae_steps, batch_size=cfg.batch_size,
            lr=cfg.base_lr, template=cfg.prompt_template, words=tuple(labels), checkpoint_every=cfg.checkpoint_every,
            seed=cfg.seed)
        base_ref = "base"
    else:  # load (and check) the base before anything is written
        local = Path(cfg.base).expanduser()
        base_ref = str(local.resolve()) if local.exists() else cfg.base
        base = load_sd_base(base_ref, device=acc.device, dtype=dtype)
        check_size(base, cfg.resolution or base.resolution)
    workdir.mkdir(parents=True, exist_ok=True)
    check_resumable(workdir, cfg, write=main)
    if base is None:
        folder = train_small_base(dataset, workdir, recipe, progress=ctx.progress, log=ctx.log, labels=labels,
                                  accelerator=acc)
        base = load_sd_base(folder, device=acc.device, dtype=dtype)
    size = cfg.resolution or base.resolution
    check_size(base, size)

    ckpts = StepCheckpoints(workdir / "checkpoints")
    latest = ckpts.latest()
    if latest is not None:
        controlnet = ControlNetModel.from_pretrained(latest / "controlnet")
    else:
        torch.manual_seed(cfg.seed)
        # the ControlNet starts as a copy of the base's encoder, joined to it by zero convolutions
        controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=embedding_channels(
            base.vae_factor))
    prompts = [mask_prompt(s.mask, labels, cfg.prompt_template) for s in samples]
    trainer = ControlNetTrainer(base, controlnet, samples, prompts, size, lr=cfg.lr, batch_size=cfg.batch_size,
                                empty_prompt_rate=cfg.empty_prompt_rate, seed=cfg.seed, accelerator=acc,
                                gradient_checkpointing=cfg.gradient_checkpointing)
    step = 0
    if latest is not None:
        trainer.load_state_dict(torch.load(latest / "state.pt", map_location="cpu", weights_only=False))
        step = trainer.steps_done = StepCheckpoints.step_of(latest)
        ctx.log(f"resuming the ControlNet at step {step} from {latest}")
    acc.wait_for_everyone()  # every process has read the checkpoint before the main one writes the next
    validation = _Validation(workdir / "validation", samples, labels, cfg, size, channels, acc.autocast)
    extra = {"base": base_ref, "resolution": size, "channels": channels, "labels": labels}
    losses = LossLog(workdir / "loss.csv")

    def save() -> None:
        """Write a checkpoint and the card (main process only)."""
        def write(folder: Path) -> None:
            controlnet.save_pretrained(folder / "controlnet")
            torch.save({**trainer.state_dict(), "step": step}, folder / "state.pt")

        folder = ckpts.save(step, write)
        write_checkpoint_card(workdir, component, step, latest=f"checkpoints/{folder.name}", **extra)
        losses.flush()

    with ctx.progress.task("training the ControlNet", total=cfg.steps) as task:
        task.advance(min(step, cfg.steps))
        if step == 0 and cfg.validate_every and main:
            validation.run(base, controlnet, 0)  # zero convolutions: step 0 shows the base alone
        while step < cfg.steps:
            loss = trainer.step()
            step += 1
            task.advance()
            task.show(loss=f"{loss:.4f}")
            if main:
                losses.add("controlnet", step, loss)
                if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.steps):
                    ctx.log(f"validation grid: {validation.run(base, controlnet, step)}")
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    save()
            acc.wait_for_everyone()
    card = workdir / "checkpoint.json"
    if main and (not card.is_file() or json.loads(card.read_text()).get("step") != step):
        save()  # a kill between a checkpoint and its card, or a resume with nothing left to train
    acc.wait_for_everyone()
    acc.free_memory()
    return workdir


class _Validation:
    """Validation grids: one row per validation mask, condition | real image | generated image.

    ``progress.png`` gathers the generated image of every validation so far beside its condition,
    as the paper's Fig. 2 shows training progress.
    """

    def __init__(self, folder: Path, samples: Sequence[Sample], labels: dict[str, int], cfg: Any, size: int,
                 channels: int, autocast) -> None:
        picks = np.linspace(0, len(samples) - 1, num=min(cfg.validation_masks, len(samples))).round().astype(int)
        self.folder, self.size, self.autocast = folder, size, autocast
        self.masks = [samples[i].mask for i in picks]
        self.real = image_batch([samples[i].image for i in picks], size, 3).permute(0, 2, 3, 1).numpy()
        self.prompts = [mask_prompt(m, labels, cfg.prompt_template) for m in self.masks]
        self.seeds = [cfg.seed * 1000 + k for k in range(len(picks))]  # the same noise at every step
        self.options = SamplingOptions(cfg.scheduler, min(cfg.sampling_steps, 20), cfg.guidance_scale,
                                       cfg.conditioning_scale)
        self.channels = channels

    def run(self, base: SDBase, controlnet: Any, step: int) -> Path:
        conditions = condition_batch(self.masks, self.size)
        was_training = controlnet.training
        with self.autocast():
            images = ControlNetSampler(base, controlnet, dtype=controlnet.dtype).sample(
                conditions, self.prompts, [""] * len(self.masks), self.seeds, self.size, self.options)
        controlnet.train(was_training)
        generated = images.float().cpu().permute(0, 2, 3, 1).numpy()
        if self.channels == 1:
            generated = generated.mean(axis=3)
        cond = conditions.permute(0, 2, 3, 1).numpy()
        path = self.folder / f"step-{step:06d}.png"
        write_png_image(path, grid([[c, r, g] for c, r, g in zip(cond, self.real, generated)]))
        self._progress(cond)
        return path

    def _progress(self, cond: np.ndarray) -> None:
        steps = sorted(self.folder.glob("step-*.png"))
        columns = [grid_tiles(read_image(p), self.size, 2) for p in steps]
        rows = [[c, *(col[k] for col in columns if k < len(col))] for k, c in enumerate(cond)]
        write_png_image(self.folder / "progress.png", grid(rows))
