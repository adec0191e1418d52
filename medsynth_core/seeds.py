"""Per-sample seeds: sample i gets the same seed whatever the batch size, shard or resume point."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def sample_seed(run_seed: int, index: int) -> int:
    """The seed of sample ``index`` in a run seeded with ``run_seed`` (a 63-bit integer)."""
    state = np.random.SeedSequence([int(run_seed) % 2**64, int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def numpy_rng(seed: int) -> np.random.Generator:
    """A NumPy generator for one sample's seed."""
    return np.random.default_rng(seed)


def torch_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on ``device`` for one sample's seed."""
    import torch  # torch is slow to import; commands that never sample should not pay for it

    return torch.Generator(device=device).manual_seed(int(seed) % (2**63))
