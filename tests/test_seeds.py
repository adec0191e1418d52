"""Tests of per-sample seeds and the generators built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth_core import numpy_rng, sample_seed, torch_generator


def test_sample_seed_is_deterministic() -> None:
    assert sample_seed(0, 0) == sample_seed(0, 0)
    assert [sample_seed(7, i) for i in range(50)] == [sample_seed(7, i) for i in range(50)]
    # Independent of the order in which samples are asked for (batches, shards, resumes).
    assert [sample_seed(7, i) for i in reversed(range(50))][::-1] == [sample_seed(7, i) for i in range(50)]


def test_sample_seed_differs_across_indices_and_runs() -> None:
    seeds = {sample_seed(run, i) for run in range(5) for i in range(400)}
    assert len(seeds) == 5 * 400
    assert sample_seed(0, 1) != sample_seed(1, 0)  # (run, index) is not just summed
    assert sample_seed(1, 0) != sample_seed(2**32 + 7, 0)


@pytest.mark.parametrize("run_seed", [0, 1, 42, -1, 2**31, 2**40 + 3])
def test_sample_seed_range(run_seed: int) -> None:
    for index in (0, 1, 10**6, 2**40):
        seed = sample_seed(run_seed, index)
        assert type(seed) is int
        assert 0 <= seed < 2**63


def test_sample_seed_uses_the_high_bits() -> None:
    seeds = [sample_seed(3, i) for i in range(200)]
    assert max(seeds) > 2**60  # a 63-bit seed, not a 32-bit one widened


def test_numpy_rng_is_reproducible() -> None:
    seed = sample_seed(0, 5)
    a = numpy_rng(seed).random(16)
    b = numpy_rng(seed).random(16)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, numpy_rng(sample_seed(0, 6)).random(16))
    assert isinstance(numpy_rng(seed), np.random.Generator)


def test_torch_generator_is_reproducible() -> None:
    seed = sample_seed(0, 5)
    a = torch.rand(16, generator=torch_generator(seed))
    b = torch.rand(16, generator=torch_generator(seed))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.rand(16, generator=torch_generator(sample_seed(0, 6))))
    gen = torch_generator(seed)
    assert gen.device.type == "cpu" and gen.initial_seed() == seed


def test_torch_generator_accepts_any_int() -> None:
    for seed in (0, 2**63 - 1, 2**64 + 5, -3):
        gen = torch_generator(seed)
        assert 0 <= gen.initial_seed() < 2**63
    assert torch_generator(2**63 + 9).initial_seed() == 9
