"""Fang et al.: mask-conditioned image generation with ControlNet on a Stable-Diffusion-style base."""
