"""The image+mask UNet: a diffusers UNet2DModel shaped like guided-diffusion's, and its encoder features."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medsynth_core import ConfigError


def level_sizes(size: int, levels: int) -> list[int]:
    """Feature-map size of each UNet level (the first level works at full size)."""
    return [size // 2**i for i in range(levels)]


def check_architecture(size: int, block_out_channels: Sequence[int], attention_resolutions: Sequence[int],
                       attention_head_dim: int, norm_num_groups: int, layers_per_block: int) -> None:
    """Raise ConfigError (one line) for a UNet shape that diffusers cannot build."""
    if not block_out_channels or any(c < 1 for c in block_out_channels):
        raise ConfigError(f"block_out_channels must be positive channel counts, got {tuple(block_out_channels)}")
    if size < 8 or size % 2 ** (len(block_out_channels) - 1):
        raise ConfigError(f"size must be >= 8 and divisible by {2 ** (len(block_out_channels) - 1)} "
                          f"({len(block_out_channels)} levels), got {size}")
    if layers_per_block < 1:
        raise ConfigError(f"layers_per_block must be >= 1, got {layers_per_block}")
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if norm_num_groups < 1 or bad:
        raise ConfigError(f"norm_num_groups must divide every entry of block_out_channels; {norm_num_groups} "
                          f"does not divide {bad[0] if bad else norm_num_groups}")
    sizes = level_sizes(size, len(block_out_channels))
    attended = [c for c, s in zip(block_out_channels, sizes) if s in attention_resolutions]
    attended.append(block_out_channels[-1])  # the middle block always attends
    if attention_head_dim < 1 or any(c % attention_head_dim for c in attended):
        raise ConfigError(f"attention_head_dim must divide the channels of every attention level "
                          f"({sorted(set(attended))}), got {attention_head_dim}")


def build_unet(*, size: int, planes: int, learn_sigma: bool, block_out_channels: Sequence[int],
               layers_per_block: int, attention_resolutions: Sequence[int], attention_head_dim: int,
               norm_num_groups: int, resblock_updown: bool, dropout: float):
    """A UNet2DModel taking ``planes`` channels (image + mask) and predicting noise (and variance).

    Mirrors the paper's guided-diffusion model (Table A.1): self-attention at the listed feature
    sizes and in the middle, scale-shift normalisation, residual up/down-sampling, and twice the
    output channels when the variance is learned.
    """
    from diffusers import UNet2DModel

    sizes = level_sizes(size, len(block_out_channels))
    attn = [s in attention_resolutions for s in sizes]
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if resblock_updown else \
        ("DownBlock2D", "UpBlock2D")
    down = tuple("AttnDownBlock2D" if a else plain_down for a in attn)
    up = tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attn))
    return UNet2DModel(
        sample_size=size, in_channels=planes, out_channels=planes * (2 if learn_sigma else 1),
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=down, up_block_types=up, attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups, resnet_time_scale_shift="scale_shift", dropout=dropout,
        downsample_type="resnet" if resblock_updown else "conv", upsample_type="resnet" if resblock_updown else "conv",
    )


def encoder_features(unet, x: torch.Tensor, t: torch.Tensor | int) -> list[torch.Tensor]:
    """The UNet encoder's feature maps, in guided-diffusion's ``input_blocks`` order.

    Entry 0 is the input convolution, then every residual block and downsampler of every level,
    so ZeCon's layer indices (0, 2, 5, 8, 11) mean what they mean in the paper's code. Runs only
    the encoder half of ``UNet2DModel.forward``.
    """
    t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(x.shape[0])
    emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype))
    sample = unet.conv_in(x)
    feats = [sample]
    for block in unet.down_blocks:
        sample, res = block(hidden_states=sample, temb=emb)
        feats.extend(res)
    return feats
