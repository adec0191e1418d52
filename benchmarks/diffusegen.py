"""diffusegen sampling cost: ddpm4 pairs per second by sampler, and RePaint's cost per pair, as ratios.

Runs one small random image+mask UNet (RGB + mask, 32 px) on the CPU, so the numbers compare
samplers, not hardware: the paper's 1000-step DDPM against its 200-step respacing and against
DPM-Solver++ with 20 steps, and RePaint (200 steps, jumps 10 x 5, with and without the paper's 80
skipped steps) against plain sampling. Model evaluations dominate, so the ratios carry over to
the paper-scale model on a GPU. Usage: ``python benchmarks/diffusegen.py [--batch 2] [--size 32]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from medsynth_core import Condition
from medsynth_plugins.diffusegen.bundle import DiffusionBundle
from medsynth_plugins.diffusegen.clustering import Clusters
from medsynth_plugins.diffusegen.ddpm4 import sample_pairs
from medsynth_plugins.diffusegen.repaint import RePaintConfig, RePaintGenerator
from medsynth_plugins.diffusegen.unet import build_unet


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = build_unet(size=args.size, planes=4, learn_sigma=True, block_out_channels=(16, 32), layers_per_block=1,
                      attention_resolutions=(), attention_head_dim=16, norm_num_groups=8, resblock_updown=True,
                      dropout=0.0)
    bundle = DiffusionBundle.in_memory({0: unet}, channels=3, clusters=Clusters.single(["real"]))
    seeds = list(range(args.batch))
    print(f"image+mask UNet, 4 planes, {args.size} px, batch {args.batch}, CPU threads {torch.get_num_threads()}")

    sample_pairs(bundle, 0, seeds, "ddpm", 5)  # warm-up: the first calls pay for allocation and kernel choice
    rates = {}
    for label, scheduler, steps in (("DDPM 1000 steps (paper's training chain)", "ddpm", 1000),
                                    ("DDPM respaced to 200 (paper's sampler)", "ddpm", 200),
                                    ("DDIM 50 steps", "ddim", 50),
                                    ("DPM-Solver++ 20 steps", "dpm-solver++", 20)):
        seconds = timed(lambda s=scheduler, n=steps: sample_pairs(bundle, 0, seeds, s, n))
        rates[label] = args.batch / seconds
        print(f"  {label:44s} {rates[label]:8.2f} pairs/s")
    base = rates["DDPM 1000 steps (paper's training chain)"]
    paper = rates["DDPM respaced to 200 (paper's sampler)"]
    for label, rate in rates.items():
        print(f"  speed-up of {label:40s} x{rate / base:6.1f} vs 1000-step DDPM, x{rate / paper:5.2f} vs 200-step")

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (args.size, args.size, 3)).astype(np.float32)
    mask = np.zeros((args.size, args.size), np.uint8)
    mask[args.size // 3:args.size // 2, args.size // 3:args.size // 2] = 1
    conditions = [Condition(mask=mask, image=image, meta={"source": "real"})] * args.batch
    for skip in (80, 0):
        gen = RePaintGenerator(RePaintConfig(skip_steps=skip), bundle=bundle)
        seconds = timed(lambda g=gen: g.generate(conditions, seeds)) / args.batch
        print(f"  RePaint 200 steps, jumps 10 x 5, skip {skip:2d}: {seconds:7.3f} s/pair = "
              f"x{seconds * paper:5.2f} the cost of a 200-step ddpm4 pair, x{seconds * base:5.2f} a 1000-step one")


if __name__ == "__main__":
    main()
