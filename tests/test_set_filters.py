"""Filters of scope "set": they judge the whole generated set once, after generation."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import medsynth_core.set_filtering as set_filtering
import medsynth_plugins.baseline as baseline
from medsynth_core import (
    Filter,
    Registry,
    Sample,
    Verdict,
    build_pipeline,
    foreground_fraction,
    hookimpl,
    make_plugin_manager,
    option,
    parse_pipeline,
    run_pipeline,
)
from medsynth_core.manifest import read_manifest

N = 8


@dataclass(frozen=True)
class TopHalfConfig:
    """Options of the top-half filter."""

    keep: float = option(0.5, "Fraction of the set to keep.")


class TopHalfFilter(Filter):
    """Keeps the pairs with the largest foreground fraction: a verdict that needs the whole set."""

    Config = TopHalfConfig
    scope = "set"
    calls: list[int] = []

    def judge(self, samples: Sequence[Sample]) -> list[Verdict]:
        type(self).calls.append(len(samples))
        fractions = np.array([foreground_fraction(s.mask) for s in samples])
        cut = np.sort(fractions)[::-1][max(int(round(self.config.keep * len(samples))) - 1, 0)]
        return [Verdict(keep=bool(f >= cut), score=float(f)) for f in fractions]


class _Plugin:
    @hookimpl
    def register_filters(self, register):
        register("top-half", TopHalfFilter)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(baseline, name="baseline")
    pm.register(_Plugin(), name="set-plugin")
    try:
        yield Registry(pm)
    finally:
        pm.unregister(name="set-plugin")
        pm.unregister(name="baseline")


def _data(demo: Path, n: int = N, evaluators: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "run": {"n": n, "seed": 3, "batch_size": 3, "data": str(demo)},
        "mask_source": {"name": "real-pairs"},
        "generator": {"name": "augment"},
        "filters": [{"name": "mask-area", "min_fraction": 0.05}, {"name": "top-half"}],
    }
    if evaluators:
        data["evaluators"] = [{"name": "mask-stats"}]
    return data


def _run(registry: Registry, data: dict[str, Any], out: Path, resume: bool = False):
    return run_pipeline(build_pipeline(parse_pipeline(data), registry), out, resume=resume)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "dataset.json"}


def test_set_filter_sees_all_n_candidates_and_moves_the_dropped(registry: Registry, demo_dir: Path,
                                                                  tmp_path: Path) -> None:
    TopHalfFilter.calls.clear()
    result = _run(registry, _data(demo_dir, evaluators=True), tmp_path / "run")
    assert TopHalfFilter.calls == [N], "judged once, with the n pairs that passed the per-sample filters"
    records = read_manifest(tmp_path / "run" / "manifest.jsonl")
    candidates = [r for r in records if "image" in r]
    kept = [r for r in candidates if r["kept"]]
    dropped = [r for r in candidates if not r["kept"]]
    assert len(candidates) == N and len(kept) == N // 2 == result.kept
    assert min(r["scores"]["top-half"] for r in kept) >= max(r["scores"]["top-half"] for r in dropped)
    for r in kept:
        assert r["image"].startswith("images/") and (tmp_path / "run" / r["image"]).is_file()
    for r in dropped:
        assert r["dropped_by"] == "top-half" and r["image"].startswith("dropped/images/")
        assert (tmp_path / "run" / r["image"]).is_file() and (tmp_path / "run" / r["mask"]).is_file()
    assert len(list((tmp_path / "run" / "images").iterdir())) == N // 2
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["results"][0]["metrics"], "evaluators see the kept pairs"
    card = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert card["pairs"] == N // 2 and result.dropped_by.get("top-half") == N // 2


def test_resume_after_a_kill_between_manifest_and_file_moves(registry: Registry, demo_dir: Path,
                                                              tmp_path: Path, monkeypatch) -> None:
    _run(registry, _data(demo_dir), tmp_path / "reference")

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(set_filtering, "place_files", die)
    with pytest.raises(KeyboardInterrupt):
        _run(registry, _data(demo_dir), tmp_path / "run")
    monkeypatch.undo()
    TopHalfFilter.calls.clear()
    _run(registry, _data(demo_dir), tmp_path / "run", resume=True)
    assert TopHalfFilter.calls == [], "verdicts already in the manifest are not judged again"
    assert _snapshot(tmp_path / "run") == _snapshot(tmp_path / "reference")


def test_resume_with_a_larger_n_judges_the_whole_set_again(registry: Registry, demo_dir: Path,
                                                           tmp_path: Path) -> None:
    _run(registry, _data(demo_dir, n=12), tmp_path / "direct")
    _run(registry, _data(demo_dir, n=N), tmp_path / "run")
    _run(registry, _data(demo_dir, n=12), tmp_path / "run", resume=True)
    assert _snapshot(tmp_path / "run") == _snapshot(tmp_path / "direct")
