"""Baselines and controls: real masks, classical augmentation, thresholding, area filter, mask statistics.

They prove the core and give every comparison its control rows: the papers compare their
synthetic pairs against plain manual augmentation of the real pairs.
"""

from medsynth_core import hookimpl

from .augment import AugmentGenerator
from .mask_area import MaskAreaFilter
from .mask_stats import MaskStatsEvaluator
from .real_masks import RealMasksSource, RealPairsSource
from .threshold import ThresholdRefiner


@hookimpl
def register_mask_sources(register):
    register("real-masks", RealMasksSource)
    register("real-pairs", RealPairsSource)


@hookimpl
def register_generators(register):
    register("augment", AugmentGenerator)


@hookimpl
def register_refiners(register):
    register("threshold", ThresholdRefiner)


@hookimpl
def register_filters(register):
    register("mask-area", MaskAreaFilter)


@hookimpl
def register_evaluators(register):
    register("mask-stats", MaskStatsEvaluator)
