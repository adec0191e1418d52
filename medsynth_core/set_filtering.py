"""Filters of ``scope = "set"``: judge every generated pair at once, after generation.

The candidates are the pairs that passed the per-sample filters. Their verdicts are written
into the manifest in one atomic rewrite, then the files of dropped pairs move to ``dropped/``
(kept ones back to ``images/`` and ``masks/``). Both steps can be repeated, so a run killed
between them, or resumed with a larger ``n``, is judged again from the same candidates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic
from .dataset import Dataset
from .errors import PipelineError
from .image_io import read_image, read_mask, write_png_image, write_png_mask
from .roles import Filter
from .sample import Sample

DROPPED = "dropped"


def is_candidate(record: dict[str, Any]) -> bool:
    """Whether a manifest record is a written pair (kept, or dropped by a set filter)."""
    return "image" in record


def kept_path(relative: str) -> str:
    """``images/x.png`` for either location of a pair's file."""
    return relative.removeprefix(DROPPED + "/")


def dropped_path(relative: str) -> str:
    """``dropped/images/x.png`` for either location of a pair's file."""
    return DROPPED + "/" + kept_path(relative)


def apply_set_filters(out: Path, records: list[dict[str, Any]], filters: Sequence[Filter],
                      allowed: frozenset[int], manifest: Path) -> list[dict[str, Any]]:
    """Judge all candidates with ``filters`` in order; rewrite ``manifest``; place the files."""
    names = {f.name for f in filters}
    candidates = [_reset(r, names) for r in records if is_candidate(r)]
    alive = list(range(len(candidates)))
    for flt in filters:
        samples = _lazy_samples(out, [candidates[k] for k in alive], allowed)
        with flt.context.progress.task(f"judging the whole set with {flt.name}", total=1) as task:
            verdicts = flt.judge(samples)
            task.advance()
        if len(verdicts) != len(alive):
            raise PipelineError(f"filter {flt.name!r} returned {len(verdicts)} verdicts for {len(alive)} samples")
        for k, verdict in zip(alive, verdicts):
            record = candidates[k]
            record["scores"][flt.name] = float(verdict.score)
            if verdict.note:
                record.setdefault("notes", {})[flt.name] = verdict.note
            if verdict.sample is not None:
                _rewrite_pair(out, record, verdict.sample)
            if not verdict.keep:
                record.update(kept=False, dropped_by=flt.name)
        alive = [k for k, v in zip(alive, verdicts) if v.keep]
    for record in candidates:
        where = kept_path if record["kept"] else dropped_path
        record["image"], record["mask"] = where(record["image"]), where(record["mask"])
    by_index = {r["index"]: r for r in records}
    by_index.update({r["index"]: r for r in candidates})
    final = [by_index[i] for i in sorted(by_index)]
    write_bytes_atomic(manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in final).encode())
    place_files(out, final)
    return final


def place_files(out: Path, records: list[dict[str, Any]]) -> None:
    """Move each candidate's files to where its record says (``images/`` or ``dropped/images/``)."""
    for record in records:
        if not is_candidate(record):
            continue
        for key in ("image", "mask"):
            target = out / record[key]
            if target.is_file():
                continue
            other = out / (kept_path(record[key]) if record[key].startswith(DROPPED) else dropped_path(record[key]))
            if other.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(other, target)


def _reset(record: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """A candidate as it stood before any set filter judged it."""
    record = json.loads(json.dumps(record))
    record["scores"] = {k: v for k, v in record.get("scores", {}).items() if k not in names}
    if record.get("dropped_by") in names:
        record.pop("dropped_by")
        record["kept"] = True
    notes = {k: v for k, v in record.pop("notes", {}).items() if k not in names}
    if notes:
        record["notes"] = notes
    return record


def _lazy_samples(out: Path, records: list[dict[str, Any]], allowed: frozenset[int]) -> Dataset:
    def loader(record: dict[str, Any]):
        def load() -> Sample:
            image, mask = (_located(out, record[k]) for k in ("image", "mask"))
            meta = {"index": record["index"], "seed": record["seed"], **record.get("meta", {})}
            return Sample(image=read_image(image), mask=read_mask(mask, allowed), meta=meta)
        return load

    return Dataset([loader(r) for r in records], name=out.name, cache=False)


def _located(out: Path, relative: str) -> Path:
    for candidate in (out / relative, out / kept_path(relative), out / dropped_path(relative)):
        if candidate.is_file():
            return candidate
    raise PipelineError(f"{out / relative}: file of a generated pair is missing")


def _rewrite_pair(out: Path, record: dict[str, Any], sample: Sample) -> None:
    sample.check(f"sample {record['index']}")
    write_png_image(_located(out, record["image"]), sample.image)
    write_png_mask(_located(out, record["mask"]), sample.mask)
