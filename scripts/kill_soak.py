"""Soak test of resumability: a long run killed with SIGKILL at random moments, resumed each time.

At the end the run must hold exactly the requested pairs, its manifest must name exactly the files
on disk, and (unless ``--no-reference``) every file must equal an uninterrupted run's. The test
suite runs a small version of this (tests/test_kill_resume.py); this is the large one.

    python scripts/kill_soak.py --pairs 5000 --kills 40              # tens of minutes on 2 cores
    python scripts/kill_soak.py --pairs 2000 --kills 20 --processes 2
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def command(data: Path, out: Path, pairs: int, processes: int, resume: bool) -> list[str]:
    """The run being soaked: augmentation with an area filter that drops some candidates."""
    return [sys.executable, "-m", "medsynth_cli", "-q", "run", "--generator", "augment", "--mask-source",
            "real-pairs", "--filter", "mask-area", "--set", "mask-area.min_fraction=0.2", "--data", str(data),
            "--out", str(out), "-n", str(pairs), "--batch-size", "16", "--device", "cpu",
            "--processes", str(processes), *(["--resume"] if resume else [])]


def files(out: Path) -> dict[str, bytes]:
    """Every file of a run folder but its card (which holds timestamps)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "dataset.json"}


def decided(out: Path) -> int:
    """Manifest records of a run folder, its shards' included."""
    manifests = [out / "manifest.jsonl", *out.glob("shards/rank-*/manifest.jsonl")]
    return sum(p.read_bytes().count(b"\n") for p in manifests if p.is_file())


def check(out: Path, pairs: int) -> None:
    """The run holds exactly ``pairs`` kept pairs and its manifest names exactly its files."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from medsynth_core.manifest import read_manifest

    records = read_manifest(out / "manifest.jsonl")
    kept = [r for r in records if r["kept"]]
    assert len(kept) == pairs, f"{len(kept)} kept pairs, not {pairs}"
    assert [r["index"] for r in records] == list(range(len(records))), "indices are not 0..N-1 once each"
    named = {r[k] for r in kept for k in ("image", "mask")}
    on_disk = {p.relative_to(out).as_posix() for sub in ("images", "masks") for p in (out / sub).iterdir()}
    assert named == on_disk, f"{len(on_disk ^ named)} files differ between the manifest and the disk"
    assert not (out / "shards").exists(), "shards were not merged"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=40, help="SIGKILLs before the run is let finish.")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--min-wait", type=float, default=3.0, help="Shortest life of a run, seconds.")
    parser.add_argument("--max-wait", type=float, default=12.0, help="Longest life of a run, seconds.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="Skip the uninterrupted run.")
    parser.add_argument("--keep", type=Path, help="Keep the runs in this folder.")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="medsynth-soak-"))
    data, soaked, reference = work / "demo", work / "soaked", work / "reference"
    subprocess.run([sys.executable, "-m", "medsynth_cli", "-q", "demo-data", str(data)], check=True)
    rng = random.Random(args.seed)
    kills, started = 0, time.monotonic()
    while True:
        proc = subprocess.Popen(command(data, soaked, args.pairs, args.processes, soaked.exists()),
                                start_new_session=True)
        if kills >= args.kills:
            if proc.wait() != 0:
                raise SystemExit("the final, unkilled run failed")
            break
        try:
            proc.wait(timeout=rng.uniform(args.min_wait, args.max_wait))
            if proc.returncode != 0:
                raise SystemExit(f"a run failed with status {proc.returncode} after {kills} kills")
            break  # finished before its kill
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            print(f"kill {kills}: {decided(soaked)} manifest records on disk", flush=True)
    soak_seconds = time.monotonic() - started
    check(soaked, args.pairs)
    print(f"{kills} kills, {soak_seconds:.0f} s: {args.pairs} pairs, manifest and files agree")
    if not args.no_reference:
        subprocess.run(command(data, reference, args.pairs, 1, False), check=True)
        differ = sorted(k for k in files(reference).keys() | files(soaked).keys()
                        if files(reference).get(k) != files(soaked).get(k))
        if differ:
            raise SystemExit(f"{len(differ)} files differ from the uninterrupted run, e.g. {differ[0]}")
        print("every file equals the uninterrupted run's")
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
