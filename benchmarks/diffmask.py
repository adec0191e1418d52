"""DiffMask costs on CPU, as ratios: attention recording vs plain sampling, the eq. 2 accumulator vs keeping
every map, and the refiners' time per image.

    python benchmarks/diffmask.py        # under a minute on two cores
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy import ndimage

from medsynth_core import Sample
from medsynth_plugins.common.sd_base import SmallBaseRecipe, build_small_base, denoise, make_scheduler
from medsynth_plugins.diffmask.attention import AttentionOptions
from medsynth_plugins.diffmask.refiners import AdaptiveThresholdRefiner, AffinityRefiner, DenseCRFRefiner
from medsynth_plugins.diffmask.sampling import sample_with_attention

PROMPT = "a chest x-ray with lung"


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def sampling() -> None:
    base = build_small_base(SmallBaseRecipe(resolution=64, widths=(32, 64, 64), words=("lung",))).freeze()
    seeds, steps = [1, 2, 3, 4], 10

    def plain() -> None:
        emb = base.encode_prompts([PROMPT] * 4, "cpu")
        neg = base.encode_prompts([""] * 4, "cpu")
        denoise(base, make_scheduler("dpm++", base.scheduler.config), embeddings=emb, negative=neg, size=64,
                seeds=seeds, steps=steps, guidance=3.0)

    def recorded() -> None:
        sample_with_attention(base, [PROMPT] * 4, [""] * 4, ["lung"], seeds, 64, scheduler="dpm++", steps=steps,
                              guidance=3.0, options=AttentionOptions())

    t_plain, t_rec = timed(plain), timed(recorded)
    print(f"sampling 4 images x {steps} steps at 64 px: plain {t_plain:.2f} s, with attention recording "
          f"{t_rec:.2f} s -> overhead x{t_rec / t_plain:.2f}")
    for n_steps in (10, 50):
        _, _, store = sample_with_attention(base, [PROMPT], [""], ["lung"], [1], 64, scheduler="dpm++",
                                            steps=n_steps, guidance=3.0, options=AttentionOptions())
        every = sum(s[0].numel() * 4 for s in store.sums.values()) * store.maps // len(store.sums)
        print(f"{n_steps} steps: accumulator {store.nbytes()} B vs every map kept ~{every} B "
              f"-> x{every / store.nbytes():.0f} less memory")


def refiners() -> None:
    rng = np.random.default_rng(0)
    for size in (64, 256):
        yy, xx = np.mgrid[:size, :size] / size
        truth = ((yy - 0.5) / 0.3) ** 2 + ((xx - 0.3) / 0.13) ** 2 <= 1
        image = np.clip(np.where(truth, 0.3, 0.65) + rng.normal(0, 0.05, truth.shape), 0, 1).astype(np.float32)
        soft = np.clip(0.6 * ndimage.gaussian_filter(truth.astype(float), size / 12) + 0.05, 0, 1)
        sample = Sample(image=image, soft_mask=soft.astype(np.float32), meta={"seed": 0})
        for refiner in (DenseCRFRefiner(), AffinityRefiner(), AdaptiveThresholdRefiner()):
            seconds = timed(lambda r=refiner, s=sample: r.refine([s]), repeats=2)
            print(f"{type(refiner).__name__} at {size} px: {seconds * 1000:.0f} ms per image")


if __name__ == "__main__":
    torch.manual_seed(0)
    sampling()
    refiners()
