"""Throughput of medsynth's feature extractors (images/s) at 64, 128 and 299 px, on the CPU.

    .venv/bin/python benchmarks/feature_extraction.py [--images 32] [--inception-images 8]

For each source size: the segmenter encoder and the discriminator CNN (both untrained: the
cost does not depend on the weights), and InceptionV3 through medsynth's InceptionFeatures next
to clean-fid's own ``get_folder_features`` path on the same PNGs, with their ratio. Inception
uses the file in MEDSYNTH_INCEPTION_WEIGHTS when set, else a random-init stand-in of the same
architecture (torchvision's inception_v3) scripted with the interface of clean-fid's file.
Runs in well under two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from medsynth_core import open_dataset, read_image
from medsynth_core.demo_data import write_demo_dataset
from medsynth_plugins.common.features import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    ClassifierFeatures,
    InceptionFeatures,
    SmallCNN,
    inception_weights,
)
from medsynth_plugins.common.segmenter import Segmenter, SegmenterRecipe, build_unet

SIZES = (64, 128, 299)


class _StandInLayers(nn.Module):
    """torchvision's InceptionV3 trunk up to the 2048-d pool, like the ``layers`` of clean-fid's file."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1, net.Conv2d_3b_1x1,
            net.Conv2d_4a_3x3, net.maxpool2, net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b,
            net.Mixed_6c, net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, net.avgpool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(x), 1)


class _StandIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        self.layers = _StandInLayers(net)
        self.fc = net.fc

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128)
        if return_features:
            return features
        return self.fc(features).softmax(1)


def inception_file(workdir: Path) -> tuple[Path, str]:
    """The real weights when configured, else a scripted random-init stand-in saved under ``workdir``."""
    if os.environ.get(INCEPTION_ENV):
        return inception_weights(None), "clean-fid weights"
    torch.manual_seed(0)
    path = workdir / INCEPTION_FILE
    torch.jit.save(torch.jit.script(_StandIn().eval()), str(path))
    return path, "random-init stand-in (torchvision inception_v3)"


def rate(fn: Callable[[object], object], warm_up: object, timed: object, count: int) -> float:
    """Images per second of ``fn(timed)`` over ``count`` images, after a small ``fn(warm_up)``."""
    fn(warm_up)
    start = time.perf_counter()
    fn(timed)
    return count / (time.perf_counter() - start)


def copy_images(folder: Path, out: Path, count: int) -> Path:
    """The first ``count`` PNGs of a demo set's images/ as a folder of their own (clean-fid globs folders)."""
    out.mkdir()
    for path in sorted((folder / "images").iterdir())[:count]:
        (out / path.name).write_bytes(path.read_bytes())
    return out


def read_images(folder: Path) -> list[np.ndarray]:
    return [read_image(p) for p in sorted(folder.iterdir())]


def _clean_fid_features(folder: Path, model: nn.Module) -> np.ndarray:
    from cleanfid.fid import get_folder_features

    return get_folder_features(str(folder), model, num_workers=0, batch_size=32, device=torch.device("cpu"),
                               mode="clean", verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images per size for the segmenter and discriminator")
    parser.add_argument("--inception-images", type=int, default=8, help="images per size for InceptionV3")
    args = parser.parse_args()

    from cleanfid.inception_torchscript import InceptionV3W

    torch.manual_seed(0)
    segmenter = Segmenter(build_unet(SegmenterRecipe(), 1, 2).eval(), SegmenterRecipe(), 2, 1, "cpu")
    discriminator = ClassifierFeatures("discriminator", SmallCNN(1, 2), 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights, which = inception_file(Path(tmp))
        ours = InceptionFeatures(weights)
        theirs = InceptionV3W(str(weights.parent), download=False).eval()
        print(f"torch threads: {torch.get_num_threads()}; inception: {which}")
        for size in SIZES:
            folder = write_demo_dataset(Path(tmp) / f"demo{size}", n=max(args.images, args.inception_images),
                                        size=size)
            images = [s.image for s in open_dataset(folder)][:args.images]
            warm_dir = copy_images(folder, Path(tmp) / f"warm{size}", 2)
            few_dir = copy_images(folder, Path(tmp) / f"few{size}", args.inception_images)
            rows.append(("segmenter", size, rate(partial(segmenter.encode, size=size), images[:2], images,
                                                 len(images)), None))
            rows.append(("discriminator", size, rate(partial(discriminator.features, size=size), images[:2], images,
                                                     len(images)), None))
            # both inception paths start from the PNG files: reading is part of the cost
            mine = rate(lambda d: ours.features(read_images(d)), warm_dir, few_dir, args.inception_images)
            clean = rate(partial(_clean_fid_features, model=theirs), warm_dir, few_dir, args.inception_images)
            rows.append(("inception", size, mine, clean))
    print(f"{'extractor':<14}{'source px':>10}{'images/s':>11}{'clean-fid':>11}{'ratio':>8}")
    for name, size, mine, clean in rows:
        extra = f"{clean:>11.1f}{mine / clean:>8.2f}" if clean else f"{'-':>11}{'-':>8}"
        print(f"{name:<14}{size:>10}{mine:>11.1f}{extra}")
    print("segmenter/discriminator read the images at the source size; inception always at 299 px "
          "(clean-fid's 'clean' resize from the source size). ratio = medsynth / clean-fid.")


if __name__ == "__main__":
    main()
