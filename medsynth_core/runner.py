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
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import remove_temporaries, write_json_atomic
from .config import config_to_dict
from .dataset import BINARY_LABELS, Dataset, open_dataset
from .errors import PipelineError
from .image_io import write_png_image, write_png_mask
from .manifest import ManifestWriter, read_manifest
from .pipeline import Pipeline
from .provenance import now_iso, package_version, software_versions
from .report import EvaluatorResult, evaluate, write_report
from .roles import Component
from .sample import Condition, Sample
from .seeds import sample_seed
from .set_filtering import DROPPED, apply_set_filters, is_candidate, place_files

CARD = "dataset.json"
MANIFEST = "manifest.jsonl"
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
                 real: Dataset | None = None) -> RunResult:
    """Run ``pipeline`` into ``out`` (default ``[run] out``), resuming a killed run if asked.

    ``real`` may pass an already opened real dataset; otherwise ``[run] data`` is opened.
    Raises PipelineError for a non-empty ``out`` without ``resume``, or a ``resume`` of a folder
    made by a different pipeline. A run that fails before its first pair removes ``out``.
    """
    spec = pipeline.spec
    out = Path(out or spec.run.out or "")
    if not str(out) or out == Path("."):
        raise PipelineError("no output folder: set [run] out or pass --out")
    if real is None and spec.run.data:
        real = pipeline.open_real()
    if real is not None and pipeline.needs_data:
        real.validate(pipeline.generator.context.progress)

    fresh = _prepare_folder(out, pipeline, resume)
    try:
        return _run(pipeline, out, real)
    except BaseException:
        if fresh is not None and not any(r["kept"] for r in read_manifest(out / MANIFEST)):
            _discard(out, fresh)  # nothing worth resuming: leave no half-made folder
        raise


def _run(pipeline: Pipeline, out: Path, real: Dataset | None) -> RunResult:
    spec = pipeline.spec
    ctx = pipeline.generator.context
    records = read_manifest(out / MANIFEST, repair=True)
    place_files(out, records)
    _remove_orphans(out, records)
    _check_records(out, records)
    labels = real.labels if real is not None else BINARY_LABELS
    _write_card(out, pipeline, labels, records, status="running")

    if pipeline.mask_source is not None and pipeline.mask_source.needs_data:
        pipeline.mask_source.fit(real)
    for flt in pipeline.filters:
        if flt.needs_data:
            flt.fit(real)
    if pipeline.generator.trainable:
        pipeline.generator.load(Path(spec.checkpoint))

    kept = sum(1 for r in records if is_candidate(r))  # set filters judge later; n counts what they see
    next_index = max((r["index"] for r in records), default=-1) + 1
    limit = spec.run.max_candidates or CANDIDATE_FACTOR * spec.run.n
    allowed = frozenset(labels.values()) | {0}
    with ManifestWriter(out / MANIFEST) as manifest, \
            ctx.progress.task(f"generating with {pipeline.generator.name}", total=spec.run.n) as bar:
        bar.advance(kept)
        while kept < spec.run.n:
            if next_index >= limit:
                raise PipelineError(
                    f"only {kept} of {spec.run.n} pairs kept after {next_index} candidates; "
                    "loosen the filters or raise [run] max_candidates")
            indices = list(range(next_index, min(next_index + spec.run.batch_size, limit)))
            for index, sample, verdicts in _make_batch(pipeline, indices):
                record = _record(index, sample, verdicts)
                if record["kept"]:
                    _check_labels(sample, allowed, pipeline)
                    record["image"], record["mask"] = _write_pair(out, index, sample)
                    kept += 1
                    bar.advance()
                manifest.append(record)
                next_index = index + 1
                if kept == spec.run.n:
                    break

    records = read_manifest(out / MANIFEST)
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


def _make_batch(pipeline: Pipeline, indices: Sequence[int]):
    """Generate, refine and judge one batch; yield (index, sample, verdicts) in index order."""
    seeds = [sample_seed(pipeline.spec.run.seed, i) for i in indices]
    if pipeline.mask_source is not None:
        conditions = pipeline.mask_source.conditions(indices, seeds)
        _expect_count(pipeline.mask_source, conditions, len(indices))
    else:
        conditions = [Condition() for _ in indices]
    samples = pipeline.generator.generate(conditions, seeds)
    _expect_count(pipeline.generator, samples, len(indices))
    samples = [_complete(s, c, i, seed, pipeline) for s, c, i, seed in zip(samples, conditions, indices, seeds)]
    for refiner in pipeline.refiners:
        samples = refiner.refine(samples)
        _expect_count(refiner, samples, len(indices))
        for s in samples:
            s.meta.setdefault("provenance", []).append(_stage_record(refiner))
    verdicts: list[dict[str, Any]] = [{} for _ in samples]
    alive = list(range(len(samples)))
    for flt in (f for f in pipeline.filters if f.scope == "sample"):
        judged = flt.judge([samples[k] for k in alive])
        _expect_count(flt, judged, len(alive))
        for k, verdict in zip(alive, judged):
            verdicts[k][flt.name] = verdict
            if verdict.sample is not None:
                samples[k] = verdict.sample
        alive = [k for k, v in zip(alive, judged) if v.keep]
    for k, index in enumerate(indices):
        samples[k].check(f"sample {index}")
        if samples[k].mask is None:
            raise PipelineError(f"sample {index} has no mask after the refiners; add a refiner such as 'threshold'")
        yield index, samples[k], verdicts[k]


def _complete(sample: Sample, condition: Condition, index: int, seed: int, pipeline: Pipeline) -> Sample:
    if sample.mask is None and sample.soft_mask is None and condition.mask is not None:
        sample = sample.replace(mask=condition.mask)  # the conditioning mask is the pair's mask
    sample.meta.update(index=index, seed=seed)
    if condition.meta:
        sample.meta["condition"] = dict(condition.meta)
    head = [pipeline.mask_source] if pipeline.mask_source is not None else []
    sample.meta["provenance"] = [_stage_record(c) for c in [*head, pipeline.generator]]
    return sample


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


def _write_pair(out: Path, index: int, sample: Sample) -> tuple[str, str]:
    image_rel, mask_rel = f"images/{index:06d}.png", f"masks/{index:06d}.png"
    write_png_image(out / image_rel, sample.image)
    write_png_mask(out / mask_rel, sample.mask)
    return image_rel, mask_rel


def _check_labels(sample: Sample, allowed: frozenset[int], pipeline: Pipeline) -> None:
    extra = sorted(set(np.unique(sample.mask).tolist()) - allowed)
    if extra:
        raise PipelineError(
            f"sample {sample.meta['index']}: mask holds labels {extra} that the dataset does not declare "
            f"({sorted(allowed)}); check generator {pipeline.generator.name!r} and the refiners")


def _expect_count(component: Component, items: Sequence[Any], n: int) -> None:
    if len(items) != n:
        raise PipelineError(f"{component.role} {component.name!r} returned {len(items)} items for {n} samples")


def _stage_record(component: Component) -> dict[str, Any]:
    return {"role": component.role, "name": component.name, "plugin": component.plugin,
            "version": component.version, "config": config_to_dict(component.config)}


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
        "stages": [_stage_record(c) for c in pipeline.stages()],
    })


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else f"<array {value.shape}>"
    if isinstance(value, Path):
        return str(value)
    return repr(value)
