"""The UM2I networks: a pix2pix(HD)-style multi-task generator, PatchGAN discriminators, losses.

The generator G2 of the paper is pix2pixHD's global generator (4 down-sampling, 9 residual and
4 up-sampling blocks, each convolution + batch norm + activation) with two heads on the shared
decoder: the image and the segmentation. Both heads are judged by their own PatchGAN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from medsynth_core import CheckpointError

Norm = Literal["batch", "instance"]


@dataclass(frozen=True)
class NetArch:
    """Shape of the UM2I generator and discriminators."""

    in_channels: int
    image_channels: int
    classes: int
    ngf: int = 64
    down: int = 4
    residual: int = 9
    ndf: int = 64
    d_layers: int = 3
    norm: Norm = "batch"


def _norm(kind: Norm, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.InstanceNorm2d(channels, affine=True)


class ResidualBlock(nn.Module):
    """Two 3 x 3 convolutions with a skip, as in pix2pixHD."""

    def __init__(self, channels: int, norm: Norm) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(norm, channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(norm, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class MultiTaskGenerator(nn.Module):
    """Condition (UM or one-hot mask) -> (image in [-1, 1], segmentation logits)."""

    def __init__(self, arch: NetArch) -> None:
        super().__init__()
        ngf, norm = arch.ngf, arch.norm
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(arch.in_channels, ngf, 7), _norm(norm, ngf),
                                   nn.ReLU(True)]
        for i in range(arch.down):
            c = ngf * 2**i
            layers += [nn.Conv2d(c, c * 2, 3, stride=2, padding=1), _norm(norm, c * 2), nn.ReLU(True)]
        c = ngf * 2**arch.down
        layers += [ResidualBlock(c, norm) for _ in range(arch.residual)]
        for i in range(arch.down, 0, -1):
            c = ngf * 2**i
            # nearest upsampling + convolution avoids the checkerboard of transposed convolutions
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c // 2, 3, padding=1),
                       _norm(norm, c // 2), nn.ReLU(True)]
        self.trunk = nn.Sequential(*layers)
        self.image_head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, arch.image_channels, 7), nn.Tanh())
        self.seg_head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, arch.classes, 7))

    def forward(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(condition)
        return self.image_head(features), self.seg_head(features)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN: a grid of real/fake scores, one per receptive field; returns its features too."""

    def __init__(self, in_channels: int, ndf: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True))]
        c = ndf
        for i in range(1, layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks.append(nn.Sequential(nn.Conv2d(c, out, 4, stride, 1), nn.InstanceNorm2d(out, affine=True),
                                        nn.LeakyReLU(0.2, True)))
            c = out
        blocks.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return x, feats[:-1]


def lsgan_loss(scores: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss (pix2pixHD's choice), stable with small batches."""
    return F.mse_loss(scores, torch.full_like(scores, 1.0 if real else 0.0))


def feature_matching_loss(fake_feats: list[torch.Tensor], real_feats: list[torch.Tensor]) -> torch.Tensor:
    """L1 between discriminator features of fake and real: pix2pixHD's perceptual stand-in without VGG."""
    return sum(F.l1_loss(f, r.detach()) for f, r in zip(fake_feats, real_feats)) / max(1, len(fake_feats))


class VGGPerceptual(nn.Module):
    """L1 between VGG features (relu1_1 ... relu5_1, pix2pixHD's weights) of fake and real images."""

    LAYERS = {"vgg16": (1, 6, 11, 18, 25), "vgg19": (1, 6, 11, 20, 29)}
    WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)

    def __init__(self, features: nn.Sequential, arch: str) -> None:
        super().__init__()
        self.arch = arch
        ends = [c + 1 for c in self.LAYERS[arch]]  # each slice ends after its ReLU
        self.slices = nn.ModuleList(features[start:end] for start, end in zip([0, *ends[:-1]], ends))
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406])[None, :, None, None])
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225])[None, :, None, None])

    def train(self, mode: bool = True) -> VGGPerceptual:  # frozen: always in eval mode
        return super().train(False)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x, y = self._prepare(fake), self._prepare(real)
        loss = torch.zeros((), device=fake.device)
        for weight, block in zip(self.WEIGHTS, self.slices):
            x, y = block(x), block(y)
            loss = loss + weight * F.l1_loss(x, y.detach())
        return loss

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2  # generator images are in [-1, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x[:, :3] - self.mean) / self.std


def load_vgg(path: Path) -> VGGPerceptual:
    """A VGG16/19 feature extractor from a torchvision state_dict (arch found from its conv layers)."""
    import torchvision

    if not path.is_file():
        raise CheckpointError(f"vgg_weights {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for damaged files
        raise CheckpointError(f"vgg_weights {path}: cannot load ({err})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CheckpointError(f"vgg_weights {path}: expected a state_dict, got {type(state).__name__}")
    convs = sum(1 for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4)
    arch = {13: "vgg16", 16: "vgg19"}.get(convs)
    if arch is None:
        raise CheckpointError(f"vgg_weights {path}: {convs} convolutions in 'features'; expected a torchvision "
                              "vgg16 (13) or vgg19 (16) state_dict")
    with torch.device("meta"):  # no random init of 138 M parameters that the state_dict replaces anyway
        model = getattr(torchvision.models, arch)(weights=None)
    # a full state_dict loads as is; one holding only features.* (the part used here) is accepted too
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(k.startswith("features.") for k in missing):
        raise CheckpointError(f"vgg_weights {path}: does not match torchvision {arch} "
                              f"(unexpected {unexpected[:2]}, missing {missing[:2]})")
    return VGGPerceptual(model.features, arch)


def masked_segmentation_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Soft Dice + cross-entropy over the pixels whose ``weight`` is > 0 (N x H x W).

    Labelled pixels weigh 1; pseudo-labelled pixels weigh 1 where the pseudo-label is confident
    and 0 elsewhere, so unconfident pixels give neither loss nor gradient.
    """
    weight = weight.float()
    total = weight.sum()
    if float(total) == 0:
        return logits.sum() * 0.0  # keeps the graph; nothing to learn from this batch
    ce = (F.cross_entropy(logits, target, reduction="none") * weight).sum() / total
    prob = logits.softmax(dim=1) * weight[:, None]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float() * weight[:, None]
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    sizes = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = 1 - (2 * inter + 1) / (sizes + 1)
    return ce + dice[1:].mean() if logits.shape[1] > 1 else ce + dice.mean()
