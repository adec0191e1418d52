"""DiffMask (Pi & Shan, "Synthetic Lung X-ray Generation through Cross-Attention and Affinity Transformation"):
Stable-Diffusion-style text-to-image whose class-word cross-attention gives each image a soft mask, refined by
an adaptive threshold, an affinity random walk and a dense CRF, and filtered by noise learning.

The modules imported here hold the options and classes only; torch, diffusers and pydensecrf are imported
when a component first works, so that `medsynth list` stays fast.
"""

from medsynth_core import hookimpl

from .evaluator import AttentionIoUEvaluator
from .generator import SDAttentionGenerator
from .noise_learning import NoiseLearningFilter
from .refiners import AdaptiveThresholdRefiner, AffinityRefiner, CrossFusionRefiner, DenseCRFRefiner


@hookimpl
def register_generators(register):
    register("sd-attention", SDAttentionGenerator)


@hookimpl
def register_refiners(register):
    register("adaptive-threshold", AdaptiveThresholdRefiner)
    register("affinity", AffinityRefiner)
    register("densecrf", DenseCRFRefiner)
    register("cross-fusion", CrossFusionRefiner)


@hookimpl
def register_filters(register):
    register("noise-learning", NoiseLearningFilter)


@hookimpl
def register_evaluators(register):
    register("attention-iou", AttentionIoUEvaluator)
