"""The run manifest: ``manifest.jsonl``, one JSON record per decided sample.

A record is appended only after the pair's files are in place, so the manifest is the truth
about a run folder: files it does not name are leftovers of a killed run. A torn last line
(the process died while writing it) is dropped when the manifest is read for resuming.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import PipelineError


def read_manifest(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Read every complete record; with ``repair``, cut a torn last line off the file."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records: list[dict[str, Any]] = []
    good_bytes = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number != len(lines):
                raise PipelineError(f"{path}: line {number} is not valid JSON; the manifest is damaged") from None
            break  # only a torn final line, with no newline after it, is a killed write
        good_bytes += len(line) + 1
    if repair and good_bytes < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(min(good_bytes, len(raw)))
    elif repair and raw and not raw.endswith(b"\n"):
        with open(path, "ab") as fh:
            fh.write(b"\n")  # a complete last record that lost its newline: keep it, end the line
    return records


class ManifestWriter:
    """Appends records durably: each line is flushed and synced before the call returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "ab")  # noqa: SIM115 - held open for the whole run

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line."""
        self._fh.write((json.dumps(record, sort_keys=True) + "\n").encode())
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file."""
        self._fh.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
