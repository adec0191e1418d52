"""ControlNet sampling cost: pairs per second with DPM-Solver++ (25 steps) vs DDIM (50) and DDPM (1000 steps).

The paper does not name its sampler; the ControlNet repository samples with DDIM (50 steps in its
training logs), and the 1000-step ancestral DDPM is the schedule the model is trained on. All
three run the same small random base + ControlNet (pixel space, 32 px, classifier-free guidance)
on the CPU, so the ratios compare samplers, not hardware: network evaluations dominate, and the
ratios carry over to Stable Diffusion 1.5 on a GPU. Also printed: the extra cost of guidance and
of the ControlNet itself, and how far the fast samplers land from the 1000-step image.
Usage: ``python benchmarks/controlnet.py [--pairs 2] [--size 32]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from diffusers import ControlNetModel

from medsynth_core import sample_seed
from medsynth_plugins.common.sd_base import SmallBaseRecipe, build_small_base, denoise, make_scheduler
from medsynth_plugins.controlnet.conditions import condition_batch
from medsynth_plugins.controlnet.sampling import ControlNetSampler, SamplingOptions
from medsynth_plugins.controlnet.training import embedding_channels

ZERO_CONVOLUTIONS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


def disc(size: int, k: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((yy - size / 2) ** 2 + (xx - size / 2 - k) ** 2) <= (size / 4) ** 2).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    base = build_small_base(SmallBaseRecipe(resolution=args.size, widths=(16, 32), text_width=32, words=("lung",)))
    base.freeze()
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=embedding_channels(1))
    with torch.no_grad():  # a trained ControlNet's zero convolutions are not zero; give them weight
        for name, p in controlnet.named_parameters():
            if name.startswith(ZERO_CONVOLUTIONS):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    controlnet.eval()
    sampler = ControlNetSampler(base, controlnet)
    n = args.pairs
    conditions = condition_batch([disc(args.size, k) for k in range(n)], args.size)
    prompts, negatives = ["a medical image with lung"] * n, [""] * n
    seeds = [sample_seed(0, i) for i in range(n)]
    print(f"small pixel base (16, 32) + ControlNet, {args.size} px, {n} pairs a batch, guidance 3, "
          f"CPU threads {torch.get_num_threads()}")

    def run(scheduler: str, steps: int, guidance: float = 3.0) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        images = sampler.sample(conditions, prompts, negatives, seeds, args.size,
                                SamplingOptions(scheduler, steps, guidance, 1.0))
        return n / (time.perf_counter() - start), images

    rows = {name: run(name, steps) for name, steps in (("dpm++", 25), ("ddim", 50), ("ddpm", 1000))}
    reference = rows["ddpm"][1]
    print(f"{'sampler':<12}{'steps':>6}{'pairs/s':>10}{'x ddpm':>9}{'x ddim':>9}{'mean |diff| to ddpm':>22}")
    for (name, (rate, images)), steps in zip(rows.items(), (25, 50, 1000)):
        diff = float((images - reference).abs().mean())
        print(f"{name:<12}{steps:>6}{rate:>10.2f}{rate / rows['ddpm'][0]:>9.1f}{rate / rows['ddim'][0]:>9.2f}"
              f"{diff:>22.4f}")
    no_cfg, _ = run("dpm++", 25, guidance=1.0)
    print(f"dpm++ 25 without guidance: {no_cfg / rows['dpm++'][0]:.2f} x the pairs/s with guidance")
    start = time.perf_counter()
    with torch.no_grad():
        emb = base.encode_prompts(prompts, "cpu")
        denoise(base, make_scheduler("dpm++", base.scheduler.config), embeddings=emb,
                negative=base.encode_prompts(negatives, "cpu"), size=args.size, seeds=seeds, steps=25, guidance=3.0)
    base_only = n / (time.perf_counter() - start)
    print(f"the base alone (no ControlNet): {base_only / rows['dpm++'][0]:.2f} x the pairs/s of base + ControlNet")


if __name__ == "__main__":
    main()
