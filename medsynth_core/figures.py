"""Report figures: a contact sheet of pairs, metric bars with error bars, and curves.

Drawn with matplotlib's Agg backend (no display needed). Any metric whose details carry a
``curve`` (``{"x": [...], "series": {name: {"mean": [...], "sd": [...]}}, "xlabel", "ylabel"}``)
gets a line plot, so an evaluator adds a figure without touching this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_path

if TYPE_CHECKING:
    from .dataset import Dataset
    from .report import EvaluatorResult

PAIRS_PER_ROW = 6


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def contact_sheet(path: Path, sets: Sequence[Dataset], pairs: int = PAIRS_PER_ROW) -> Path:
    """One row per dataset: its first ``pairs`` images with the mask outline drawn over them."""
    plt = _pyplot()
    rows = [d for d in sets if len(d)]
    fig, axes = plt.subplots(len(rows), pairs, figsize=(1.8 * pairs, 1.9 * len(rows)), squeeze=False)
    for r, dataset in enumerate(rows):
        picks = np.linspace(0, len(dataset) - 1, num=min(pairs, len(dataset))).round().astype(int)
        for c in range(pairs):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(picks):
                continue
            sample = dataset[int(picks[c])]
            ax.imshow(sample.image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if sample.mask is not None and sample.mask.any():
                ax.contour(sample.mask > 0, levels=[0.5], colors=["#ff3b30"], linewidths=0.8)
            if c == 0:
                ax.set_title(dataset.name, fontsize=8, loc="left")
    fig.tight_layout()
    return _save(fig, path)


def metric_bars(path: Path, results: Sequence[EvaluatorResult]) -> Path | None:
    """A small bar chart per metric, one bar per synthetic set, with ± sd error bars."""
    plt = _pyplot()
    names = list(dict.fromkeys(f"{r.evaluator}: {m.name}" for r in results for m in r.metrics
                               if np.isfinite(m.value)))
    if not names:
        return None
    sets = list(dict.fromkeys(r.synthetic for r in results))
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values, errors = [], []
        for s in sets:
            metric = next((m for r in results if r.synthetic == s for m in r.metrics
                           if f"{r.evaluator}: {m.name}" == name), None)
            values.append(metric.value if metric is not None else np.nan)
            errors.append(metric.sd if metric is not None and metric.sd is not None else 0.0)
        ax.bar(range(len(sets)), values, yerr=errors, capsize=3, color="#4a7fb5")
        ax.set_xticks(range(len(sets)), [s[-14:] for s in sets], rotation=30, ha="right", fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


def curves(folder: Path, results: Sequence[EvaluatorResult]) -> list[Path]:
    """One line plot per curve-bearing metric: a line per (synthetic set, series), ± sd bands."""
    plt = _pyplot()
    by_metric: dict[str, list[tuple[str, dict]]] = {}
    for r in results:
        for m in r.metrics:
            if isinstance(m.details.get("curve"), dict):
                by_metric.setdefault(f"{r.evaluator}-{m.name}", []).append((r.synthetic, m.details["curve"]))
    written = []
    for key, entries in by_metric.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for synthetic, curve in entries:
            x = np.asarray(curve["x"], dtype=float)
            for series, values in curve["series"].items():
                mean = np.asarray(values["mean"], dtype=float)
                sd = np.asarray(values.get("sd") or [0.0] * len(mean), dtype=float)
                label = series if len(entries) == 1 else f"{synthetic}: {series}"
                ax.plot(x, mean, marker="o", label=label)
                ax.fill_between(x, mean - sd, mean + sd, alpha=0.15)
        first = entries[0][1]
        ax.set_xlabel(first.get("xlabel", "")), ax.set_ylabel(first.get("ylabel", ""))
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, folder / f"curve-{_slug(key)}.png"))
    return written


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower()


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
