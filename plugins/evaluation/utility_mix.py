"""Paper 001's augmentation: each batch item is a real pair, swapped with probability alpha for a synthetic one.

The loop is ``medsynth_plugins.common.segmenter.train_segmenter``'s (same model, loss, optimiser,
flips and random stream), except that each drawn real image i is replaced, with probability
``alpha``, by one of its synthetic partners X~_ij (j uniform). The swap draws come from a
separate generator, so ``alpha = 0`` trains exactly the real-only model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from medsynth_core import Sample
from medsynth_plugins.common.images import image_batch, mask_batch
from medsynth_plugins.common.segmenter import Segmenter, SegmenterRecipe, build_unet, segmentation_loss

SWAP_STREAM = 0x5EED  # offsets the swap generator's seed from the recipe's


def train_mixed(reals: Sequence[Sample], partners: Sequence[Sequence[Sample]], alpha: float, recipe: SegmenterRecipe,
                *, classes: int = 2, device: str = "cpu",
                on_step: Callable[[int, float], None] | None = None) -> Segmenter:
    """Train a U-Net on ``reals`` where ``partners[i]`` may stand in for ``reals[i]`` with probability ``alpha``."""
    if len(partners) != len(reals):
        raise ValueError(f"train_mixed: {len(reals)} real pairs but {len(partners)} partner lists")
    flat = [s for group in partners for s in group]
    channels = 3 if any(s.image.ndim == 3 for s in [*reals, *flat]) else 1
    torch.manual_seed(recipe.seed)
    model = build_unet(recipe, channels, classes).to(device).train()
    images = image_batch([s.image for s in reals], recipe.size, channels)
    masks = mask_batch([s.mask for s in reals], recipe.size).clamp_(max=classes - 1)
    if flat:
        syn_images = image_batch([s.image for s in flat], recipe.size, channels)
        syn_masks = mask_batch([s.mask for s in flat], recipe.size).clamp_(max=classes - 1)
    starts, start = [], 0
    for group in partners:
        starts.append(start)
        start += len(group)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    rng = torch.Generator().manual_seed(recipe.seed)
    swap_rng = torch.Generator().manual_seed(recipe.seed + SWAP_STREAM)
    for step in range(recipe.steps):
        pick = torch.randint(len(reals), (min(recipe.batch_size, len(reals)),), generator=rng)
        swap = torch.rand(len(pick), generator=swap_rng) < alpha
        which = torch.rand(len(pick), generator=swap_rng)
        x, y = images[pick].clone(), masks[pick].clone()
        for k, i in enumerate(pick.tolist()):
            if swap[k] and partners[i]:
                j = starts[i] + min(int(which[k] * len(partners[i])), len(partners[i]) - 1)
                x[k], y[k] = syn_images[j], syn_masks[j]
        x, y = x.to(device), y.to(device)
        flip = torch.rand(len(pick), generator=rng) < 0.5
        x = torch.where(flip[:, None, None, None].to(device), x.flip(-1), x)
        y = torch.where(flip[:, None, None].to(device), y.flip(-1), y)
        loss = segmentation_loss(model(x), y, classes)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if on_step is not None:
            on_step(step, loss.item())
    return Segmenter(model.eval(), recipe, classes, channels, device)
