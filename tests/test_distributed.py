"""Runs split over processes (accelerate launch, gloo on CPU) make the pairs of a single process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medsynth_core import PipelineError
from medsynth_core.manifest import read_manifest
from medsynth_core.runner import _Plan

N = 40


def _command(demo: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medsynth_cli", "-q", "run", "--generator", "augment", "--mask-source",
            "real-pairs", "--filter", "mask-area", "--set", "mask-area.min_fraction=0.2", "--data", str(demo),
            "--out", str(out), "-n", str(N), "--batch-size", "3", "--device", "cpu", *extra]


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "dataset.json"}


@pytest.fixture(scope="module")
def reference(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    subprocess.run(_command(demo_dir, out), check=True, timeout=300)
    return out


def test_two_processes_make_the_pairs_of_one(demo_dir: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    subprocess.run(_command(demo_dir, out, "--processes", "2"), check=True, timeout=300)
    assert not (out / "shards").exists(), "the shards are merged away"
    records = read_manifest(out / "manifest.jsonl")
    assert sum(r["kept"] for r in records) == N
    assert _files(out) == _files(reference)
    card = json.loads((out / "dataset.json").read_text())
    assert card["status"] == "complete" and card["pairs"] == N


def test_killed_two_process_run_resumes_to_the_same_pairs(demo_dir: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(demo_dir, out, "--processes", "2"), start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # kill once both shards hold pairs
        shards = [out / "shards" / f"rank-{r}" / "manifest.jsonl" for r in (0, 1)]
        if all(p.is_file() and p.stat().st_size > 0 for p in shards):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode != 0, "the run must be killed before it ends for the test to mean anything"
    subprocess.run(_command(demo_dir, out, "--processes", "2", "--resume"), check=True, timeout=300)
    assert _files(out) == _files(reference)


def test_one_process_fills_the_gaps_of_a_killed_group(demo_dir: Path, reference: Path, tmp_path: Path) -> None:
    """Rank 1 finished indices 3-5 and 9-11, rank 0 died before writing any: resume alone."""
    out = tmp_path / "gaps"
    shard = out / "shards" / "rank-1"
    (shard / "images").mkdir(parents=True)
    (shard / "masks").mkdir()
    shutil.copy(reference / "dataset.json", out / "dataset.json")
    lines = []
    for record in read_manifest(reference / "manifest.jsonl"):
        if record["index"] in (3, 4, 5, 9, 10, 11):
            lines.append(json.dumps(record, sort_keys=True))
            if record["kept"]:
                for key in ("image", "mask"):
                    shutil.copy(reference / record[key], shard / record[key])
    (shard / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (shard / "images" / "999999.png").write_bytes(b"half")  # a pair killed mid-write
    subprocess.run(_command(demo_dir, out, "--resume"), check=True, timeout=300)
    assert _files(out) == _files(reference)


def test_plan_fills_gaps_first_and_stops_at_the_nth_candidate() -> None:
    plan = _Plan({2: True, 3: False, 6: True}, n=3, limit=100)
    assert plan.next_indices(4) == [0, 1, 4, 5]
    for index, candidate in ((0, True), (1, False), (4, True), (5, False)):
        plan.add(index, candidate)
    assert plan.done()
    assert plan.next_indices(4) is None


def test_plan_needs_only_the_gaps_below_the_nth_candidate() -> None:
    plan = _Plan({0: True, 2: True, 3: True, 7: True}, n=3, limit=100)
    assert plan.next_indices(8) == [1]
    plan.add(1, True)
    assert plan.done()


def test_plan_says_when_the_candidates_run_out() -> None:
    plan = _Plan({i: False for i in range(10)}, n=2, limit=10)
    with pytest.raises(PipelineError, match="only 0 of 2 pairs kept after 10 candidates"):
        plan.next_indices(4)
