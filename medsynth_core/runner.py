"""The pipeline runner: generate, refine, filter, write and evaluate, resumably.

Sample ``i`` is drawn with ``sample_seed(run.seed, i)`` alone, so the pairs do not depend on the
batch size. Pairs are decided in index order and the run stops at exactly ``n`` kept pairs,
so an interrupted run resumed with ``resume=True`` ends with the same pairs as an
uninterrupted one: files are written atomically, and a pair counts only once its manifest
record is on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import remove_temporaries, write_bytes_atomic, write_json_atomic
from .batches import BatchMaker, Encoded, Pending, prepare_networks, stage_record
from .dataset import BINARY_LABELS, Dataset, open_dataset
from .distributed import Processes, current_processes
from .errors import PipelineError
from .image_io import write_png_image, write_png_mask
from .manifest import ManifestWriter, read_manifest
from .pipeline import Pipeline
from .provenance import now_iso, package_version, software_versions
from .report import EvaluatorResult, evaluate, write_report
from .sample import Sample
from .set_filtering import DROPPED, apply_set_filters, is_candidate, place_files

CARD = "dataset.json"
MANIFEST = "manifest.jsonl"
SHARDS = "shards"
CANDIDATE_FACTOR = 50


@dataclass
class RunResult:
    """What a run left in its folder."""

    out: Path
    kept: int
    dropped: int
    dropped_by: dict[str, int] = field(default_factory=dict)
    results: list[EvaluatorResult] = field(default_factory=list)


def run_pipeline(pipeline: Pipeline, out: str | Path | None = None, *, resume: bool = False,
                 real: Dataset | None = None, processes: Processes | None = None) -> RunResult:
    """Run ``pipeline`` into ``out`` (default ``[run] out``), resuming a killed run if asked.

    ``real`` may pass an already opened real dataset; otherwise ``[run] data`` is opened.
    ``processes`` (default: the group this process was launched in) splits the sample indices
    over several processes; the merged result is the one a single process makes.
    Raises PipelineError for a non-empty ``out`` without ``resume``, or a ``resume`` of a folder
    made by a different pipeline. A run that fails before its first pair removes ``out``.
    """
    spec = pipeline.spec
    procs = processes or current_processes()
    out = Path(out or spec.run.out or "")
    if not str(out) or out == Path("."):
        raise PipelineError("no output folder: set [run] out or pass --out")
    if real is None and spec.run.data:
        real = pipeline.open_real()
    if real is not None and pipeline.needs_data:
        real.validate(pipeline.generator.context.progress)

    fresh, error = None, None
    if procs.is_main:
        try:
            fresh = _prepare_folder(out, pipeline, resume)
        except PipelineError as err:
            error = err
    procs.agree(error)
    try:
        return _run(pipeline, out, real, procs)
    except BaseException as err:
        discarded = procs.is_main and fresh is not None and not any(r["kept"] for r in _all_records(out))
        if discarded:
            _discard(out, fresh)  # nothing worth resuming: leave no half-made folder
        if isinstance(err, OSError):  # disk full, permission denied, ...
            where = f"{err.filename}: " if err.filename else ""
            state = (f"nothing was kept, {out} is removed" if discarded else
                     f"the pairs in {out} are consistent; fix this and continue with --resume")
            raise PipelineError(f"{where}{err.strerror or err}; {state}") from None
        raise


def _run(pipeline: Pipeline, out: Path, real: Dataset | None, procs: Processes) -> RunResult:
    spec = pipeline.spec
    labels = real.labels if real is not None else BINARY_LABELS
    error = None
    if procs.is_main:
        try:
            records = _consolidate(out, spec.run.n, starting=True)
            _write_card(out, pipeline, labels, records, status="running")
        except PipelineError as err:
            error = err
    procs.agree(error)

    if pipeline.mask_source is not None and pipeline.mask_source.needs_data:
        pipeline.mask_source.fit(real)
    for flt in pipeline.filters:
        if flt.needs_data:
            flt.fit(real)
    if pipeline.generator.trainable:
        pipeline.generator.load(Path(spec.checkpoint))
    prepare_networks(pipeline)

    allowed = frozenset(labels.values()) | {0}
    _generate(pipeline, out, allowed, procs)
    procs.finish()
    if not procs.is_main:
        return RunResult(out, kept=0, dropped=0)  # the main process merges, filters and reports

    records = _consolidate(out, spec.run.n)
    set_filters = [f for f in pipeline.filters if f.scope == "set"]
    if set_filters and any(f.name not in r["scores"] for r in records if is_candidate(r) for f in set_filters):
        records = apply_set_filters(out, records, set_filters, allowed, out / MANIFEST)
    dropped_by: dict[str, int] = {}
    for r in records:
        if not r["kept"]:
            dropped_by[r["dropped_by"]] = dropped_by.get(r["dropped_by"], 0) + 1
    results: list[EvaluatorResult] = []
    if pipeline.evaluators:
        synthetic = open_dataset(out, labels=labels)
        results = evaluate(pipeline.evaluators, real, synthetic)
        write_report(out, real, results, synthetic=[synthetic])
    _write_card(out, pipeline, labels, records, status="complete")
    kept = sum(1 for r in records if r["kept"])
    return RunResult(out, kept, sum(dropped_by.values()), dropped_by, results)


def _generate(pipeline: Pipeline, out: Path, allowed: frozenset[int], procs: Processes) -> None:
    """Decide sample indices in rounds until the first ``n`` candidates are all decided.

    Each round takes the lowest undecided indices, ``batch_size`` per process; a process writes
    its pairs and records into its own shard (``out`` itself when it works alone), then all
    processes learn which indices were decided and which became candidates.
    """
    spec = pipeline.spec
    ctx = pipeline.generator.context
    decided = {r["index"]: is_candidate(r) for r in read_manifest(out / MANIFEST)}
    limit = spec.run.max_candidates or CANDIDATE_FACTOR * spec.run.n
    root = out if procs.world == 1 else out / SHARDS / f"rank-{procs.rank}"
    root.mkdir(parents=True, exist_ok=True)
    plan = _Plan(decided, spec.run.n, limit)
    with ManifestWriter(root / MANIFEST) as manifest, BatchMaker(pipeline, spec.run.workers) as maker, \
            ctx.progress.task(f"generating with {pipeline.generator.name}", total=spec.run.n) as bar:
        shown = plan.candidates()
        bar.advance(shown)
        ahead: Pending | None = None  # the next round's batch, sampled while this one is refined
        while (todo := plan.next_indices(procs.world * spec.run.batch_size)) is not None:
            mine = _share(todo, procs, spec.run.batch_size)
            outcome, error = [], None
            try:
                current = ahead if ahead is not None and ahead.indices == mine else \
                    (maker.start(mine) if mine else None)
                ahead = None
                if maker.overlapping:
                    guess = _share(plan.following(todo, procs.world * spec.run.batch_size), procs, spec.run.batch_size)
                    ahead = maker.start(guess) if guess else None
                for index, sample, verdicts, encoded in (maker.finish(current) if current else ()):
                    record = _record(index, sample, verdicts)
                    if record["kept"]:
                        _check_labels(sample, allowed, pipeline)
                        record["image"], record["mask"] = _write_pair(root, index, sample, encoded)
                    manifest.append(record)
                    outcome.append((index, record["kept"]))
                    if procs.world == 1:
                        plan.add(index, record["kept"])
                        if plan.done():
                            break  # alone, stop at the last pair needed: nothing past it is written
            except Exception as err:  # every process must hear of it, or the others wait forever
                error = err
            procs.agree(error)
            for part in procs.gather(outcome):
                for index, candidate in part:
                    plan.add(index, candidate)
            now = plan.candidates()
            bar.advance(now - shown)
            shown = now


def _share(todo: list[int], procs: Processes, batch_size: int) -> list[int]:
    """This process's part of a round: its own ``batch_size`` slice of the indices."""
    return todo[procs.rank * batch_size:(procs.rank + 1) * batch_size]


