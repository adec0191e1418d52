"""The runner: exactly n kept pairs, a manifest that tells the truth, seeded determinism and resuming."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import medsynth_core.runner as runner
import medsynth_plugins.baseline as baseline
from medsynth_core import (
    Condition,
    Generator,
    PipelineError,
    Refiner,
    Registry,
    RunResult,
    Sample,
    build_pipeline,
    hookimpl,
    make_plugin_manager,
    option,
    parse_pipeline,
    read_mask,
    run_pipeline,
    sample_seed,
)
from medsynth_core.dataset import foreground_fraction
from medsynth_core.manifest import ManifestWriter, read_manifest
from medsynth_plugins.baseline.augment import AugmentGenerator

N = 8
# Drops about a third of the augmented demo pairs, so every run has dropped records between kept ones.
MIN_FRACTION = 0.2


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way may swallow it."""


@dataclass(frozen=True)
class BadLabelConfig:
    """Options of the bad-label refiner."""

    at: int = option(2, "Index of the sample whose mask gets an undeclared label.")


class BadLabelRefiner(Refiner):
    """Gives one sample's mask the label 2, which the demo set does not declare."""

    Config = BadLabelConfig

    def refine(self, samples: Sequence[Sample]) -> list[Sample]:
        out = []
        for s in samples:
            if s.meta["index"] == self.config.at:
                s = s.replace(mask=(s.mask > 0).astype(np.uint8) * np.uint8(2))
            out.append(s)
        return out


class BlobGenerator(Generator):
    """Noise image and a soft disc whose centre depends on the sample's seed; needs no data."""

    makes = frozenset({"soft_mask"})

    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        out = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            cy, cx = rng.uniform(10, 22, size=2)
            yy, xx = np.mgrid[:32, :32]
            soft = 1.0 / (1.0 + np.exp(np.hypot(yy - cy, xx - cx) - 7.0))
            out.append(Sample(image=rng.uniform(0, 1, (32, 32)).astype(np.float32),
                              soft_mask=soft.astype(np.float32)))
        return out


class _TestPlugin:
    @hookimpl
    def register_generators(self, register):
        register("blob", BlobGenerator)

    @hookimpl
    def register_refiners(self, register):
        register("bad-label", BadLabelRefiner)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(baseline, name="baseline")
    pm.register(_TestPlugin(), name="test-plugin")
    try:
        yield Registry(pm)
    finally:
        pm.unregister(name="test-plugin")
        pm.unregister(name="baseline")


def _pipeline_data(data: Path, *, n: int = N, seed: int = 0, batch_size: int = 3, evaluators: bool = False,
                   **run: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "run": {"n": n, "seed": seed, "batch_size": batch_size, "data": str(data), **run},
        "mask_source": {"name": "real-pairs"},
        "generator": {"name": "augment"},
        "filters": [{"name": "mask-area", "min_fraction": MIN_FRACTION}],
    }
    if evaluators:
        spec["evaluators"] = [{"name": "mask-stats"}]
    return spec


def _run(registry: Registry, data: dict[str, Any], out: Path, *, resume: bool = False) -> RunResult:
    return run_pipeline(build_pipeline(parse_pipeline(data), registry), out, resume=resume)


def _files(out: Path) -> dict[str, bytes]:
    """Every pair file and the manifest, by relative path."""
    found = {p.relative_to(out).as_posix(): p.read_bytes()
             for sub in ("images", "masks") if (out / sub).is_dir() for p in sorted((out / sub).iterdir())}
    found["manifest.jsonl"] = (out / "manifest.jsonl").read_bytes()
    return found


def _card(out: Path, *ignore_run_keys: str) -> dict[str, Any]:
    """The dataset card without its time stamps (and without the named [run] keys of its pipeline)."""
    card = json.loads((out / "dataset.json").read_text())
    del card["created"], card["updated"]
    for key in ignore_run_keys:
        del card["pipeline"]["run"][key]
    return card


def _leftovers(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.name.startswith(".tmp-"))


def _assert_consistent(out: Path, n: int) -> list[dict[str, Any]]:
    """The folder holds exactly the n pairs its manifest names, and nothing else."""
    records = read_manifest(out / "manifest.jsonl")
    assert (out / "manifest.jsonl").read_bytes().endswith(b"\n")
    indices = [r["index"] for r in records]
    assert indices == list(range(len(records))), "every candidate index is decided once, in order"
    kept = [r for r in records if r["kept"]]
    assert len(kept) == n
    assert records[-1]["kept"], "the run stops at its n-th kept pair"
    named = {r[key] for r in kept for key in ("image", "mask")}
    on_disk = {p.relative_to(out).as_posix() for sub in ("images", "masks") for p in (out / sub).iterdir()}
    assert on_disk == named
    assert _leftovers(out) == []
    for r in records:
        assert set(r) >= {"index", "seed", "kept", "scores", "provenance"}
        if not r["kept"]:
            assert "image" not in r and "mask" not in r
    return records


