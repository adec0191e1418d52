"""The stages of one batch: sample, refine, judge; and the worker pool that overlaps them.

Sampling runs in this process (it owns the GPU). With ``[run] workers``, the PNG encoding of a
batch, and its refiners when all are marked ``in_worker``, run in worker processes while the
next batch is sampled. Every stage depends on the samples alone, so the pairs are those of the
plain path, only sooner.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from .config import config_to_dict
from .errors import PipelineError
from .image_io import encode_png_image, encode_png_mask
from .pipeline import Pipeline
from .roles import NETWORK_TUNER, Component, Refiner
from .sample import Condition, Sample
from .seeds import sample_seed

Encoded = tuple[bytes, bytes] | None  # a sample's image and mask PNG bytes, when made ahead


@dataclass
class Pending:
    """A sampled batch whose refining (and encoding) may still be running in a worker."""

    indices: list[int]
    future: Future


class BatchMaker:
    """Turns sample indices into judged samples, overlapping CPU stages with sampling when asked."""

    def __init__(self, pipeline: Pipeline, workers: int = 0) -> None:
        self.pipeline = pipeline
        self.offload_refiners = workers > 0 and all(r.in_worker for r in pipeline.refiners)
        self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_quiet_worker) \
            if workers > 0 else None

    @property
    def overlapping(self) -> bool:
        """Whether a batch's CPU stages run beside the sampling of the next one."""
        return self.pool is not None

    def start(self, indices: Sequence[int]) -> Pending:
        """Sample ``indices`` now; refine and encode now or in a worker."""
        samples = sample_batch(self.pipeline, indices)
        if self.pool is None:
            future: Future = Future()
            future.set_result((refine_batch(self.pipeline.refiners, samples), [None] * len(samples)))
        elif self.offload_refiners:
            future = self.pool.submit(refine_and_encode, self.pipeline.refiners, samples)
        else:
            future = self.pool.submit(refine_and_encode, [], refine_batch(self.pipeline.refiners, samples))
        return Pending(list(indices), future)

    def finish(self, pending: Pending) -> Iterator[tuple[int, Sample, dict[str, Any], Encoded]]:
        """Wait for ``pending``'s CPU stages, judge it, and yield each sample in index order."""
        samples, encoded = pending.future.result()
        yield from judge_batch(self.pipeline, pending.indices, samples, encoded)

    def close(self) -> None:
        """Stop the workers; work still queued is dropped."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchMaker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sample_batch(pipeline: Pipeline, indices: Sequence[int]) -> list[Sample]:
    """Conditions and generated samples for ``indices``, each completed with its index, seed and provenance."""
    seeds = [sample_seed(pipeline.spec.run.seed, i) for i in indices]
    if pipeline.mask_source is not None:
        conditions = pipeline.mask_source.conditions(indices, seeds)
        expect_count(pipeline.mask_source, conditions, len(indices))
    else:
        conditions = [Condition() for _ in indices]
    with _autocast(pipeline):
        samples = pipeline.generator.generate(conditions, seeds)
    expect_count(pipeline.generator, samples, len(indices))
    return [_complete(s, c, i, seed, pipeline) for s, c, i, seed in zip(samples, conditions, indices, seeds)]


def refine_batch(refiners: Sequence[Refiner], samples: list[Sample]) -> list[Sample]:
    """Apply ``refiners`` in order, noting each in the samples' provenance."""
    for refiner in refiners:
        count = len(samples)
        samples = refiner.refine(samples)
        expect_count(refiner, samples, count)
        for s in samples:
            s.meta.setdefault("provenance", []).append(stage_record(refiner))
    return samples


def refine_and_encode(refiners: Sequence[Refiner], samples: list[Sample]) -> tuple[list[Sample], list[Encoded]]:
    """The worker's task: refine, then encode every sample that has its mask as PNG bytes."""
    samples = refine_batch(refiners, samples)
    encoded: list[Encoded] = [
        (encode_png_image(s.image), encode_png_mask(s.mask)) if s.mask is not None else None for s in samples]
    return samples, encoded


def judge_batch(pipeline: Pipeline, indices: Sequence[int], samples: list[Sample],
                encoded: list[Encoded]) -> Iterator[tuple[int, Sample, dict[str, Any], Encoded]]:
    """Run the per-sample filters; yield (index, sample, verdicts, encoded) in index order."""
    verdicts: list[dict[str, Any]] = [{} for _ in samples]
    alive = list(range(len(samples)))
    for flt in (f for f in pipeline.filters if f.scope == "sample"):
        judged = flt.judge([samples[k] for k in alive])
        expect_count(flt, judged, len(alive))
        for k, verdict in zip(alive, judged):
            verdicts[k][flt.name] = verdict
            if verdict.sample is not None:
                samples[k] = verdict.sample
                encoded[k] = None  # the filter changed the pair: its bytes are made again
        alive = [k for k, v in zip(alive, judged) if v.keep]
    for k, index in enumerate(indices):
        samples[k].check(f"sample {index}")
        if samples[k].mask is None:
            raise PipelineError(f"sample {index} has no mask after the refiners; add a refiner such as 'threshold'")
        yield index, samples[k], verdicts[k], encoded[k]


def expect_count(component: Component, items: Sequence[Any], n: int) -> None:
    """Raise PipelineError unless ``component`` returned one item per sample."""
    if len(items) != n:
        raise PipelineError(f"{component.role} {component.name!r} returned {len(items)} items for {n} samples")


def stage_record(component: Component) -> dict[str, Any]:
    """What the provenance of a pair says about one stage."""
    return {"role": component.role, "name": component.name, "plugin": component.plugin,
            "version": component.version, "config": config_to_dict(component.config)}


def prepare_networks(pipeline: Pipeline) -> None:
    """Apply ``[run] channels_last`` and ``compile`` to the loaded generator's networks, and to those
    it loads later through ``Generator.tune``."""
    run = pipeline.spec.run
    if not (run.channels_last or run.compile):
        return
    import torch

    def tune(network: Any) -> Any:
        if run.channels_last:
            network.to(memory_format=torch.channels_last)
        if run.compile:
            network.compile()
        return network

    pipeline.generator.context.extras[NETWORK_TUNER] = tune  # for networks the generator loads later
    for network in pipeline.generator.networks():
        tune(network)


def _complete(sample: Sample, condition: Condition, index: int, seed: int, pipeline: Pipeline) -> Sample:
    if sample.mask is None and sample.soft_mask is None and condition.mask is not None:
        sample = sample.replace(mask=condition.mask)  # the conditioning mask is the pair's mask
    sample.meta.update(index=index, seed=seed)
    if condition.meta:
        sample.meta["condition"] = dict(condition.meta)
    head = [pipeline.mask_source] if pipeline.mask_source is not None else []
    sample.meta["provenance"] = [stage_record(c) for c in [*head, pipeline.generator]]
    return sample


def _autocast(pipeline: Pipeline) -> Any:
    precision = pipeline.spec.run.precision
    if precision == "fp32":
        return nullcontext()
    import torch

    device = "cuda" if str(pipeline.generator.context.device).startswith("cuda") else "cpu"
    if device == "cpu" and precision == "fp16":
        raise PipelineError("precision fp16 needs a GPU; use bf16 on the CPU")
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _quiet_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers share the cores with the sampler
