"""The two networks of DiffuseExpand and the encoding of masks for them.

- The denoiser (Stage I) is a diffusers ``UNet2DModel``. Its input is the noisy sample (an image,
  or a mask written into the image channels) followed by one condition channel that holds the
  conditioning mask, or zeros for "no condition"; the flag ``y1`` (0 = mask, 1 = image) enters
  through the model's class embedding.
- The segmenter (Stage II) is a time-conditioned ``UNet2DModel`` f_psi that maps a noisy input
  x_t to mask logits, plus a small head g_omega that reads those logits and says whether x_t is
  an image or a mask (eq. 4 of the paper).

Masks are label maps with ``K`` classes (class 0 is the background). For the diffusion model a
mask becomes one value per pixel, class ``k`` -> ``-1 + 2k / (K - 1)``, so a binary mask is
{-1, 1} and decoding is "nearest class value" (for binary masks: the sign).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from medsynth_core import CheckpointError


def norm_groups(channels: Sequence[int]) -> int:
    """The GroupNorm group count for these widths: divides all, at most 32, >= 4 channels a group if possible."""
    common = math.gcd(*channels)
    divisors = [g for g in range(1, 33) if common % g == 0]
    roomy = [g for g in divisors if common // g >= 4]
    return max(roomy or divisors)


def _blocks(levels: int, attention: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention and levels > 1:  # self-attention at the coarsest resolution, as ADM-style models do
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return tuple(down), tuple(up)


def build_denoiser(channels: int, size: int, block_channels: Sequence[int], layers_per_block: int,
                   attention: bool) -> UNet2DModel:
    """The Stage I UNet: ``channels`` + 1 condition channel in, ``channels`` of noise out, y1 as class label."""
    down, up = _blocks(len(block_channels), attention)
    return UNet2DModel(
        sample_size=size, in_channels=channels + 1, out_channels=channels,
        block_out_channels=tuple(block_channels), layers_per_block=layers_per_block,
        norm_num_groups=norm_groups(block_channels), down_block_types=down, up_block_types=up,
        attention_head_dim=min(8, block_channels[-1]), num_class_embeds=2)


def adapt_pretrained(pretrained: UNet2DModel, channels: int, size: int) -> UNet2DModel:
    """A Stage I denoiser initialised from a pretrained unconditional ``UNet2DModel``.

    The pretrained body is kept as is; the first and last convolutions are mapped to our channel
    count (a grey image is an RGB image with equal channels, so its input weights are the RGB
    weights summed and its output the RGB outputs averaged), the condition channel starts at zero
    and the y1 embedding starts at zero, so before fine-tuning the model is the pretrained one.
    """
    cfg = dict(pretrained.config)
    theirs = int(cfg["in_channels"])
    if int(cfg["out_channels"]) != theirs:
        raise CheckpointError(f"pretrained UNet has {theirs} input but {cfg['out_channels']} output channels; "
                              "expected an unconditional noise predictor (in = out)")
    if theirs != channels and 1 not in (theirs, channels):
        raise CheckpointError(f"pretrained UNet has {theirs} channels and the data {channels}; "
                              "only equal counts or grey <-> colour can be mapped")
    cfg.update(in_channels=channels + 1, out_channels=channels, sample_size=size, num_class_embeds=2,
               class_embed_type=None)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    model = UNet2DModel.from_config(cfg)
    state = pretrained.state_dict()
    own = model.state_dict()
    with torch.no_grad():
        w_in = state["conv_in.weight"]
        own["conv_in.weight"].zero_()
        own["conv_in.weight"][:, :channels] = _map_in(w_in, channels)
        own["conv_in.bias"].copy_(state["conv_in.bias"])
        own["conv_out.weight"].copy_(_map_out(state["conv_out.weight"], channels))
        own["conv_out.bias"].copy_(_map_out(state["conv_out.bias"], channels))
        own["class_embedding.weight"].zero_()
        skip = {"conv_in.weight", "conv_in.bias", "conv_out.weight", "conv_out.bias", "class_embedding.weight"}
        for key, value in state.items():
            if key not in skip and key in own and own[key].shape == value.shape:
                own[key].copy_(value)
    model.load_state_dict(own)
    return model


def _map_in(weight: torch.Tensor, channels: int) -> torch.Tensor:
    theirs = weight.shape[1]
    if theirs == channels:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight.repeat(1, channels, 1, 1) / channels


def _map_out(weight: torch.Tensor, channels: int) -> torch.Tensor:
    theirs = weight.shape[0]
    if theirs == channels:
        return weight
    if channels == 1:
        return weight.mean(dim=0, keepdim=True)
    return weight.repeat(channels, *([1] * (weight.dim() - 1)))


class NoisySegmenter(ModelMixin, ConfigMixin):
    """f_psi (a time-conditioned U-Net: noisy input -> mask logits) and g_omega (logits -> image or mask).

    ``forward(x_t, t)`` returns ``(mask_logits, type_logit)``: mask logits are one channel for
    binary masks (sigmoid) or ``classes`` channels (softmax); ``type_logit`` (N) is the logit of
    "x_t is an image" (y1 = 1).
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, classes: int = 2, block_channels: tuple[int, ...] = (16, 32),
                 layers_per_block: int = 1, sample_size: int = 32, head_channels: int = 16) -> None:
        super().__init__()
        outputs = 1 if classes == 2 else classes
        down, up = _blocks(len(block_channels), attention=False)
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=outputs,
            block_out_channels=tuple(block_channels), layers_per_block=layers_per_block,
            norm_num_groups=norm_groups(block_channels), down_block_types=down, up_block_types=up,
            add_attention=False)
        self.head = nn.Sequential(
            nn.Conv2d(outputs, head_channels, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(head_channels, head_channels, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(head_channels, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.unet(x, t).sample
        return logits, self.head(logits)[:, 0]


def encode_masks(index: torch.Tensor, classes: int, channels: int) -> torch.Tensor:
    """N x H x W class indices -> N x channels x H x W values in [-1, 1] (class k at -1 + 2k/(K-1))."""
    values = index.float() * (2.0 / (classes - 1)) - 1.0
    return values[:, None].expand(-1, channels, -1, -1).contiguous()


def decode_masks(values: torch.Tensor, classes: int) -> torch.Tensor:
    """N x C x H x W diffusion output -> N x H x W class indices (nearest class value; binary: the sign)."""
    mean = values.float().mean(dim=1)
    return torch.round((mean.clamp(-1, 1) + 1.0) * (classes - 1) / 2.0).long()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """Per-sample soft Dice + (binary) cross-entropy of eq. 4, shape N."""
    if classes == 2:
        fg = target.float()[:, None]
        bce = F.binary_cross_entropy_with_logits(logits, fg, reduction="none").mean((1, 2, 3))
        prob = torch.sigmoid(logits)
        dice = 1 - (2 * (prob * fg).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + fg.sum((1, 2, 3)) + 1)
        return bce + dice
    ce = F.cross_entropy(logits, target, reduction="none").mean((1, 2))
    prob = logits.softmax(1)
    onehot = F.one_hot(target, classes).permute(0, 3, 1, 2).float()
    dice = 1 - (2 * (prob * onehot).sum((2, 3)) + 1) / (prob.sum((2, 3)) + onehot.sum((2, 3)) + 1)
    return ce + dice[:, 1:].mean(1)
