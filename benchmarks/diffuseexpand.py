"""DiffuseExpand sampling cost: pairs per second with DPM-Solver++ (20 steps) vs the 1000-step ancestral DDPM.

A pair is both Stage III phases: a mask from noise (y1 = 0, guided by the segmenter's
image-or-mask head), then its image (y1 = 1) with classifier-free guidance and segmenter
guidance (tau = 1). Both samplers run the same small random denoiser and segmenter (32 px, 1000
training timesteps) on the CPU, so the ratio compares samplers, not hardware: network
evaluations dominate, and it carries over to the paper-scale model on a GPU.
Usage: ``python benchmarks/diffuseexpand.py [--pairs 1] [--size 32]`` (about a minute of CPU time).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from diffusers import DDPMScheduler

from medsynth_core import Condition, sample_seed
from medsynth_plugins.diffuseexpand.generator import DiffuseExpandConfig, DiffuseExpandGenerator
from medsynth_plugins.diffuseexpand.masks import DiffuseExpandMasksConfig, DiffuseExpandMaskSource
from medsynth_plugins.diffuseexpand.networks import NoisySegmenter, build_denoiser
from medsynth_plugins.diffuseexpand.store import Bundle


def pairs_per_second(bundle: Bundle, sampler: str, pairs: int) -> float:
    source = DiffuseExpandMaskSource(DiffuseExpandMasksConfig(sampler=sampler, solver_steps=20))
    generator = DiffuseExpandGenerator(DiffuseExpandConfig(sampler=sampler, solver_steps=20, cfg_scale=1.5))
    source.bundle = generator.bundle = bundle
    seeds = [sample_seed(0, i) for i in range(pairs)]
    start = time.perf_counter()
    conditions: list[Condition] = source.conditions(list(range(pairs)), seeds)
    samples = generator.generate(conditions, seeds)
    elapsed = time.perf_counter() - start
    assert len(samples) == pairs and all(np.isfinite(s.image).all() for s in samples)
    return pairs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    bundle = Bundle(build_denoiser(1, args.size, (16, 32), 1, False).eval(),
                    NoisySegmenter(in_channels=1, classes=2, block_channels=(8, 16), sample_size=args.size).eval(),
                    dict(DDPMScheduler(num_train_timesteps=1000).config), [0, 1], 1, args.size)
    print(f"denoiser (16, 32) + segmenter (8, 16), {args.size} px, {args.pairs} pairs a batch, "
          f"CPU threads {torch.get_num_threads()}")
    pairs_per_second(bundle, "dpm-solver++", 1)  # warm-up: first calls pay for allocation and kernel choice
    fast = pairs_per_second(bundle, "dpm-solver++", args.pairs)
    print(f"  DPM-Solver++ 20 steps        {fast:8.3f} pairs/s")
    slow = pairs_per_second(bundle, "ddpm", args.pairs)
    print(f"  ancestral DDPM 1000 steps    {slow:8.3f} pairs/s")
    print(f"DPM-Solver++ (20) / DDPM (1000): {fast / slow:.1f}x pairs per second")


if __name__ == "__main__":
    main()
