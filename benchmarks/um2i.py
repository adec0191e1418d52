"""UM2I benchmark: unsupervised masks per second at 256 and 512 px (CPU, under a minute).

Prints, for SLIC (the paper's) and Felzenszwalb superpixels, how many unsupervised masks per
second Algorithm 1 makes from demo phantoms, and the speed-up of the vectorised superpixel
means over the per-superpixel loop written in the paper's pseudocode.

    python benchmarks/um2i.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from medsynth_core import open_dataset
from medsynth_core.demo_data import write_demo_dataset
from medsynth_plugins.um2i.superpixels import mean_per_superpixel, quantise, superpixel_labels, unsupervised_mask


def loop_means(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Lines 2-5 of Algorithm 1 as written: one pass over the image per superpixel."""
    out = image.astype(np.float64).copy()
    for m in np.unique(labels):
        where = labels == m
        out[where] = image[where].mean()
    return out


def rate(fn, items: list[np.ndarray], repeats: int) -> float:
    """Calls per second of ``fn`` over ``items``, best of ``repeats`` passes."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'size':>5} {'method':>13} {'segments':>9} {'UMs/s':>8} {'vectorised means vs loop':>25}")
        for size in (256, 512):
            root = write_demo_dataset(Path(tmp) / f"demo{size}", n=args.images, size=size, seed=0)
            images = [s.image for s in open_dataset(root)]
            for method in ("slic", "felzenszwalb"):
                per_s = rate(lambda im, m=method: unsupervised_mask(im, 512, 50, m), images, args.repeats)
                labels = [superpixel_labels(im, 512, method) for im in images]
                pairs = list(zip(images, labels))
                loop = rate(lambda p: quantise(loop_means(*p) * 255, 50), pairs, args.repeats)
                vec = rate(lambda p: quantise(mean_per_superpixel(*p) * 255, 50), pairs, args.repeats)
                segments = int(np.mean([lab.max() + 1 for lab in labels]))
                print(f"{size:>5} {method:>13} {segments:>9} {per_s:>8.1f} {vec / loop:>24.1f}x")


if __name__ == "__main__":
    main()