class _Plan:
    """Which sample indices to decide next, given the decided ones and the target ``n``."""

    def __init__(self, decided: dict[int, bool], n: int, limit: int) -> None:
        self.decided, self.n, self.limit = decided, n, limit
        self.count = sum(decided.values())  # candidates among the decided indices
        self._frontier = 0  # every index below it is decided

    def add(self, index: int, candidate: bool) -> None:
        """Record that ``index`` was decided."""
        if index not in self.decided:
            self.decided[index] = candidate
            self.count += candidate

    def candidates(self) -> int:
        """Candidates among the decided indices, counting at most ``n``."""
        return min(self.n, self.count)

    def done(self) -> bool:
        """Whether the first ``n`` candidates and every index before the last of them are decided."""
        while self._frontier in self.decided:
            self._frontier += 1
        return self.count >= self.n and self._frontier > _nth_candidate(self.decided, self.n)

    def next_indices(self, count: int) -> list[int] | None:
        """Up to ``count`` undecided indices that the first ``n`` candidates may need; None when done."""
        if self.done():
            return None
        upper = _nth_candidate(self.decided, self.n) if self.count >= self.n else self.limit
        todo = []
        index = self._frontier
        while len(todo) < count and index < upper:
            if index not in self.decided:
                todo.append(index)
            index += 1
        if not todo:
            raise PipelineError(
                f"only {self.candidates()} of {self.n} pairs kept after {self.limit} candidates; "
                "loosen the filters or raise [run] max_candidates")
        return todo

    def following(self, todo: list[int], count: int) -> list[int]:
        """A guess at the next round: the ``count`` undecided indices after ``todo``, were it decided."""
        guess: list[int] = []
        index = todo[-1] + 1 if todo else self._frontier
        while len(guess) < count and index < self.limit:
            if index not in self.decided:
                guess.append(index)
            index += 1
        return guess


