"""A real process killed with SIGKILL at random moments, resumed each time, ends with exactly the pairs of an
uninterrupted run (the small-scale version of scripts/kill_soak.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from medsynth_core.manifest import read_manifest

N = 120


def _command(demo: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medsynth_cli", "-q", "run", "--generator", "augment", "--mask-source",
            "real-pairs", "--filter", "mask-area", "--set", "mask-area.min_fraction=0.2", "--data", str(demo),
            "--out", str(out), "-n", str(N), "--batch-size", "4", "--device", "cpu", *extra]


def _files(out: Path) -> dict[str, bytes]:
    found = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != "dataset.json"}
    assert not [name for name in found if ".tmp-" in name], "no temporary file survives"
    return found


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(demo_dir: Path, tmp_path: Path) -> None:
    subprocess.run(_command(demo_dir, tmp_path / "reference"), check=True, timeout=300)
    rng = random.Random(7)
    out = tmp_path / "killed"
    kills = 0
    for _ in range(12):
        extra = ("--resume",) if out.exists() else ()
        proc = subprocess.Popen(_command(demo_dir, out, *extra), start_new_session=True)
        try:
            proc.wait(timeout=rng.uniform(1.5, 4.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0
        break
    else:
        subprocess.run(_command(demo_dir, out, "--resume"), check=True, timeout=300)
    assert kills >= 1, "the test must kill the run at least once to mean anything"
    records = read_manifest(out / "manifest.jsonl")
    assert sum(r["kept"] for r in records) == N
    assert [r["index"] for r in records] == list(range(len(records)))
    assert _files(out) == _files(tmp_path / "reference")
