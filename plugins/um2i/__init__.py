"""UM2I (Xing et al., "Less is More"): unsupervised-mask-guided synthesis of images with annotations.

``slic-um`` makes unsupervised masks from the real images (superpixels quantised by intensity),
``um-generator`` draws new ones from a style-based GAN, and the ``um2i`` generator turns either
into an image and its segmentation, trained semi-supervised from a few labelled images.
"""

from medsynth_core import hookimpl

from .generator import UM2IGenerator
from .sources import SlicUMSource, UMGeneratorSource


@hookimpl
def register_mask_sources(register):
    register("slic-um", SlicUMSource)
    register("um-generator", UMGeneratorSource)


@hookimpl
def register_generators(register):
    register("um2i", UM2IGenerator)
