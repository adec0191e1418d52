"""Training through accelerate: the one Accelerator a generator's ``fit`` uses.

``medsynth train`` puts its flags (``--mixed-precision``, ``--grad-accum``) into the context;
``make_accelerator`` turns them into an ``accelerate.Accelerator`` for this process, so a
training loop written once runs on a CPU, one GPU, or many processes started by
``accelerate launch`` (data parallel: each process draws its own batches, gradients are
averaged). The conventions every generator follows:

- a training *step* is one optimiser update; with ``--grad-accum k`` it takes ``k`` batches
  per process, so ``steps`` and checkpoint intervals mean the same whatever ``k`` is;
- the batch of micro-step ``m`` of step ``s`` on process ``r`` comes from
  ``step_generator(seed, s, m * world + r)``, so a resumed run draws what an uninterrupted one
  would, and ``k`` accumulated batches in one process equal ``k`` processes of one batch;
- only the main process writes checkpoints and logs, then every process waits for it.

A loop in accelerate's usual shape::

    acc = make_accelerator(self.context, mixed_precision=cfg.mixed_precision)
    model, optimiser = acc.prepare(model, optimiser)
    for step in range(start, steps):
        for micro in range(acc.gradient_accumulation_steps):
            gen = step_generator(cfg.seed, step, micro * acc.num_processes + acc.process_index)
            with acc.accumulate(model), acc.autocast():
                acc.backward(loss_of(model, draw_batch(gen)))
                optimiser.step()
                optimiser.zero_grad()
        if acc.is_main_process and (step + 1) % save_every == 0:
            save(acc.unwrap_model(model))
        acc.wait_for_everyone()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

PRECISIONS = ("no", "fp16", "bf16")
EXTRAS_KEY = "training"


@dataclass(frozen=True)
class TrainingSettings:
    """Run-wide training flags: mixed precision and gradient accumulation."""

    mixed_precision: str = "auto"  # "auto" lets the generator's own option decide
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.mixed_precision not in (*PRECISIONS, "auto"):
            raise ConfigError(f"mixed precision must be one of auto, {', '.join(PRECISIONS)}; "
                              f"not {self.mixed_precision!r}")
        if self.grad_accum < 1:
            raise ConfigError(f"gradient accumulation must be at least 1 step, not {self.grad_accum}")


def training_settings(context: Any) -> TrainingSettings:
    """The settings ``medsynth train`` left in ``context.extras`` (defaults when none)."""
    return context.extras.get(EXTRAS_KEY, TrainingSettings())


def make_accelerator(context: Any, *, mixed_precision: str = "no", seed: int | None = None) -> Any:
    """An ``accelerate.Accelerator`` for this process, on the context's device.

    ``mixed_precision`` is the generator's own choice, used unless the command set one; fp16 is
    a GPU-only mode and falls back to full precision on a CPU. Parameters a step leaves unused
    (dropped conditions, frozen branches) are allowed under data parallel.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    settings = training_settings(context)
    mode = mixed_precision if settings.mixed_precision == "auto" else settings.mixed_precision
    if mode == "auto":
        mode = "no"
    if mode not in PRECISIONS:
        raise ConfigError(f"mixed precision must be one of {', '.join(PRECISIONS)}; not {mode!r}")
    cpu = not str(context.device).startswith("cuda") or not torch.cuda.is_available()
    if cpu and mode == "fp16":
        mode = "no"
    from .distributed import current_processes

    if current_processes().world == 1:
        AcceleratorState._reset_state()  # a lone process may train several models, each its own way
    accelerator = Accelerator(cpu=cpu, mixed_precision=mode, gradient_accumulation_steps=settings.grad_accum,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if seed is not None:
        set_seed(seed)
    return accelerator


def step_generator(seed: int, step: int, rank: int = 0, device: str = "cpu") -> Any:
    """A torch.Generator for one training step of one process: batches differ between processes
    and a resumed run draws exactly what an uninterrupted one would."""
    from .seeds import sample_seed, torch_generator

    return torch_generator(sample_seed(sample_seed(seed, step), rank), device)
