"""``[run]`` speed options: refiners and PNG encoding in worker processes overlapping the sampling,
autocast precision, channels-last and compiled networks. None may change which pairs a run makes
(precision excepted, which is why it enters the fingerprint)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import medsynth_plugins.baseline as baseline
from medsynth_core import Generator, PipelineError, Refiner, Sample, build_pipeline, hookimpl, parse_pipeline
from medsynth_core.manifest import read_manifest
from medsynth_core.registry import Registry, make_plugin_manager
from medsynth_core.runner import run_pipeline
from medsynth_plugins.baseline.augment import AugmentGenerator

SAMPLED: list[tuple[int, float]] = []  # (first index of a batch, time its sampling started)


class SlowAugment(AugmentGenerator):
    """Augmentation that notes when each batch is sampled."""

    def generate(self, conditions, seeds):
        SAMPLED.append((len(SAMPLED), time.time()))
        time.sleep(0.05)
        return super().generate(conditions, seeds)


class WhereRefiner(Refiner):
    """Blurs nothing, notes the process and the time it refined in (a CPU refiner fit for workers)."""

    in_worker = True

    def refine(self, samples: Sequence[Sample]) -> list[Sample]:
        started = time.time()
        time.sleep(0.3)
        for s in samples:
            s.meta.update(pid=os.getpid(), refine_start=started, refine_end=time.time())
        return list(samples)


class NetGenerator(Generator):
    """A tiny convolution whose state while generating is written into each sample's meta."""

    requires = frozenset({"mask"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.net = torch.nn.Conv2d(2, 4, 3)  # with one input channel both memory formats look alike

    def networks(self) -> list[Any]:
        return [self.net]

    def generate(self, conditions, seeds):
        state = {"autocast": torch.is_autocast_enabled("cpu"),
                 "channels_last": self.net.weight.is_contiguous(memory_format=torch.channels_last),
                 "compiled": getattr(self.net, "_compiled_call_impl", None) is not None}
        return [Sample(image=c.mask.astype(np.float32), mask=c.mask, meta=dict(state)) for c in conditions]


class LazyNetGenerator(NetGenerator):
    """Loads its network on first use, as generators with many models do, and tunes it then."""

    def networks(self) -> list[Any]:
        return []

    def generate(self, conditions, seeds):
        if not getattr(self, "loaded", False):
            self.net, self.loaded = self.tune(torch.nn.Conv2d(2, 4, 3)), True
        return super().generate(conditions, seeds)


class _Plugin:
    @hookimpl
    def register_generators(self, register):
        register("slow-augment", SlowAugment)
        register("net", NetGenerator)
        register("lazy-net", LazyNetGenerator)

    @hookimpl
    def register_refiners(self, register):
        register("where", WhereRefiner)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(baseline, name="baseline")
    pm.register(_Plugin(), name="speed-test")
    yield Registry(pm)


def _run(registry: Registry, demo: Path, out: Path, generator: str = "slow-augment", **run: Any):
    raw = {"run": {"n": 9, "seed": 3, "batch_size": 3, "data": str(demo), **run},
           "mask_source": {"name": "real-pairs"}, "generator": {"name": generator}}
    if generator == "slow-augment":
        raw["refiners"] = [{"name": "where"}]
        raw["filters"] = [{"name": "mask-area", "min_fraction": 0.2}]
    pipeline = build_pipeline(parse_pipeline(raw), registry)
    run_pipeline(pipeline, out)
    return pipeline


def _pairs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for sub in ("images", "masks")
            for p in sorted((out / sub).iterdir())}


def _without_timing(records: list[dict]) -> list[dict]:
    for r in records:
        for key in ("pid", "refine_start", "refine_end"):
            r.get("meta", {}).pop(key, None)
    return records


def test_workers_refine_elsewhere_and_make_the_same_pairs(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    _run(registry, demo_dir, tmp_path / "inline")
    _run(registry, demo_dir, tmp_path / "workers", workers=1)
    assert _pairs(tmp_path / "workers") == _pairs(tmp_path / "inline")
    inline, workers = (read_manifest(tmp_path / name / "manifest.jsonl") for name in ("inline", "workers"))
    assert {r["meta"]["pid"] for r in inline if "meta" in r} == {os.getpid()}
    assert os.getpid() not in {r["meta"]["pid"] for r in workers if "meta" in r}
    assert _without_timing(workers) == _without_timing(inline)


def test_the_next_batch_is_sampled_while_a_worker_refines(registry: Registry, demo_dir: Path,
                                                          tmp_path: Path) -> None:
    SAMPLED.clear()
    _run(registry, demo_dir, tmp_path / "run", workers=1)
    records = read_manifest(tmp_path / "run" / "manifest.jsonl")
    refine_end = {r["index"] // 3: r["meta"]["refine_end"] for r in records}
    starts = [t for _, t in SAMPLED]
    overlapped = [k for k in refine_end if k + 1 < len(starts) and starts[k + 1] < refine_end[k]]
    assert overlapped, "batch k+1 was sampled before batch k finished refining"


def test_bf16_autocast_while_generating_and_fp16_refused_on_cpu(registry: Registry, demo_dir: Path,
                                                                tmp_path: Path) -> None:
    _run(registry, demo_dir, tmp_path / "fp32", generator="net")
    _run(registry, demo_dir, tmp_path / "bf16", generator="net", precision="bf16")
    states = {name: {r["meta"]["autocast"] for r in read_manifest(tmp_path / name / "manifest.jsonl")}
              for name in ("fp32", "bf16")}
    assert states == {"fp32": {False}, "bf16": {True}}
    with pytest.raises(PipelineError, match="fp16 needs a GPU"):
        _run(registry, demo_dir, tmp_path / "fp16", generator="net", precision="fp16")
    assert not (tmp_path / "fp16").exists()


def test_precision_is_part_of_the_fingerprint(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    plain = _run(registry, demo_dir, tmp_path / "a", generator="net")
    with pytest.raises(PipelineError, match="different pipeline"):
        pipeline = build_pipeline(parse_pipeline(
            {"run": {"n": 9, "seed": 3, "batch_size": 3, "data": str(demo_dir), "precision": "bf16"},
             "mask_source": {"name": "real-pairs"}, "generator": {"name": "net"}}), registry)
        run_pipeline(pipeline, tmp_path / "a", resume=True)
    assert plain.fingerprint() != pipeline.fingerprint()


@pytest.mark.parametrize("generator", ["net", "lazy-net"])
def test_channels_last_and_compile_reach_the_generators_networks(registry: Registry, demo_dir: Path,
                                                                 tmp_path: Path, generator: str) -> None:
    _run(registry, demo_dir, tmp_path / "plain", generator=generator)
    _run(registry, demo_dir, tmp_path / "tuned", generator=generator, channels_last=True, compile=True)
    for name, expected in (("plain", False), ("tuned", True)):
        records = read_manifest(tmp_path / name / "manifest.jsonl")
        assert {r["meta"]["channels_last"] for r in records} == {expected}
        assert {r["meta"]["compiled"] for r in records} == {expected}
