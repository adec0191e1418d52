"""Saragih et al.: clustered image+mask DDPMs, RePaint inpainting and diffusion style transfer.

"Using Diffusion Models to Generate Synthetic Labelled Data for Medical Image Segmentation":
cluster the real pairs, train one image+mask diffusion model per cluster (``ddpm4``), regenerate
the dilated lesion region of each real pair with RePaint (``repaint``) and restyle the result
toward its real source with loss-guided diffusion (``diffusion-style``).
"""

from medsynth_core import hookimpl

from .ddpm4 import DDPM4Generator
from .repaint import RePaintGenerator
from .style import DiffusionStyleRefiner


@hookimpl
def register_generators(register):
    register("ddpm4", DDPM4Generator)
    register("repaint", RePaintGenerator)


@hookimpl
def register_refiners(register):
    register("diffusion-style", DiffusionStyleRefiner)
