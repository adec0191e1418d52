"""Fang et al.: mask-conditioned image generation with ControlNet on a Stable-Diffusion-style base."""

from medsynth_core import hookimpl

from .generator import ControlNetGenerator


@hookimpl
def register_generators(register):
    register("controlnet", ControlNetGenerator)
