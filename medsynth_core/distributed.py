"""The processes of one run: rank, world size, and the few collective calls the runner needs.

A command started by ``accelerate launch`` (or ``torchrun``) sees ``WORLD_SIZE > 1`` in its
environment; its collectives then go through accelerate's ``PartialState`` (gloo on CPU, NCCL
on GPUs). A lone process needs none of that, and accelerate is not even imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import PipelineError


@dataclass
class Processes:
    """One process's view of the group it belongs to; the default is a group of one."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _state: Any = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes what is written once (merged manifest, card, report)."""
        return self.rank == 0

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (any picklable object), in rank order, on every process."""
        if self.world == 1 or self._state is None:
            return [value]
        from accelerate.utils import gather_object

        return list(gather_object([value]))

    def barrier(self) -> None:
        """Wait until every process reaches this point."""
        if self.world > 1 and self._state is not None:
            self._state.wait_for_everyone()

    def finish(self) -> None:
        """Leave the group together: the collectives are over, each process may go its own way."""
        if self.world > 1 and self._state is not None:
            import torch.distributed as dist

            self._state.wait_for_everyone()
            if dist.is_initialized():
                dist.destroy_process_group()
            self._state = None

    def agree(self, error: BaseException | None) -> None:
        """Raise on every process when any process failed, so none waits forever for the others.

        The failing process re-raises its own exception; the others raise a PipelineError naming it.
        """
        messages = self.gather(None if error is None else str(error))
        if error is not None:
            raise error
        for rank, message in enumerate(messages):
            if message is not None:
                raise PipelineError(f"process {rank} failed: {message}")


_current: Processes | None = None


def current_processes() -> Processes:
    """The group this process was launched in (a group of one unless ``WORLD_SIZE > 1``).

    GPUs are used when visible, unless ``accelerate launch --cpu`` (``ACCELERATE_USE_CPU``) says not.
    """
    global _current
    if _current is None:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            _current = Processes()
        else:
            import torch
            from accelerate import PartialState

            forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
            state = PartialState(cpu=forced or not torch.cuda.is_available())
            _current = Processes(rank=state.process_index, world=state.num_processes,
                                 local_rank=state.local_process_index, _state=state)
    return _current
