"""Data-parallel steps of the UM2I and UM GAN trainings through accelerate.

A training step is one update of the discriminators, then one of the generator (the core's
convention, ``medsynth_core/training.py``). With ``--grad-accum k`` each process takes ``k``
micro-batches per step, micro-batch ``m`` drawn from ``step_generator(seed, step, m * world + rank)``:
the discriminators' gradients add up over all of them before their update, then the generator's
before its update, so ``k`` micro-batches in one process train what ``k`` processes of one do.

Each process runs the forwards and backwards on its own copy of the networks, and the
gradients are averaged over the processes right before each optimiser step; the copies start
equal (seeded, or read from the same checkpoint) and therefore stay equal.

Why not ``accelerator.prepare(model)`` (DistributedDataParallel): a GAN step does not fit
DDP's one-forward-one-backward model. The segmentation discriminator runs only when a
process's batch holds labelled images, so DDP's bucket all-reduces would differ between
processes and hang; the discriminators run in both the discriminator and the generator phase;
the UM GAN's lazy R1 takes ``torch.autograd.grad``, which DDP does not reduce; and its EMA
copy and running mean of w are not trained at all. One explicit all-reduce of every gradient
(``average_gradients``) per optimiser step has none of these problems, costs the same amount
of communication, and leaves the modules unwrapped. The optimisers are still prepared, so
accelerate skips their steps until a step's last micro-batch and unscales fp16 gradients.
Float buffers (batch-norm statistics, the mean of w) are averaged too, so every process holds
the same networks and the main process's checkpoint is everyone's.

With ``acc=None`` each helper behaves as plain single-process torch (for unit tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def accumulate(acc: Any | None, micro: int) -> contextlib.AbstractContextManager:
    """``acc.accumulate()`` for micro-batch ``micro`` (0-based) of a step: gradients add up until
    the step's last micro-batch, whose optimiser steps run.

    Accelerate counts micro-batches from its own creation; the counter is set from ``micro``, so
    every step (a resumed run's first included) ends with its optimiser updates.
    """
    if acc is None:
        return contextlib.nullcontext()
    acc.step = micro  # accumulate() adds one, then syncs when it reaches gradient_accumulation_steps
    return acc.accumulate()


def sync_gradients(acc: Any | None) -> bool:
    """Whether this micro-batch is the last of its step (the optimisers step after it)."""
    return acc is None or bool(acc.sync_gradients)


def autocast(acc: Any | None) -> contextlib.AbstractContextManager:
    """The accelerator's mixed-precision context, or nothing."""
    return contextlib.nullcontext() if acc is None else acc.autocast()


def backward(acc: Any | None, loss: torch.Tensor) -> None:
    """``acc.backward`` (divides by the accumulation steps, scales fp16 losses), or ``loss.backward``."""
    if acc is None:
        loss.backward()
    else:
        acc.backward(loss)


def optimiser_step(acc: Any | None, optimiser: Any, modules: Iterable[torch.nn.Module]) -> None:
    """Average the gradients of ``modules`` over the processes, step and clear ``optimiser``.

    Before a step's last micro-batch nothing happens: the prepared optimiser skips its step and
    its ``zero_grad``, so the gradients keep adding up.
    """
    if not sync_gradients(acc):
        return
    average_gradients(acc, [p for m in modules for p in m.parameters() if p.requires_grad])
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)


def average_gradients(acc: Any | None, params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the processes, in one all-reduce.

    A parameter without a gradient on this process (a discriminator its batch did not use)
    counts as zero; one without a gradient on every process keeps none, so the optimiser
    skips it as it would in a single process.
    """
    if acc is None or acc.num_processes == 1 or not params:
        return
    flat = torch.cat([torch.zeros(p.numel(), device=p.device) if p.grad is None else p.grad.detach().flatten().float()
                      for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)])
    flat = acc.reduce(flat, reduction="mean")
    offset, used = 0, flat[-len(params):]
    for k, p in enumerate(params):
        grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        p.grad = grad.clone() if float(used[k]) > 0 else None


def average_buffers(acc: Any | None, modules: Iterable[torch.nn.Module]) -> None:
    """Average the floating-point buffers (running statistics) of ``modules`` over the processes."""
    if acc is None or acc.num_processes == 1:
        return
    buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = acc.reduce(torch.cat([b.detach().flatten().float() for b in buffers]), reduction="mean")
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


class MicroStatistics:
    """Running statistics (batch norm) of ``modules`` over one step's micro-batches, as processes keep them.

    Each micro-batch's forward updates the buffers from their values at the start of the step
    (``restore`` before it, ``collect`` after it); ``finish`` leaves the mean of the float ones.
    ``average_buffers`` does the same over processes, so ``k`` micro-batches in one process leave
    the statistics ``k`` processes leave.
    """

    def __init__(self, modules: Iterable[torch.nn.Module]) -> None:
        self.buffers = [b for m in modules for b in m.buffers()]
        self.start = [b.detach().clone() for b in self.buffers]
        self.sums = [torch.zeros_like(b) if b.is_floating_point() else None for b in self.buffers]
        self.count = 0

    @torch.no_grad()
    def restore(self) -> None:
        for b, start in zip(self.buffers, self.start):
            b.copy_(start)

    @torch.no_grad()
    def collect(self) -> None:
        for b, total in zip(self.buffers, self.sums):
            if total is not None:
                total += b
        self.count += 1

    @torch.no_grad()
    def finish(self) -> None:
        for b, total in zip(self.buffers, self.sums):
            if total is not None and self.count:
                b.copy_(total / self.count)


def mean_losses(acc: Any | None, losses: dict[str, Any]) -> dict[str, Any]:
    """The float entries of ``losses`` averaged over the processes (what the main process logs)."""
    if acc is None or acc.num_processes == 1:
        return losses
    keys = [k for k, v in losses.items() if isinstance(v, float)]
    values = acc.reduce(torch.tensor([losses[k] for k in keys], dtype=torch.float64, device=acc.device), "mean")
    return {**losses, **dict(zip(keys, values.tolist()))}


@contextlib.contextmanager
def frozen(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Parameters of ``modules`` take no gradient inside (the discriminators during a generator update)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
