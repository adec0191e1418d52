"""Tests of the run manifest (manifest.jsonl) and of all-or-nothing file writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsynth_core import PipelineError
from medsynth_core.atomic import (
    TMP_PREFIX,
    atomic_path,
    remove_temporaries,
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
)
from medsynth_core.manifest import ManifestWriter, read_manifest

RECORDS = [
    {"index": 0, "kept": True, "image": "images/000000.png", "seed": 11, "scores": {"mask-area": 0.2}},
    {"index": 1, "kept": False, "dropped_by": "mask-area", "seed": 12},
    {"index": 2, "kept": True, "image": "images/000002.png", "seed": 13, "note": "ünïcödé"},
]


def _lines(records: list[dict]) -> bytes:
    return b"".join((json.dumps(r) + "\n").encode() for r in records)


# --- manifest -----------------------------------------------------------------------------------


def test_append_then_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as writer:
        for rec in RECORDS:
            writer.append(rec)
    assert read_manifest(path) == RECORDS
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == len(RECORDS)


def test_writer_appends_to_an_existing_manifest(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as writer:
        writer.append(RECORDS[0])
    with ManifestWriter(path) as writer:
        writer.append(RECORDS[1])
        # Each append is on disk before it returns, not only at close.
        assert read_manifest(path) == RECORDS[:2]
    assert read_manifest(path) == RECORDS[:2]


def test_missing_manifest_reads_empty(tmp_path: Path) -> None:
    assert read_manifest(tmp_path / "manifest.jsonl") == []
    assert read_manifest(tmp_path / "manifest.jsonl", repair=True) == []
    assert not (tmp_path / "manifest.jsonl").exists()


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b"\n" + _lines(RECORDS[:1]) + b"  \n\n" + _lines(RECORDS[1:]))
    assert read_manifest(path) == RECORDS


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    good = _lines(RECORDS[:2])
    path.write_bytes(good + b'{"index": 2, "kept": tr')
    assert read_manifest(path) == RECORDS[:2]
    assert path.read_bytes() == good + b'{"index": 2, "kept": tr'  # reading alone changes nothing


def test_repair_cuts_the_torn_line_so_appends_stay_valid(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    good = _lines(RECORDS[:2])
    path.write_bytes(good + b'{"index": 2, "kept": tr')
    assert read_manifest(path, repair=True) == RECORDS[:2]
    assert path.read_bytes() == good
    with ManifestWriter(path) as writer:
        writer.append(RECORDS[2])
    assert read_manifest(path) == RECORDS


def test_repair_of_a_torn_first_line_empties_the_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'{"ind')
    assert read_manifest(path, repair=True) == []
    assert path.read_bytes() == b""


def test_complete_last_record_without_newline_survives_repair_and_append(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(_lines(RECORDS[:2]).rstrip(b"\n"))  # killed between the record and its newline
    assert read_manifest(path, repair=True) == RECORDS[:2]
    with ManifestWriter(path) as writer:
        writer.append(RECORDS[2])
    assert read_manifest(path) == RECORDS


def test_repair_leaves_a_sound_manifest_alone(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(_lines(RECORDS))
    assert read_manifest(path, repair=True) == RECORDS
    assert path.read_bytes() == _lines(RECORDS)


@pytest.mark.parametrize("repair", [False, True])
def test_damaged_middle_line_raises(tmp_path: Path, repair: bool) -> None:
    path = tmp_path / "manifest.jsonl"
    damaged = _lines(RECORDS[:1]) + b"{garbage\n" + _lines(RECORDS[1:])
    path.write_bytes(damaged)
    with pytest.raises(PipelineError, match="line 2 is not valid JSON") as err:
        read_manifest(path, repair=repair)
    assert str(path) in str(err.value)
    assert path.read_bytes() == damaged  # never "repaired" by cutting good records


def test_torn_line_followed_by_a_newline_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(_lines(RECORDS[:1]) + b'{"index": 1\n')
    with pytest.raises(PipelineError, match="line 2"):
        read_manifest(path)


# --- atomic writes ------------------------------------------------------------------------------


def test_write_atomic_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "card.json"
    write_atomic(path, lambda fh: fh.write(b"old"))
    write_atomic(path, lambda fh: fh.write(b"new"))
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["card.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    path.write_bytes(b"old")

    def half_then_fail(fh) -> None:
        fh.write(b"half of the new cont")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json"]


def test_failed_write_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "new.png"
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_bytes(b"partial")
        assert tmp.name.startswith(TMP_PREFIX) and tmp.parent == tmp_path
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_write_bytes_and_json_atomic(tmp_path: Path) -> None:
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    obj = {"name": "demo", "labels": {"background": 0, "lung": 1}, "sizes": [1, 2]}
    write_json_atomic(tmp_path / "a.json", obj)
    assert json.loads((tmp_path / "a.json").read_text()) == obj
    assert (tmp_path / "a.json").read_text().endswith("\n")


def test_remove_temporaries(tmp_path: Path) -> None:
    (tmp_path / f"{TMP_PREFIX}abc.png").write_bytes(b"x")
    (tmp_path / f"{TMP_PREFIX}def").write_bytes(b"y")
    (tmp_path / "keep.png").write_bytes(b"z")
    (tmp_path / "tmp-not-ours.png").write_bytes(b"z")
    assert remove_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png", "tmp-not-ours.png"]
    assert remove_temporaries(tmp_path) == 0
    assert remove_temporaries(tmp_path / "missing") == 0


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    """A temporary file is private (0600); the finished file has the mode a plain open() gives."""
    target = tmp_path / "pair.png"
    write_bytes_atomic(target, b"x")
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
