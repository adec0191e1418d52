"""Downstream utility: does training a segmenter with the synthetic pairs help on held-out real images?

Protocols follow the papers: real only; real + synthetic (union); synthetic only (paper 001's
full-synthetic training); pretrain on synthetic then fine-tune on real (paper 000, with 1, 3, 5
and all real images); and paper 001's augmentation, where each batch item is, with probability
``alpha``, one of the ``r`` synthetic pairs made from the drawn real image. Each is swept over the
number N of real training pairs and repeated over seeds; the per-image Dice of each protocol is
compared with real-only by a Wilcoxon signed-rank test (paper 004).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsynth_core import (
    ConfigError,
    Dataset,
    DatasetError,
    Evaluator,
    Metric,
    ProgressTask,
    Sample,
    option,
    sample_seed,
)
from medsynth_plugins.common.segmenter import (
    Segmenter,
    SegmenterRecipe,
    build_unet,
    dice_score,
    iou_score,
    train_segmenter,
)

from .utility_mix import train_mixed
from .utility_split import UtilitySplit, make_split, mix_partners, n_values, subset_order

PROTOCOLS = {
    "real": "the N real training pairs only (the baseline of every gain)",
    "real+synthetic": "the union of the N real pairs and every usable synthetic pair, sampled uniformly",
    "synthetic": "the usable synthetic pairs only (paper 001's full-synthetic training; independent of N)",
    "pretrain-finetune": "trained on the synthetic pairs (steps), then fine-tuned on the N real pairs "
                         "(finetune_steps; paper 000)",
    "mix": "each batch item is a real pair, replaced with probability alpha by one of the r synthetic pairs "
           "made from it (paper 001)",
}
NEEDS_SYNTHETIC = frozenset(PROTOCOLS) - {"real"}


@dataclass(frozen=True)
class UtilityConfig:
    """Options of the utility evaluator.

    The defaults are sized for a CPU (the 32-pair demo set in a few minutes on 2 cores). Paper-size
    runs: ``encoder = "resnet34"``, ``depth = 5``, ``size = 256``, ``steps = 5000``, ``repeats = 5``,
    ``n_real = [1, 3, 5, "all"]`` (paper 000) or ``[16, 32, 64, 128]`` (paper 001), on a GPU.
    Every protocol of one repeat starts from the same initial weights and N-subset, so gains are paired.
    """

    protocols: tuple[str, ...] = option(
        ("real", "real+synthetic"),
        "Training protocols: 'real', 'real+synthetic' (union), 'synthetic' (synthetic only), "
        "'pretrain-finetune' (synthetic, then the N real pairs: paper 000), 'mix' (each batch item "
        "swapped for a synthetic pair made from it with probability alpha: paper 001). 'real' is "
        "always trained, as the baseline of the gains.")
    n_real: tuple[int | str, ...] = option(
        (4, 8, "all"),
        "Numbers N of real training pairs to sweep: integers >= 1 and 'all' (the whole training "
        "split); larger N are capped at what exists. Paper 000: 1, 3, 5, all; paper 001: 16, 32, 64, 128.")
    test_fraction: float = option(
        0.25, "Share of the labelled real pairs held out as the test set (seeded; at least 1 pair each side). "
              "Synthetic pairs made from a test image are left out of training.")
    repeats: int = option(1, "Repeats with different seeds (N-subset, initialisation, batches); paper size: 5.")
    seed: int = option(0, "Seed of the test split, the N-subsets and every training: the same seed gives the same "
                          "numbers on the same device and torch thread count.")
    alpha: float = option(0.5, "'mix': probability that a batch item is a synthetic partner of the drawn real "
                               "pair (paper 001: 0.5).")
    r: int = option(1, "'mix': synthetic partners per real pair (paper 001: 1, 2 or 3).")
    encoder: str = option("tu-resnet10t", "segmentation-models-pytorch encoder, built without pretrained "
                                          "weights; paper size: 'resnet34'.")
    depth: int = option(3, "U-Net depth (encoder stages, 1-5); paper size: 5.")
    width: int = option(16, "Channels of the U-Net's last decoder block (doubling per level up).")
    size: int = option(64, "Training and prediction size in px (a multiple of 2**depth); paper size: 256.")
    steps: int = option(200, "Optimiser steps per training (and for the synthetic pretraining); paper size: 5000.")
    finetune_steps: int | None = option(None, "'pretrain-finetune': fine-tuning steps on the real pairs; "
                                              "None: the same as steps.")
    batch_size: int = option(8, "Pairs per optimiser step.")
    lr: float = option(2e-3, "AdamW learning rate.")

    def __post_init__(self) -> None:
        protocols = tuple(self.protocols) if isinstance(self.protocols, (list, tuple)) else (self.protocols,)
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown or not protocols:
            raise ConfigError(f"protocols: unknown protocol {unknown[0] if unknown else None!r}; "
                              f"choose from {', '.join(PROTOCOLS)}")
        object.__setattr__(self, "protocols", tuple(dict.fromkeys(protocols)))
        n_real = tuple(self.n_real) if isinstance(self.n_real, (list, tuple)) else (self.n_real,)
        if not n_real:
            raise ConfigError("n_real must list at least one N (an integer >= 1 or 'all')")
        normal = []
        for n in n_real:
            if isinstance(n, str) and n.strip().lower() == "all":
                normal.append("all")
            elif isinstance(n, str) and n.strip().lstrip("-").isdigit():
                normal.append(int(n))
            else:
                normal.append(n)
            if normal[-1] != "all" and (isinstance(normal[-1], bool) or not isinstance(normal[-1], int)
                                        or normal[-1] < 1):
                raise ConfigError(f"n_real values must be integers >= 1 or 'all', got {n!r}")
        object.__setattr__(self, "n_real", tuple(normal))
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must lie strictly between 0 and 1, got {self.test_fraction}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.r < 1:
            raise ConfigError(f"r must be >= 1, got {self.r}")
        if self.finetune_steps is not None and self.finetune_steps < 1:
            raise ConfigError(f"finetune_steps must be >= 1 or None, got {self.finetune_steps}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        self.recipe(0)  # the segmenter's own checks (depth, size multiple of 2**depth, ...)

    def recipe(self, seed: int) -> SegmenterRecipe:
        """The shared segmenter recipe these options describe, seeded with ``seed``."""
        return SegmenterRecipe(encoder=self.encoder, depth=self.depth, width=self.width, size=self.size,
                               steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=seed)


@dataclass
class _Scores:
    """Per-image Dice and IoU of one trained model on the test images."""

    dice: np.ndarray
    iou: np.ndarray


class UtilityEvaluator(Evaluator):
    """Train U-Nets with and without the synthetic pairs; Dice and IoU on held-out real pairs, with gains."""

    Config = UtilityConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._real_scores: dict[tuple, _Scores] = {}

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        cfg = self.config
        protocols = ["real", *(p for p in cfg.protocols if p != "real")]
        split = make_split(real, synthetic, cfg.test_fraction, cfg.seed)
        if not split.synthetic and any(p in NEEDS_SYNTHETIC for p in protocols):
            raise DatasetError(f"utility: synthetic set {synthetic.name!r} has no labelled pair left to train on "
                               f"({len(split.excluded)} made from test images were left out, "
                               f"{len(split.unlabelled)} have no mask)")
        ns, notes = n_values(cfg.n_real, len(split.train))
        rgb = any(s.image.ndim == 3 for s in [*(real[i] for i in split.train + split.test),
                                              *(synthetic[j] for j in split.synthetic)])
        reals = {i: _channels(real[i], rgb) for i in split.train}
        syn = {j: _channels(synthetic[j], rgb) for j in split.synthetic}
        test = [_channels(real[i], rgb) for i in split.test]
        classes = max(real.label_values) + 1
        device = _device(self.context.device)
        self._check_encoder(3 if rgb else 1, classes)

        # scores[protocol][n] is one _Scores per repeat
        scores: dict[str, dict[int, list[_Scores]]] = {p: {n: [] for n in ns} for p in protocols}
        mix_info: list[dict[str, Any]] = []
        total = cfg.repeats * _trainings_per_repeat(protocols, len(ns))
        synthetic_pairs = [syn[j] for j in split.synthetic]
        with self.context.progress.task(f"utility: training {total} segmenters", total=total) as task:
            run = _Runner(task, classes, device)
            for rep in range(cfg.repeats):
                recipe = cfg.recipe(sample_seed(cfg.seed, rep))  # shared by every protocol: paired comparisons
                order = subset_order(split.train, cfg.seed, rep)
                pretrained = None
                if {"synthetic", "pretrain-finetune"} & set(protocols):
                    # the synthetic-only model does not depend on N, and it is the pretrained model too
                    pretrained = run(f"synthetic (repeat {rep + 1})", train_segmenter, synthetic_pairs, recipe)
                    if "synthetic" in protocols:
                        synthetic_scores = _score(pretrained, test)
                        for n in ns:
                            scores["synthetic"][n].append(synthetic_scores)
                for n in ns:
                    chosen = order[:n]
                    pairs = [reals[i] for i in chosen]
                    for protocol in protocols:
                        what = f"{protocol}, N={n} (repeat {rep + 1})"
                        if protocol == "synthetic":
                            continue
                        if protocol == "real":
                            # the real-only model does not depend on the synthetic set: several sets
                            # scored against one real set (medsynth evaluate, medsynth bench) train it once
                            key = (id(real), len(real), tuple(split.train), tuple(split.test), rgb, device, rep, n)
                            if key not in self._real_scores:
                                self._real_scores[key] = _score(run(what, train_segmenter, pairs, recipe), test)
                            else:
                                task.advance()
                            scores[protocol][n].append(self._real_scores[key])
                            continue
                        if protocol == "real+synthetic":
                            model = run(what, train_segmenter, pairs + synthetic_pairs, recipe)
                        elif protocol == "pretrain-finetune":
                            model = run(what, train_segmenter, pairs, recipe, init=copy.deepcopy(pretrained.model),
                                        steps=cfg.finetune_steps or cfg.steps)
                        else:  # mix
                            partners, mode = mix_partners(chosen, split, cfg.r, cfg.seed, rep)
                            groups = [[syn[j] for j in group] for group in partners]
                            mix_info.append({"repeat": rep, "n_real": n, "partners_from": mode,
                                             "reals_with_partner": sum(1 for g in groups if g)})
                            model = run(what, train_mixed, pairs, groups, cfg.alpha, recipe)
                        scores[protocol][n].append(_score(model, test))
        return self._metrics(protocols, ns, scores, split, notes, mix_info)

    def _check_encoder(self, channels: int, classes: int) -> None:
        try:
            build_unet(self.config.recipe(0), channels, classes)
        except (KeyError, ValueError, RuntimeError, ImportError, TypeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"utility: encoder {self.config.encoder!r} with depth {self.config.depth} "
                              f"cannot be built ({reason[:200]})") from None

    def _metrics(self, protocols: Sequence[str], ns: Sequence[int], scores: dict[str, dict[int, list[_Scores]]],
                 split: UtilitySplit, notes: Sequence[str], mix_info: Sequence[dict[str, Any]]) -> list[Metric]:
        cfg = self.config
        top = ns[-1]
        sweep: dict[str, Any] = {}
        for p in protocols:
            sweep[p] = {}
            for n in ns:
                reps = scores[p][n]
                entry = {
                    "dice": _mean_sd([s.dice.mean() for s in reps]),
                    "iou": _mean_sd([s.iou.mean() for s in reps]),
                    "dice_per_repeat": [float(s.dice.mean()) for s in reps],
                    "iou_per_repeat": [float(s.iou.mean()) for s in reps],
                    "dice_per_image": np.mean([s.dice for s in reps], axis=0).tolist(),
                }
                if p != "real":
                    gains = [a.dice.mean() - b.dice.mean() for a, b in zip(reps, scores["real"][n])]
                    entry["dice_gain"] = _mean_sd(gains)
                    entry["wilcoxon"] = _wilcoxon(np.mean([s.dice for s in reps], axis=0),
                                                  np.mean([s.dice for s in scores["real"][n]], axis=0))
                sweep[p][str(n)] = entry
        curve = {
            "x": list(ns),
            "series": {p: {"mean": [sweep[p][str(n)]["dice"]["mean"] for n in ns],
                           "sd": [sweep[p][str(n)]["dice"]["sd"] or 0.0 for n in ns]} for p in protocols},
            "xlabel": "real training pairs",
            "ylabel": "Dice",
        }
        common = {"n_real": top, "repeats": cfg.repeats, "test_images": len(split.test)}
        sd = (lambda v: v["sd"]) if cfg.repeats > 1 else (lambda v: None)
        metrics = []
        for p in protocols:
            at_top = sweep[p][str(top)]
            details: dict[str, Any] = {**common, "protocol": PROTOCOLS[p],
                                       "what": f"mean foreground Dice on the held-out real test images, '{p}' "
                                               f"protocol, N = {top} real training pairs"}
            if p == "real":
                details.update(
                    curve=curve, sweep=sweep, split=split.details(), n_values=list(ns), notes=list(notes),
                    protocols={q: PROTOCOLS[q] for q in protocols},
                    metric="foreground Dice and IoU per test image (label > 0), averaged over the test images",
                    test="two-sided Wilcoxon signed-rank test of per-image Dice (averaged over repeats), "
                         "protocol vs real-only, over the test images",
                    device=_device(self.context.device))
                if mix_info:
                    details["mix"] = {"alpha": cfg.alpha, "r": cfg.r, "trainings": list(mix_info)}
            metrics.append(Metric(f"dice[{p}]", at_top["dice"]["mean"], "higher", sd(at_top["dice"]), details))
            metrics.append(Metric(f"iou[{p}]", at_top["iou"]["mean"], "higher", sd(at_top["iou"]),
                                  {**common, "what": f"mean foreground IoU on the held-out real test images, "
                                                     f"'{p}' protocol, N = {top}"}))
        for p in protocols[1:]:
            at_top = sweep[p][str(top)]
            metrics.append(Metric(
                f"dice_gain[{p}]", at_top["dice_gain"]["mean"], "higher", sd(at_top["dice_gain"]),
                {**common, "what": f"Dice of '{p}' minus Dice of 'real', N = {top} (paired by repeat)",
                 "wilcoxon": at_top["wilcoxon"], "p_value": at_top["wilcoxon"]["p_value"],
                 "gain_by_n": {str(n): sweep[p][str(n)]["dice_gain"]["mean"] for n in ns},
                 "p_value_by_n": {str(n): sweep[p][str(n)]["wilcoxon"]["p_value"] for n in ns}}))
        return metrics


@dataclass
class _Runner:
    """Runs one training with the shared classes and device, and moves the progress bar."""

    task: ProgressTask
    classes: int
    device: str

    def __call__(self, what: str, train: Callable[..., Segmenter], *args: Any, **kwargs: Any) -> Segmenter:
        def on_step(step: int, loss: float) -> None:
            if step % 10 == 0:
                self.task.show(training=what, loss=f"{loss:.3f}")

        model = train(*args, classes=self.classes, device=self.device, on_step=on_step, **kwargs)
        self.task.advance()
        return model


def _trainings_per_repeat(protocols: Sequence[str], n_count: int) -> int:
    per_n = sum(1 for p in protocols if p in ("real", "real+synthetic", "pretrain-finetune", "mix"))
    shared = 1 if {"synthetic", "pretrain-finetune"} & set(protocols) else 0
    return per_n * n_count + shared


def _score(model: Segmenter, test: Sequence[Sample]) -> _Scores:
    preds = model.predict([s.image for s in test])
    return _Scores(np.array([dice_score(p, s.mask) for p, s in zip(preds, test)]),
                   np.array([iou_score(p, s.mask) for p, s in zip(preds, test)]))


def _mean_sd(values: Sequence[float]) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else None}


def _wilcoxon(protocol: np.ndarray, baseline: np.ndarray) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of paired per-image scores; p = 1 when every difference is zero."""
    diff = np.asarray(protocol, dtype=float) - np.asarray(baseline, dtype=float)
    nonzero = int(np.count_nonzero(diff))
    result: dict[str, Any] = {"n_images": int(diff.size), "n_nonzero": nonzero,
                              "median_difference": float(np.median(diff)) if diff.size else None}
    if nonzero == 0:
        return {**result, "statistic": 0.0, "p_value": 1.0, "note": "every per-image difference is zero"}
    from scipy.stats import wilcoxon

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about ties and small samples; the p-value is still its best
        test = wilcoxon(diff)
    p_value = float(test.pvalue)
    return {**result, "statistic": float(test.statistic), "p_value": p_value if math.isfinite(p_value) else None}


def _channels(sample: Sample, rgb: bool) -> Sample:
    """The sample with a 3-channel image when any training or test image is colour (one model input for all)."""
    if rgb and sample.image.ndim == 2:
        return sample.replace(image=np.repeat(sample.image[..., None], 3, axis=2))
    return sample


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