def _nth_candidate(decided: dict[int, bool], n: int) -> int:
    return sorted(index for index, candidate in decided.items() if candidate)[n - 1]


def _consolidate(out: Path, n: int, *, starting: bool = False) -> list[dict[str, Any]]:
    """Fold shard manifests into the main one, drop what lies past the ``n``-th candidate, tidy files.

    Files move first, the main manifest is rewritten atomically next, the shards go last, so a
    kill at any moment leaves a folder this function can finish tidying. When ``starting``, a
    main manifest already past ``n`` (a finished run resumed with a smaller ``n``) is refused
    rather than cut, since that would delete finished pairs.
    """
    records = read_manifest(out / MANIFEST, repair=True)
    if starting and len(_first_candidates(records, n)) < len(records):
        held = sum(1 for r in records if is_candidate(r))
        raise PipelineError(f"{out}: already holds {held} pairs, more than n = {n}; "
                            f"resume with n of at least {held}, or choose another --out")
    shards = sorted((out / SHARDS).glob("rank-*")) if (out / SHARDS).is_dir() else []
    if shards:
        known = {r["index"] for r in records}
        for shard in shards:
            for record in read_manifest(shard / MANIFEST, repair=True):
                if record["index"] in known:
                    continue
                known.add(record["index"])
                records.append(record)
                if is_candidate(record):
                    for key in ("image", "mask"):
                        source, target = shard / record[key], out / record[key]
                        if source.is_file():
                            target.parent.mkdir(parents=True, exist_ok=True)
                            os.replace(source, target)
    ordered = sorted(records, key=lambda r: r["index"])
    trimmed = _first_candidates(ordered, n)
    if trimmed != records:
        write_bytes_atomic(out / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in trimmed).encode())
    for shard in shards:
        shutil.rmtree(shard, ignore_errors=True)
    if shards:
        shutil.rmtree(out / SHARDS, ignore_errors=True)
    place_files(out, trimmed)
    _remove_orphans(out, trimmed)
    _check_records(out, trimmed)
    return trimmed


