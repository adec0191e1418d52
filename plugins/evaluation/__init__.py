"""Evaluators of fidelity, variety, paired quality and downstream utility, the same for every method."""

from medsynth_core import hookimpl

from .avg_image import AvgImageJPEGEvaluator
from .fidelity import FIDEvaluator, InceptionScoreEvaluator, KIDEvaluator
from .intensity_kl import IntensityKLEvaluator
from .mask_agreement import MaskAgreementEvaluator
from .ms_ssim import MSSSIMEvaluator
from .multiscale import MMFIDEvaluator, MMSTDEvaluator
from .psnr_ssim import PSNRSSIMEvaluator
from .utility import UtilityEvaluator


@hookimpl
def register_evaluators(register):
    register("fid", FIDEvaluator)
    register("kid", KIDEvaluator)
    register("inception-score", InceptionScoreEvaluator)
    register("mm-fid", MMFIDEvaluator)
    register("mm-std", MMSTDEvaluator)
    register("ms-ssim", MSSSIMEvaluator)
    register("avg-image-jpeg", AvgImageJPEGEvaluator)
    register("intensity-kl", IntensityKLEvaluator)
    register("psnr-ssim", PSNRSSIMEvaluator)
    register("mask-agreement", MaskAgreementEvaluator)
    register("utility", UtilityEvaluator)
