"""The attention-iou evaluator: attention masks of the *real* images, refined, against their true masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsynth_core import ConfigError, Context, Dataset, Evaluator, Metric, Sample, option

from .refiners import (
    AdaptiveThresholdRefiner,
    AffinityRefiner,
    CrossFusionRefiner,
    DenseCRFRefiner,
    iou,
    otsu,
)

CHAINS = ("fixed", "otsu", "adaptive-threshold", "affinity", "densecrf", "method1", "method2")


def refine_chain(name: str, samples: Sequence[Sample], context: Context | None = None) -> list[np.ndarray]:
    """Binary masks of ``samples`` (with soft masks) after one refiner chain of :data:`CHAINS`, defaults only.

    'fixed' is the soft mask above 0.5, 'otsu' above Otsu's threshold, 'method1' is cross-fusion and
    'method2' affinity then the dense CRF.
    """
    if name == "fixed":
        return [s.soft_mask > 0.5 for s in samples]
    if name == "otsu":
        return [s.soft_mask > otsu(s.soft_mask) for s in samples]
    stages: dict[str, list[Callable[[], object]]] = {
        "adaptive-threshold": [AdaptiveThresholdRefiner], "affinity": [AffinityRefiner],
        "densecrf": [DenseCRFRefiner], "method1": [CrossFusionRefiner], "method2": [AffinityRefiner, DenseCRFRefiner]}
    if name not in stages:
        raise ConfigError(f"unknown refiner chain {name!r}; choose from {', '.join(CHAINS)}")
    out = list(samples)
    for cls in stages[name]:
        out = cls(context=context).refine(out)
    return [s.mask > 0 for s in out]


@dataclass(frozen=True)
class AttentionIoUConfig:
    """Options of the attention-iou evaluator."""

    checkpoint: str = option("", "Folder written by `medsynth train sd-attention` (required).")
    timesteps: tuple[int, ...] = option(
        (50, 200), "Noise levels (of the base's 1000 training steps) the real images are noised to; their maps "
                    "are averaged as eq. 2 averages steps.")
    chains: tuple[str, ...] = option(CHAINS, f"Refiner chains to score: {', '.join(CHAINS)}.")
    max_images: int = option(0, "Score at most this many real images (evenly spread); 0: all.")
    seed: int = option(0, "Seed of the noise added to the real images.")

    def __post_init__(self) -> None:
        if not self.timesteps or any(not 0 <= t < 1000 for t in self.timesteps):
            raise ConfigError(f"timesteps must be one or more values in [0, 1000), got {self.timesteps}")
        unknown = [c for c in self.chains if c not in CHAINS]
        if unknown or not self.chains:
            raise ConfigError(f"chains: unknown chain {unknown[0] if unknown else None!r}; choose from "
                              f"{', '.join(CHAINS)}")
        if self.max_images < 0:
            raise ConfigError(f"max_images must be >= 0, got {self.max_images}")


class AttentionIoUEvaluator(Evaluator):
    """IoU of sd-attention's soft masks of the real images, per refiner chain, against their true masks."""

    Config = AttentionIoUConfig

    def unavailable(self) -> str | None:
        if not self.config.checkpoint:
            return ("attention-iou needs a checkpoint: set attention-iou.checkpoint to a `medsynth train "
                    "sd-attention` folder")
        if not Path(self.config.checkpoint).expanduser().is_dir():
            return f"attention-iou: checkpoint folder {self.config.checkpoint!r} not found"
        return None

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        from .generator import SDAttentionGenerator

        why = self.unavailable()
        if why:
            raise ConfigError(why)
        labelled = [s for s in real if s.mask is not None]
        if not labelled:
            raise ConfigError(f"{real.name}: no real image has a mask to compare attention with")
        if self.config.max_images and len(labelled) > self.config.max_images:
            picks = np.linspace(0, len(labelled) - 1, self.config.max_images).round().astype(int)
            labelled = [labelled[i] for i in picks]
        generator = SDAttentionGenerator(context=self.context, name="sd-attention")
        generator.load(Path(self.config.checkpoint).expanduser())
        seeds = [self.config.seed * 100_003 + k for k in range(len(labelled))]
        with self.context.progress.task("attention of the real images", total=1) as task:
            soft = generator.real_attention([s.image for s in labelled], self.config.timesteps, seeds)
            task.advance()
        samples = [Sample(image=s.image, soft_mask=m.astype(np.float32), meta={"seed": seed})
                   for s, m, seed in zip(labelled, soft, seeds)]
        truths = [s.mask > 0 for s in labelled]
        common = {"images": len(samples), "timesteps": list(self.config.timesteps), "words": generator.words}
        metrics = [
            Metric("attention-iou/full-mask", float(np.mean([iou(np.ones_like(t), t) for t in truths])), "none",
                   details={**common, "what": "IoU of a mask covering the whole image: the floor to beat"}),
        ]
        with self.context.progress.task("refining attention masks", total=len(self.config.chains)) as task:
            for chain in self.config.chains:
                scores = [iou(m, t) for m, t in zip(refine_chain(chain, samples, self.context), truths)]
                metrics.append(Metric(f"attention-iou/{chain}", float(np.mean(scores)), "higher",
                                      sd=float(np.std(scores)), details={**common, "per_image": scores}))
                task.advance()
        return metrics