def _first_candidates(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The records up to the ``n``-th candidate when every index before it is decided; else all."""
    count = 0
    for position, record in enumerate(records):
        if record["index"] != position:
            return records  # a gap: the run is not finished, nothing lies past its end yet
        count += is_candidate(record)
        if count == n:
            return records[:position + 1]
    return records


def _all_records(out: Path) -> list[dict[str, Any]]:
    """Records of the main manifest and of every shard, as they stand."""
    records = read_manifest(out / MANIFEST)
    if (out / SHARDS).is_dir():
        for shard in sorted((out / SHARDS).glob("rank-*")):
            records += read_manifest(shard / MANIFEST)
    return records


def _record(index: int, sample: Sample, verdicts: dict[str, Any]) -> dict[str, Any]:
    dropped_by = next((name for name, v in verdicts.items() if not v.keep), None)
    record: dict[str, Any] = {
        "index": index,
        "seed": sample.meta["seed"],
        "kept": dropped_by is None,
        "scores": {name: float(v.score) for name, v in verdicts.items()},
        "provenance": sample.meta.get("provenance", []),
    }
    notes = {name: v.note for name, v in verdicts.items() if v.note}
    if notes:
        record["notes"] = notes
    if dropped_by is not None:
        record["dropped_by"] = dropped_by
    extra = {k: v for k, v in sample.meta.items() if k not in ("index", "seed", "provenance")}
    if extra:
        record["meta"] = json.loads(json.dumps(extra, default=_json_default))
    return record


def _write_pair(out: Path, index: int, sample: Sample, encoded: Encoded = None) -> tuple[str, str]:
    image_rel, mask_rel = f"images/{index:06d}.png", f"masks/{index:06d}.png"
    if encoded is None:
        write_png_image(out / image_rel, sample.image)
        write_png_mask(out / mask_rel, sample.mask)
    else:  # encoded ahead in a worker
        write_bytes_atomic(out / image_rel, encoded[0])
        write_bytes_atomic(out / mask_rel, encoded[1])
    return image_rel, mask_rel


def _check_labels(sample: Sample, allowed: frozenset[int], pipeline: Pipeline) -> None:
    extra = sorted(set(np.unique(sample.mask).tolist()) - allowed)
    if extra:
        raise PipelineError(
            f"sample {sample.meta['index']}: mask holds labels {extra} that the dataset does not declare "
            f"({sorted(allowed)}); check generator {pipeline.generator.name!r} and the refiners")


def check_run_folder(pipeline: Pipeline, resume: bool, out: str | Path | None = None) -> None:
    """Raise PipelineError where ``run_pipeline`` would refuse ``out``, changing nothing."""
    out = Path(out or pipeline.spec.run.out or "")
    if not str(out) or out == Path("."):
        raise PipelineError("no output folder: set [run] out or pass --out")
    if out.exists():
        _prepare_folder(out, pipeline, resume)


def _prepare_folder(out: Path, pipeline: Pipeline, resume: bool) -> str | None:
    """Make or check ``out``; say whether this run starts it: ``"created"``, ``"was-empty"`` or None."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not resume:
            raise PipelineError(f"{out}: folder is not empty; pass --resume to continue its run, "
                                "or choose another --out")
        card_path = out / CARD
        if not card_path.is_file():
            raise PipelineError(f"{out}: not a medsynth run folder (no {CARD}); cannot resume it")
        try:
            card = json.loads(card_path.read_text())
        except ValueError:
            raise PipelineError(f"{card_path}: damaged; cannot resume") from None
        if card.get("fingerprint") != pipeline.fingerprint():
            raise PipelineError(f"{out}: was made by a different pipeline (seed, data or stages differ); "
                                "resume it with the same pipeline or choose another --out")
        return None
    state = "was-empty" if out.exists() else "created"
    out.mkdir(parents=True, exist_ok=True)
    return state


def _discard(out: Path, state: str) -> None:
    """Undo a run that kept nothing: remove the folder it made, or empty the one it was given."""
    if state == "created":
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _remove_orphans(out: Path, records: list[dict[str, Any]]) -> None:
    """Delete files that no manifest record names: leftovers of a run killed mid-pair."""
    named = {r[key] for r in records if is_candidate(r) for key in ("image", "mask")}
    for sub in ("images", "masks", f"{DROPPED}/images", f"{DROPPED}/masks"):
        folder = out / sub
        remove_temporaries(folder)
        if folder.is_dir():
            for path in folder.iterdir():
                if f"{sub}/{path.name}" not in named:
                    path.unlink()
    remove_temporaries(out)


def _check_records(out: Path, records: list[dict[str, Any]]) -> None:
    indices = [r["index"] for r in records]
    if len(set(indices)) != len(indices):
        raise PipelineError(f"{out / MANIFEST}: a sample index appears twice; the manifest is damaged")
    for r in records:
        if is_candidate(r) and not ((out / r["image"]).is_file() and (out / r["mask"]).is_file()):
            raise PipelineError(f"{out / MANIFEST}: record {r['index']} names files that are missing")


def _write_card(out: Path, pipeline: Pipeline, labels: dict[str, int], records: list[dict[str, Any]],
                status: str) -> None:
    card_path = out / CARD
    created = now_iso()
    if card_path.is_file():
        with contextlib.suppress(ValueError):
            created = json.loads(card_path.read_text()).get("created", created)
    kept = sum(1 for r in records if r["kept"])
    write_json_atomic(card_path, {
        "name": out.name,
        "description": "Synthetic image/mask pairs made by medsynth",
        "status": status,
        "created": created,
        "updated": now_iso(),
        "medsynth_version": package_version("medsynth"),
        "versions": software_versions(),
        "labels": labels,
        "pairs": kept,
        "candidates": len(records),
        "dropped": len(records) - kept,
        "fingerprint": pipeline.fingerprint(),
        "pipeline": pipeline.spec.to_dict(),
        "stages": [stage_record(c) for c in pipeline.stages()],
    })


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else f"<array {value.shape}>"
    if isinstance(value, Path):
        return str(value)
    return repr(value)
