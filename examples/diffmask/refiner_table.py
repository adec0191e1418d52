"""Compare DiffMask's refiners on real images: IoU of refined attention masks against the true lung masks.

The paper gives no such ablation. This script trains sd-attention's small offline base on one demo set (or
uses --checkpoint), reads the class word's cross-attention of the images of a *held-out* demo set (noised to
the given timesteps, eq. 2 over timesteps and layers), refines the soft masks with every chain and prints a
Markdown table (mean and standard deviation of the per-image IoU, seconds per image of the refiner).

    python examples/diffmask/refiner_table.py --work runs/diffmask/table            # CPU, about 15 minutes
    python examples/diffmask/refiner_table.py --checkpoint runs/diffmask/train --eval-data data/other
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medsynth_core import Context, Sample, open_dataset
from medsynth_core.demo_data import write_demo_dataset
from medsynth_plugins.diffmask.evaluator import CHAINS, refine_chain
from medsynth_plugins.diffmask.generator import SDAttentionConfig, SDAttentionGenerator
from medsynth_plugins.diffmask.refiners import iou

TRAIN = {"resolution": 64, "base_widths": (16, 32, 32), "base_steps": 300, "grounding_steps": 300,
         "checkpoint_every": 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/diffmask/table"), help="Folder for data and model.")
    parser.add_argument("--checkpoint", type=Path, help="A trained sd-attention folder (skips training).")
    parser.add_argument("--train-data", type=Path, help="Training set (default: 32 demo pairs, seed 0).")
    parser.add_argument("--eval-data", type=Path, help="Held-out set (default: 16 demo pairs, seed 1).")
    parser.add_argument("--size", type=int, default=64, help="Size of the default demo sets.")
    parser.add_argument("--timesteps", default="50,200", help="Noise levels of the real images.")
    parser.add_argument("--train", default=json.dumps(TRAIN), help="sd-attention training options (JSON).")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    context = Context(device=args.device)
    train_data = args.train_data or write_demo_dataset(args.work / "train-data", n=32, size=args.size, seed=0)
    eval_data = args.eval_data or write_demo_dataset(args.work / "eval-data", n=16, size=args.size, seed=1)
    options = json.loads(args.train)
    checkpoint = args.checkpoint
    if checkpoint is None:
        started = time.perf_counter()
        trainer = SDAttentionGenerator(SDAttentionConfig(**options), context=context, name="sd-attention")
        checkpoint = trainer.fit(open_dataset(train_data), args.work / "sd-attention")
        print(f"trained in {time.perf_counter() - started:.0f} s with {options}")
    generator = SDAttentionGenerator(context=context, name="sd-attention")
    generator.load(checkpoint)
    pairs = [s for s in open_dataset(eval_data) if s.mask is not None]
    timesteps = [int(t) for t in args.timesteps.split(",")]
    seeds = list(range(len(pairs)))
    soft = generator.real_attention([s.image for s in pairs], timesteps, seeds)
    samples = [Sample(image=s.image, soft_mask=m, meta={"seed": k}) for k, (s, m) in enumerate(zip(pairs, soft))]
    truths = [s.mask > 0 for s in pairs]

    print(f"\n{len(pairs)} held-out images of {eval_data}, attention at timesteps {timesteps}, words "
          f"{generator.words}, checkpoint {checkpoint}\n")
    print("| refiner chain | IoU mean | IoU sd | s / image |")
    print("|---|---|---|---|")
    full = [iou(np.ones_like(t), t) for t in truths]
    print(f"| full mask (floor) | {np.mean(full):.3f} | {np.std(full):.3f} | - |")
    for chain in CHAINS:
        started = time.perf_counter()
        masks = refine_chain(chain, samples, context)
        seconds = (time.perf_counter() - started) / len(samples)
        scores = [iou(m, t) for m, t in zip(masks, truths)]
        print(f"| {chain} | {np.mean(scores):.3f} | {np.std(scores):.3f} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