@pytest.fixture(scope="module")
def reference(registry: Registry, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the standard pipeline, for comparisons (do not modify)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(registry, _pipeline_data(demo_dir), out)
    return out


# --- one run --------------------------------------------------------------------------------------------


def test_run_keeps_exactly_n_pairs_named_by_the_manifest(reference: Path, demo_dir: Path) -> None:
    records = _assert_consistent(reference, N)
    for r in records:
        assert r["seed"] == sample_seed(0, r["index"])
        assert [p["name"] for p in r["provenance"]] == ["real-pairs", "augment"]
        assert r["meta"]["condition"]["source"] == f"case_{r['index'] % 12:04d}"
        if r["kept"]:
            assert r["image"] == f"images/{r['index']:06d}.png" and r["mask"] == f"masks/{r['index']:06d}.png"
            mask = read_mask(reference / r["mask"])
            assert set(np.unique(mask)) <= {0, 1}
            assert foreground_fraction(mask) == pytest.approx(r["scores"]["mask-area"])


def test_filter_drops_are_recorded_with_their_scores(reference: Path) -> None:
    records = read_manifest(reference / "manifest.jsonl")
    dropped = [r for r in records if not r["kept"]]
    assert dropped, "the standard pipeline must drop some pairs for this test to mean anything"
    for r in records:
        score = r["scores"]["mask-area"]
        if r["kept"]:
            assert MIN_FRACTION <= score <= 0.9
        else:
            assert r["dropped_by"] == "mask-area" and score < MIN_FRACTION
    card = json.loads((reference / "dataset.json").read_text())
    assert (card["pairs"], card["dropped"], card["candidates"]) == (N, len(dropped), len(records))


def test_run_result_counts(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    result = _run(registry, _pipeline_data(demo_dir, n=4), tmp_path / "run")
    records = read_manifest(tmp_path / "run" / "manifest.jsonl")
    dropped = sum(not r["kept"] for r in records)
    assert result.out == tmp_path / "run"
    assert result.kept == 4 and result.dropped == dropped and dropped > 0
    assert result.dropped_by == {"mask-area": dropped}
    assert result.results == []
    assert not (tmp_path / "run" / "report.json").exists()


def test_card(reference: Path, registry: Registry, demo_dir: Path) -> None:
    spec = parse_pipeline(_pipeline_data(demo_dir))
    card = json.loads((reference / "dataset.json").read_text())
    assert card["status"] == "complete"
    assert card["name"] == "run"
    assert card["fingerprint"] == build_pipeline(spec, registry).fingerprint()
    assert card["pipeline"] == json.loads(json.dumps(spec.to_dict()))
    assert card["labels"] == {"background": 0, "lung": 1}
    assert card["versions"]["python"] and "numpy" in card["versions"]
    assert card["created"] <= card["updated"]
    assert [(s["role"], s["name"], s["plugin"]) for s in card["stages"]] == [
        ("mask_source", "real-pairs", "baseline"), ("generator", "augment", "baseline"),
        ("filter", "mask-area", "baseline")]
    assert card["stages"][2]["config"] == {"min_fraction": MIN_FRACTION, "max_fraction": 0.9}


def test_out_folder_is_a_dataset(reference: Path) -> None:
    from medsynth_core import open_dataset

    synthetic = open_dataset(reference)
    assert len(synthetic) == N
    kept = [r for r in read_manifest(reference / "manifest.jsonl") if r["kept"]]
    for sample, record in zip(synthetic, kept):
        assert sample.meta["index"] == record["index"]
        assert sample.image.shape == sample.mask.shape == (64, 64)


def test_evaluators_write_a_report(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _run(registry, _pipeline_data(demo_dir, n=3, evaluators=True), out)
    assert [r.evaluator for r in result.results] == ["mask-stats"]
    report = json.loads((out / "report.json").read_text())
    assert report["real"]["pairs"] == 12
    assert report["results"][0]["evaluator"] == "mask-stats"
    assert report["results"][0]["synthetic"] == "run"
    metrics = {m["name"]: m for m in report["results"][0]["metrics"]}
    assert metrics["empty_synthetic"]["value"] == 0.0
    assert metrics["components_synthetic"]["value"] > 0
    md = (out / "report.md").read_text()
    assert "mask-stats" in md and "fraction_wasserstein" in md and "| evaluator | metric |" in md
    assert json.loads((out / "dataset.json").read_text())["status"] == "complete"


def test_soft_masks_are_refined_before_writing(registry: Registry, tmp_path: Path) -> None:
    data = {"run": {"n": 3, "batch_size": 2}, "generator": {"name": "blob"}, "refiners": ["threshold"]}
    out = tmp_path / "run"
    result = _run(registry, data, out)
    assert result.kept == 3
    records = _assert_consistent(out, 3)
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "foreground": 1}
    for r in records:
        assert [p["name"] for p in r["provenance"]] == ["blob", "threshold"]
        assert 0 < r["meta"]["threshold"] < 1
        mask = read_mask(out / r["mask"])
        assert set(np.unique(mask)) == {0, 1} and 0.05 < mask.mean() < 0.5


def test_no_output_folder(registry: Registry, demo_dir: Path) -> None:
    with pytest.raises(PipelineError, match="no output folder"):
        run_pipeline(build_pipeline(parse_pipeline(_pipeline_data(demo_dir)), registry))


def test_out_from_the_pipeline(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "from-spec"
    result = run_pipeline(build_pipeline(parse_pipeline(_pipeline_data(demo_dir, n=2, out=str(out))), registry))
    assert result.out == out and result.kept == 2


# --- determinism ------------------------------------------------------------------------------------


def test_same_seed_same_bytes(registry: Registry, demo_dir: Path, reference: Path, tmp_path: Path) -> None:
    _run(registry, _pipeline_data(demo_dir), tmp_path / "run")
    assert _files(tmp_path / "run") == _files(reference)
    assert _card(tmp_path / "run") == _card(reference)


def test_other_seed_other_pairs(registry: Registry, demo_dir: Path, reference: Path, tmp_path: Path) -> None:
    _run(registry, _pipeline_data(demo_dir, seed=1), tmp_path / "run")
    _assert_consistent(tmp_path / "run", N)
    ours, theirs = _files(tmp_path / "run"), _files(reference)
    common = sorted(set(ours) & set(theirs) - {"manifest.jsonl"})
    assert all(ours[k] != theirs[k] for k in common if k.startswith("images/"))
    assert _card(tmp_path / "run")["fingerprint"] != _card(reference)["fingerprint"]


def test_batch_size_changes_nothing(registry: Registry, demo_dir: Path, reference: Path, tmp_path: Path) -> None:
    for batch_size in (1, 8):
        out = tmp_path / str(batch_size) / "run"
        _run(registry, _pipeline_data(demo_dir, batch_size=batch_size, evaluators=True), out)
        assert _files(out) == _files(reference), f"batch_size={batch_size}"
        card = _card(out, "batch_size")
        del card["stages"][-1]  # the evaluator
        del card["pipeline"]["evaluators"]
        expected = _card(reference, "batch_size")
        del expected["pipeline"]["evaluators"]
        assert card == expected
    one = json.loads((tmp_path / "1" / "run" / "report.json").read_text())
    eight = json.loads((tmp_path / "8" / "run" / "report.json").read_text())
    assert one["results"] == eight["results"]
    assert (tmp_path / "1" / "run" / "report.md").read_bytes() == (tmp_path / "8" / "run" / "report.md").read_bytes()


# --- refusals ---------------------------------------------------------------------------------------


def test_non_empty_out_without_resume(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="folder is not empty") as err:
        _run(registry, _pipeline_data(demo_dir), out)
    assert "--resume" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(PipelineError, match="not a medsynth run folder"):
        _run(registry, _pipeline_data(demo_dir), out, resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_out_is_a_file(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.write_text("x")
    with pytest.raises(PipelineError, match="not a folder"):
        _run(registry, _pipeline_data(demo_dir), out)


def test_empty_existing_out_is_used(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    assert _run(registry, _pipeline_data(demo_dir, n=2), out).kept == 2


def test_finished_run_is_not_rerun(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(registry, _pipeline_data(demo_dir, n=3), out)
    before = _files(out)
    with pytest.raises(PipelineError, match="folder is not empty"):
        _run(registry, _pipeline_data(demo_dir, n=3), out)
    assert _files(out) == before
    result = _run(registry, _pipeline_data(demo_dir, n=3), out, resume=True)
    assert result.kept == 3 and _files(out) == before


@pytest.mark.parametrize("change", [{"seed": 1}, {"filter_min": 0.1}])
def test_resume_with_another_pipeline_is_refused(registry: Registry, demo_dir: Path, tmp_path: Path,
                                                 change: dict[str, Any]) -> None:
    out = tmp_path / "run"
    _run(registry, _pipeline_data(demo_dir, n=3), out)
    before = _files(out)
    other = _pipeline_data(demo_dir, n=5, seed=change.get("seed", 0))
    if "filter_min" in change:
        other["filters"][0]["min_fraction"] = change["filter_min"]
    with pytest.raises(PipelineError, match="made by a different pipeline") as err:
        _run(registry, other, out, resume=True)
    assert str(out) in str(err.value)
    assert _files(out) == before


def test_damaged_card_is_refused(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(registry, _pipeline_data(demo_dir, n=2), out)
    (out / "dataset.json").write_text("{not json")
    with pytest.raises(PipelineError, match="damaged"):
        _run(registry, _pipeline_data(demo_dir, n=2), out, resume=True)


def test_undeclared_label_is_refused_before_writing(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    data = {"run": {"n": 5, "batch_size": 4, "data": str(demo_dir)}, "mask_source": "real-pairs",
            "generator": {"name": "augment"}, "refiners": [{"name": "bad-label", "at": 2}]}
    out = tmp_path / "run"
    with pytest.raises(PipelineError) as err:
        _run(registry, data, out)
    msg = str(err.value)
    assert "sample 2" in msg and "[2]" in msg and "'augment'" in msg
    records = read_manifest(out / "manifest.jsonl")
    assert [r["index"] for r in records] == [0, 1]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["000000.png", "000001.png"]
    assert json.loads((out / "dataset.json").read_text())["status"] == "running"


def test_undeclared_label_in_the_first_pair_leaves_no_folder(registry: Registry, demo_dir: Path,
                                                             tmp_path: Path) -> None:
    data = {"run": {"n": 2, "data": str(demo_dir)}, "mask_source": "real-pairs", "generator": {"name": "augment"},
            "refiners": [{"name": "bad-label", "at": 0}]}
    with pytest.raises(PipelineError, match="labels \\[2\\]"):
        _run(registry, data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- max_candidates -----------------------------------------------------------------------------------


def test_too_many_candidates_with_nothing_kept_leaves_no_folder(registry: Registry, demo_dir: Path,
                                                                tmp_path: Path) -> None:
    data = _pipeline_data(demo_dir, n=2, max_candidates=5)
    data["filters"] = [{"name": "mask-area", "min_fraction": 0.95, "max_fraction": 1.0}]
    out = tmp_path / "run"
    with pytest.raises(PipelineError) as err:
        _run(registry, data, out)
    msg = str(err.value)
    assert "only 0 of 2 pairs kept after 5 candidates" in msg and "max_candidates" in msg
    assert not out.exists()


def test_default_candidate_limit_is_50_per_pair(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    data = _pipeline_data(demo_dir, n=1, batch_size=16)
    data["filters"] = [{"name": "mask-area", "min_fraction": 0.95, "max_fraction": 1.0}]
    with pytest.raises(PipelineError, match="only 0 of 1 pairs kept after 50 candidates"):
        _run(registry, data, tmp_path / "run")


def test_too_many_candidates_keeps_partial_work_for_resume(registry: Registry, demo_dir: Path, reference: Path,
                                                           tmp_path: Path) -> None:
    reference_records = read_manifest(reference / "manifest.jsonl")
    out = tmp_path / "run"
    with pytest.raises(PipelineError, match=f"of {N} pairs kept after {N} candidates"):
        _run(registry, _pipeline_data(demo_dir, max_candidates=N), out)
    records = read_manifest(out / "manifest.jsonl")
    assert len(records) == N and 0 < sum(r["kept"] for r in records) < N
    assert records == reference_records[:len(records)]
    # the limit is not part of the fingerprint: raising it finishes the same run
    _run(registry, _pipeline_data(demo_dir), out, resume=True)
    assert _files(out) == _files(reference)


# --- resuming -------------------------------------------------------------------------------------------


def _kill_in_generator(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """The process dies while generating the batch that holds sample index k."""
    original = AugmentGenerator.generate
    doomed = sample_seed(0, k)

    def generate(self, conditions, seeds):
        if doomed in seeds:
            raise Killed
        return original(self, conditions, seeds)

    monkeypatch.setattr(AugmentGenerator, "generate", generate)


def _kill_on_write(monkeypatch: pytest.MonkeyPatch, name: str, k: int, leave_temp: bool) -> None:
    """The k-th call of runner.<name> dies (optionally leaving a half-written temporary file)."""
    original = getattr(runner, name)
    calls = []

    def write(path: Path, array: np.ndarray) -> None:
        calls.append(path)
        if len(calls) == k:
            if leave_temp:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                (Path(path).parent / ".tmp-half.png").write_bytes(b"\x89PNG\r\n")
            raise Killed
        original(path, array)

    monkeypatch.setattr(runner, name, write)


def _kill_on_append(monkeypatch: pytest.MonkeyPatch, k: int, written: str, kept: bool | None = True) -> None:
    """The k-th append of a (kept/dropped/any) record dies having written ``written`` of its line."""
    original = ManifestWriter.append
    calls = []

    def append(self: ManifestWriter, record: dict[str, Any]) -> None:
        if kept is None or record["kept"] == kept:
            calls.append(record["index"])
            if len(calls) == k:
                line = (json.dumps(record, sort_keys=True) + "\n").encode()
                cut = {"none": 0, "half": len(line) // 2, "no-newline": len(line) - 1}[written]
                self._fh.write(line[:cut])
                self._fh.flush()
                os.fsync(self._fh.fileno())
                raise Killed
        original(self, record)

    monkeypatch.setattr(ManifestWriter, "append", append)


def _kill_on_final_card(monkeypatch: pytest.MonkeyPatch) -> None:
    original = runner.write_json_atomic

    def write(path: Path, obj: Any) -> None:
        if obj.get("status") == "complete":
            (Path(path).parent / ".tmp-card.json").write_text("{")
            raise Killed
        original(path, obj)

    monkeypatch.setattr(runner, "write_json_atomic", write)


KILLS = {
    "generator-first-batch": lambda mp: _kill_in_generator(mp, 0),
    "generator-later-batch": lambda mp: _kill_in_generator(mp, 7),
    "keyboard-interrupt": None,  # see test body
    "after-image-before-mask": lambda mp: _kill_on_write(mp, "write_png_mask", 3, leave_temp=False),
    "mid-mask-write": lambda mp: _kill_on_write(mp, "write_png_mask", 2, leave_temp=True),
    "mid-image-write": lambda mp: _kill_on_write(mp, "write_png_image", 4, leave_temp=True),
    "after-files-before-manifest": lambda mp: _kill_on_append(mp, 2, "none"),
    "torn-manifest-line": lambda mp: _kill_on_append(mp, 3, "half"),
    "manifest-line-without-newline": lambda mp: _kill_on_append(mp, 4, "no-newline"),
    "torn-dropped-record": lambda mp: _kill_on_append(mp, 2, "half", kept=False),
    "first-record-torn": lambda mp: _kill_on_append(mp, 1, "half", kept=None),
    "final-card": _kill_on_final_card,
}


@pytest.mark.parametrize("resume_batch_size", [3, 2])
@pytest.mark.parametrize("kill", sorted(KILLS))
def test_resume_after_a_kill_gives_the_uninterrupted_run(
        registry: Registry, demo_dir: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        kill: str, resume_batch_size: int) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        if kill == "keyboard-interrupt":
            original = runner._write_pair
            pairs: list[int] = []

            def write_pair(out_: Path, index: int, sample: Sample, encoded=None):
                pairs.append(index)
                if len(pairs) == 3:
                    raise KeyboardInterrupt
                return original(out_, index, sample, encoded)

            mp.setattr(runner, "_write_pair", write_pair)
            expected: type[BaseException] = KeyboardInterrupt
        else:
            KILLS[kill](mp)
            expected = Killed
        with pytest.raises(expected):
            _run(registry, _pipeline_data(demo_dir), out)

    if out.exists():
        killed = read_manifest(out / "manifest.jsonl")
        assert sum(r["kept"] for r in killed) <= N
        if kill != "final-card":
            assert sum(r["kept"] for r in killed) < N, "the kill must interrupt the run"
            assert json.loads((out / "dataset.json").read_text())["status"] == "running"
        assert killed == read_manifest(reference / "manifest.jsonl")[:len(killed)]

    result = _run(registry, _pipeline_data(demo_dir, batch_size=resume_batch_size), out, resume=True)

    assert result.kept == N
    _assert_consistent(out, N)
    assert _files(out) == _files(reference)
    assert _card(out, "batch_size") == _card(reference, "batch_size")
    assert result.dropped == _card(reference)["dropped"]


def test_the_kill_points_really_damage_the_folder(registry: Registry, demo_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the test above: the simulated kills leave the leftovers that resuming must clean."""
    cases = [
        ("after-image-before-mask", lambda out: any((out / "images").iterdir()) and len(
            list((out / "images").iterdir())) > len(list((out / "masks").iterdir()))),
        ("mid-mask-write", lambda out: _leftovers(out) == ["masks/.tmp-half.png"]),
        ("torn-manifest-line", lambda out: not (out / "manifest.jsonl").read_bytes().endswith(b"\n")),
        ("manifest-line-without-newline", lambda out: (out / "manifest.jsonl").read_bytes().endswith(b"}")),
        ("after-files-before-manifest", lambda out: len(list((out / "masks").iterdir())) == 2),
        ("final-card", lambda out: _leftovers(out) == [".tmp-card.json"]),
    ]
    for kill, check in cases:
        out = tmp_path / kill
        with monkeypatch.context() as mp:
            KILLS[kill](mp)
            with pytest.raises(Killed):
                _run(registry, _pipeline_data(demo_dir), out)
        assert check(out), kill


def test_resume_cuts_only_a_torn_last_line(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(registry, _pipeline_data(demo_dir, n=3), out)
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    (out / "manifest.jsonl").write_bytes(b"".join(lines[:1]) + b'{"index": 9, "ke\n' + b"".join(lines[1:]))
    with pytest.raises(PipelineError, match="line 2 is not valid JSON"):
        _run(registry, _pipeline_data(demo_dir, n=5), out, resume=True)


def test_resume_refuses_a_record_whose_files_are_gone(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(registry, _pipeline_data(demo_dir, n=3), out)
    kept = [r for r in read_manifest(out / "manifest.jsonl") if r["kept"]]
    (out / kept[1]["mask"]).unlink()
    with pytest.raises(PipelineError, match=f"record {kept[1]['index']} names files that are missing"):
        _run(registry, _pipeline_data(demo_dir, n=5), out, resume=True)


def test_resume_with_a_larger_n_extends_the_run(registry: Registry, demo_dir: Path, reference: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(registry, _pipeline_data(demo_dir, n=4), out)
    first = _files(out)
    _assert_consistent(out, 4)
    result = _run(registry, _pipeline_data(demo_dir, n=N, batch_size=5), out, resume=True)
    assert result.kept == N
    final = _files(out)
    assert {k: v for k, v in final.items() if k in first and k != "manifest.jsonl"} == \
        {k: v for k, v in first.items() if k != "manifest.jsonl"}
    assert final["manifest.jsonl"].startswith(first["manifest.jsonl"])
    assert final == _files(reference)
    assert _card(out, "batch_size") == _card(reference, "batch_size")


def test_resume_after_kill_and_with_a_larger_n(registry: Registry, demo_dir: Path, reference: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        _kill_on_append(mp, 3, "half")
        with pytest.raises(Killed):
            _run(registry, _pipeline_data(demo_dir, n=5), out)
    _run(registry, _pipeline_data(demo_dir, n=5, batch_size=1), out, resume=True)
    _assert_consistent(out, 5)
    _run(registry, _pipeline_data(demo_dir, n=N), out, resume=True)
    assert _files(out) == _files(reference)


def test_resume_of_a_never_started_folder(registry: Registry, demo_dir: Path, reference: Path,
                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(registry, _pipeline_data(demo_dir), out, resume=True)
    assert _files(out) == _files(reference)


def test_resume_with_a_smaller_n_deletes_the_orphans_of_the_kill(registry: Registry, demo_dir: Path,
                                                                 reference: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        _kill_on_append(mp, 3, "none")  # the third kept pair's files are written, its record is not
        with pytest.raises(Killed):
            _run(registry, _pipeline_data(demo_dir), out)
    assert len(list((out / "masks").iterdir())) == 3
    result = _run(registry, _pipeline_data(demo_dir, n=2), out, resume=True)
    assert result.kept == 2
    kept = [r for r in read_manifest(out / "manifest.jsonl") if r["kept"]]
    assert len(kept) == 2
    on_disk = {p.relative_to(out).as_posix() for sub in ("images", "masks") for p in (out / sub).iterdir()}
    assert on_disk == {r[key] for r in kept for key in ("image", "mask")}
    reference_files = _files(reference)
    assert all(reference_files[name] == (out / name).read_bytes() for name in on_disk)
