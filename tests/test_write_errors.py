"""Disk-full and permission errors while writing pairs: one line, a consistent folder, a clean resume."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import medsynth_core.image_io as image_io
from medsynth_cli.app import app
from medsynth_core.atomic import TMP_PREFIX, write_atomic
from medsynth_core.manifest import read_manifest

runner = CliRunner()


def _run(demo: Path, out: Path, *extra: str):
    args = ["run", "--generator", "augment", "--mask-source", "real-pairs", "--data", str(demo),
            "--out", str(out), "-n", "12", "--batch-size", "4", "--device", "cpu", *extra]
    return runner.invoke(app, args)


def _fail_on_write(monkeypatch: pytest.MonkeyPatch, call: int, code: int) -> None:
    """The ``call``-th file write stops half way with ``code``, as a full disk or a revoked right would."""
    calls = {"n": 0}

    def failing(path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] < call:
            write_atomic(path, lambda fh: fh.write(data))
            return

        def half(fh) -> None:
            fh.write(data[: len(data) // 2])
            raise OSError(code, os.strerror(code), str(path))

        write_atomic(path, half)

    monkeypatch.setattr(image_io, "write_bytes_atomic", failing)


def _consistent(out: Path) -> list[dict]:
    records = read_manifest(out / "manifest.jsonl")
    named = {r[k] for r in records if r["kept"] for k in ("image", "mask")}
    on_disk = {p.relative_to(out).as_posix() for sub in ("images", "masks") for p in (out / sub).iterdir()}
    assert on_disk == named, "the manifest names exactly the files on disk"
    assert not list(out.rglob(TMP_PREFIX + "*")), "no half-written file is left"
    return records


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_write_error_mid_run_says_one_line_and_leaves_a_resumable_folder(
        demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    reference = tmp_path / "reference"
    assert _run(demo_dir, reference).exit_code == 0
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        _fail_on_write(mp, call=9, code=code)  # the fifth pair's image
        result = _run(demo_dir, out)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert os.strerror(code) in lines[0] and "--resume" in lines[0]
    assert len(_consistent(out)) == 4
    assert _run(demo_dir, out, "--resume").exit_code == 0
    _consistent(out)
    for sub in ("images", "masks"):
        for path in (reference / sub).iterdir():
            assert (out / sub / path.name).read_bytes() == path.read_bytes()


def test_write_error_before_any_pair_leaves_nothing(demo_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    _fail_on_write(monkeypatch, call=1, code=errno.ENOSPC)
    result = _run(demo_dir, out)
    assert result.exit_code == 2 and "nothing was kept" in result.output
    assert not out.exists()
