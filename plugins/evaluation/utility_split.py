"""The data side of the utility evaluator: held-out real test pairs, leakage exclusion, N-subsets, mix partners.

Everything here is pure and seeded (no training), so the rules that keep the test honest can be
checked in milliseconds: the test split is drawn from the real set only, and a synthetic pair
made from a test image (manifest ``meta.condition.source``) never reaches training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsynth_core import Dataset, DatasetError, Sample

# independent random streams drawn from the one user seed
SPLIT_STREAM, SUBSET_STREAM, MIX_STREAM = 0, 1, 2


@dataclass(frozen=True)
class UtilitySplit:
    """Which real pairs train and test, and which synthetic pairs may train.

    Indices point into the real and synthetic datasets. ``excluded`` are the synthetic pairs made
    from a test image (left out of every training: leakage); ``unlabelled`` those without a mask.
    """

    train: list[int]
    test: list[int]
    synthetic: list[int]
    excluded: list[int]
    unlabelled: list[int]
    real_keys: dict[int, str]
    sources: dict[int, str | None] = field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        """A JSON summary for the report."""
        with_source = sum(1 for i in self.synthetic if self.sources.get(i) is not None)
        return {
            "real_train_pool": len(self.train),
            "real_test": len(self.test),
            "test_stems": [self.real_keys[i] for i in self.test],
            "synthetic_used": len(self.synthetic),
            "synthetic_with_known_source": with_source,
            "synthetic_excluded_leakage": len(self.excluded),
            "synthetic_unlabelled": len(self.unlabelled),
            "leakage_rule": "synthetic pairs whose condition source is a test image are left out of training",
            "leakage_caveat": "a generator trained on the whole real set has seen the test images whatever its "
                              "pairs' sources; train it on the training split for a clean test",
        }


def real_key(dataset: Dataset, index: int, sample: Sample | None = None) -> str:
    """The name a synthetic pair's ``source`` uses for real pair ``index``: its file stem."""
    if dataset.files:
        return dataset.files[index].stem
    sample = sample if sample is not None else dataset[index]
    return str(sample.meta.get("stem", index))


def synthetic_source(meta: dict[str, Any]) -> str | None:
    """The real stem a synthetic pair was made from, if its provenance says so.

    In memory the runner stores it as ``meta["condition"]["source"]``; read back from a run folder
    the manifest record nests it under ``meta["meta"]``.
    """
    for holder in (meta, meta.get("meta")):
        if not isinstance(holder, dict):
            continue
        condition = holder.get("condition")
        if isinstance(condition, dict) and condition.get("source") is not None:
            return str(condition["source"])
        if holder.get("source") is not None:
            return str(holder["source"])
    return None


def make_split(real: Dataset, synthetic: Dataset, test_fraction: float, seed: int) -> UtilitySplit:
    """Draw the held-out real test pairs (seeded) and apply the leakage rule to the synthetic set."""
    labelled = real.labelled()
    if len(labelled) < 2:
        raise DatasetError(f"utility: real set {real.name!r} has {len(labelled)} labelled pairs; "
                           "at least 2 are needed (1 to train, 1 to test)")
    n_test = min(len(labelled) - 1, max(1, round(test_fraction * len(labelled))))
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(len(labelled))
    test = sorted(labelled[int(k)] for k in order[:n_test])
    train = sorted(labelled[int(k)] for k in order[n_test:])
    keys = {i: real_key(real, i) for i in labelled}
    test_keys = {keys[i] for i in test}
    usable, excluded, unlabelled, sources = [], [], [], {}
    for j in range(len(synthetic)):
        sample = synthetic[j]
        sources[j] = synthetic_source(sample.meta)
        if sample.mask is None:
            unlabelled.append(j)
        elif sources[j] in test_keys:
            excluded.append(j)
        else:
            usable.append(j)
    return UtilitySplit(train, test, usable, excluded, unlabelled, keys, sources)


def n_values(requested: Sequence[int | str], pool: int) -> tuple[list[int], list[str]]:
    """The N of real training pairs to sweep, ascending: ``"all"`` is the pool, larger N are capped."""
    notes, values = [], set()
    for n in requested:
        if n == "all":
            values.add(pool)
        elif int(n) > pool:
            notes.append(f"n_real {n} capped at the {pool} real training pairs available")
            values.add(pool)
        else:
            values.add(int(n))
    return sorted(values), notes


def subset_order(train: Sequence[int], seed: int, repeat: int) -> list[int]:
    """The order in which repeat ``repeat`` takes real training pairs: N uses the first N (nested subsets)."""
    order = np.random.default_rng([seed, SUBSET_STREAM, repeat]).permutation(len(train))
    return [train[int(k)] for k in order]


def mix_partners(reals: Sequence[int], split: UtilitySplit, r: int, seed: int,
                 repeat: int) -> tuple[list[list[int]], str]:
    """Up to ``r`` synthetic partners (synthetic indices) for each real training pair, and how they were chosen.

    ``"source"``: the synthetic pairs made from that real image (paper 001's X~_ij), ``r`` of them
    drawn at random when there are more; a real image with none keeps only itself. ``"pool"``
    (no synthetic pair names a training image as its source, e.g. unconditional generators): the
    shuffled synthetic set dealt out ``r`` per real image, cycling when it runs short.
    """
    rng = np.random.default_rng([seed, MIX_STREAM, repeat])
    by_source: dict[str, list[int]] = {}
    for j in split.synthetic:
        source = split.sources.get(j)
        if source is not None:
            by_source.setdefault(source, []).append(j)
    train_keys = {split.real_keys[i] for i in split.train}
    if any(key in by_source for key in train_keys):
        partners = []
        for i in reals:
            candidates = by_source.get(split.real_keys[i], [])
            picks = rng.choice(len(candidates), size=min(r, len(candidates)), replace=False) if candidates else []
            partners.append([candidates[int(k)] for k in picks])
        return partners, "source"
    pool = [split.synthetic[int(k)] for k in rng.permutation(len(split.synthetic))]
    if not pool:
        return [[] for _ in reals], "none"
    return [[pool[(k * r + j) % len(pool)] for j in range(r)] for k in range(len(reals))], "pool"
