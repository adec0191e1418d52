"""Saragih et al.: clustered image+mask DDPMs, RePaint inpainting and diffusion style transfer."""
