"""``diffusion-style``: guided reverse diffusion that makes an inpainted image look like its real source.

The paper styles each inpainted image (the content source) toward the real image it came from
(the style target) with the ddpm4 model itself: starting from the noised source, every reverse
step is pushed down the gradient of

    L_content = λ_ZeCon ℓ_ZeCon(x̂0, src) + λ_VGG ℓ_VGG(x̂0, src) + λ_MSE ℓ_MSE(x̂0, src)      (Yang et al.)
    L_style   = λ_sty ℓ_sty(x̂0, trg) + λ_L2 ℓ_L2(x̂0, trg) + λ_sem ℓ_sem(x̂0_t, x̂0_t+1) + λ_rng ℓ_rng(x̂0)  (Kwon & Ye)

where x̂0 is Tweedie's estimate of the clean image at step t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_core import (
    ConfigError,
    Context,
    PipelineError,
    Refiner,
    Sample,
    option,
    sample_seed,
    torch_generator,
)
from medsynth_plugins.common.images import image_batch

from .bundle import DiffusionBundle
from .diffusion import TRAIN_STEPS, Schedule, image_to_numpy, match_channels, resize_planes, split_output
from .repaint import REFERENCE
from .unet import encoder_features

STYLE_STREAM = 0x5717E  # derives the refiner's noise seed from the sample's, apart from the generator's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG_LAYERS = (0, 5)  # conv1_1 and conv2_1 of torchvision's vgg19.features, as the paper's code uses
VIT_SIZE = 224
PAPER_PIXELS = 3 * 256 * 256  # Table A.3's weights were tuned on mean-reduced losses of 3 x 256 x 256 images


@dataclass(frozen=True)
class DiffusionStyleConfig:
    """Options of the diffusion-style refiner; the loss weights default to the paper's Table A.3."""

    model: str | None = option(None, "Folder of the ddpm4 checkpoint that made the pairs; required.")
    inference_steps: int = option(200, "Respaced steps of the styling chain (the paper: 200).")
    skip_steps: int = option(80, "Start this many steps into the chain, from the noised source (the paper: 80).")
    lambda_zecon: float = option(500.0, "Weight of the zero-shot contrastive patch loss on UNet encoder features.")
    lambda_vgg: float = option(100.0, "Weight of the VGG feature MSE to the source.")
    lambda_mse: float = option(5000.0, "Weight of the pixel MSE to the source.")
    lambda_sty: float = option(10000.0, "Weight of the ViT [CLS] distance to the target (the real image).")
    lambda_l2: float = option(10000.0, "Weight of the pixel L2 to the target.")
    lambda_sem: float = option(40000.0, "Weight of the semantic divergence between consecutive x0 estimates.")
    lambda_rng: float = option(200.0, "Weight of the range regulariser (x0 outside [-1, 1]).")
    sem_min_t: int = option(250, "Apply the semantic divergence only while t > this (1000-step scale; the "
                                 "paper's code: respaced step 50 of 200).")
    learned_variance: bool = option(True, "Use the model's learned reverse variance (the paper); false: the fixed "
                                          "posterior variance, steadier with few steps or a briefly trained model.")
    vgg_weights: str | None = option(None, "torchvision vgg19 state dict (.pth); without it the UNet encoder "
                                           "stands in.")
    vit_weights: str | None = option(None, "Local DINO ViT folder (transformers, e.g. dino-vitb8); without it the "
                                           "UNet encoder stands in.")
    zecon_layers: tuple[int, ...] = option((0, 2, 5, 8, 11), "UNet encoder features for ZeCon (guided-diffusion "
                                                             "input-block indices).")
    zecon_patches: int = option(256, "Patch locations sampled per layer for ZeCon.")
    zecon_temperature: float = option(0.07, "PatchNCE temperature.")
    max_models_in_memory: int = option(4, "Cluster models kept loaded at once.")

    def __post_init__(self) -> None:
        if not 1 <= self.inference_steps <= TRAIN_STEPS:
            raise ConfigError(f"inference_steps must be 1-{TRAIN_STEPS}, got {self.inference_steps}")
        if not 0 <= self.skip_steps < self.inference_steps:
            raise ConfigError(f"skip_steps must be in [0, inference_steps), got {self.skip_steps}")
        for name in ("lambda_zecon", "lambda_vgg", "lambda_mse", "lambda_sty", "lambda_l2", "lambda_sem",
                     "lambda_rng"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.zecon_patches < 2 or self.zecon_temperature <= 0 or not self.zecon_layers:
            raise ConfigError("zecon_patches must be >= 2, zecon_temperature > 0 and zecon_layers non-empty")
        if self.max_models_in_memory < 1:
            raise ConfigError(f"max_models_in_memory must be >= 1, got {self.max_models_in_memory}")


class DiffusionStyleRefiner(Refiner):
    """Restyle inpainted pairs toward their real source with loss-guided diffusion (DiffuseIT + ZeCon losses).

    Reads the real image from ``meta["reference"]`` (set by ``repaint``), runs the ddpm4 model of
    the sample's cluster from the noised inpainted image back to t = 0, pushing each step's x0
    estimate to keep the inpainted content (ZeCon, VGG, pixel MSE) and take the real image's style
    (ViT [CLS], pixel L2, semantic divergence, range). The mask channel is held at the pair's
    mask, so the label is unchanged. VGG19 and DINO-ViT need local weights; without them the
    UNet's own encoder features stand in, and the log says so.
    """

    Config = DiffusionStyleConfig

    def __init__(self, config: DiffusionStyleConfig | None = None, *, context: Context | None = None,
                 name: str = "", bundle: DiffusionBundle | None = None) -> None:
        super().__init__(config, context=context, name=name)
        cfg = self.config
        if bundle is None and cfg.model is None:
            raise ConfigError(f"{self.name}: option 'model' must name the ddpm4 checkpoint folder that made the pairs")
        self.bundle = bundle or DiffusionBundle.shared(Path(cfg.model), device=self.context.device,
                                                     max_models=cfg.max_models_in_memory)
        device = self.bundle.device
        self.vgg = _load_vgg(cfg.vgg_weights, device) if cfg.vgg_weights and cfg.lambda_vgg else None
        self.vit = _load_vit(cfg.vit_weights, device) if cfg.vit_weights and (cfg.lambda_sty or cfg.lambda_sem) \
            else None
        self.schedule = Schedule()
        self._told = False

    def _tell(self) -> None:
        if self._told:
            return
        self._told = True
        stand_ins = [what for what, net in (("VGG", self.vgg), ("DINO-ViT [CLS]", self.vit)) if net is None]
        if stand_ins:
            self.context.log(f"diffusegen: {self.name} uses the diffusion UNet's encoder features instead of "
                             f"{' and '.join(stand_ins)} (no local weights given: vgg_weights / vit_weights)")

    # ---- the refiner ------------------------------------------------------------------------
    def refine(self, samples: Sequence[Sample]) -> list[Sample]:
        self._tell()
        bundle = self.bundle
        for s in samples:
            if s.meta.get(REFERENCE) is None:
                raise PipelineError(f"{self.name}: sample {s.meta.get('index', '?')} has no meta['reference'] (the "
                                    "real image it was made from); use a generator that keeps it, such as 'repaint'")
        clusters = [s.meta["cluster"] if "cluster" in s.meta else
                    bundle.clusters_of([s.meta.get("condition", {}).get("source")], [s.meta[REFERENCE]],
                                       [_mask_of(s) > 0.5])[0] for s in samples]
        out: list[Sample | None] = [None] * len(samples)
        for cluster in sorted(set(clusters)):
            idx = [i for i, c in enumerate(clusters) if c == cluster]
            group = [samples[i] for i in idx]
            sources, targets = self.tensors(group)
            seeds = [sample_seed(int(s.meta.get("seed", 0)), STYLE_STREAM) for s in group]
            styled, losses = self.stylise(cluster, sources, targets, seeds)
            for k, (i, s) in enumerate(zip(idx, group)):
                image = image_to_numpy(resize_planes(styled[k:k + 1], s.size)[0], bundle.channels)
                refined = s.replace(image=match_channels(image, s.image))
                refined.meta.pop(REFERENCE, None)
                refined.meta["style"] = {"loss": round(float(losses[k]), 6)}
                out[i] = refined
        return out  # type: ignore[return-value]

    def tensors(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sources (inpainted image + mask plane) and targets (real images) in model space, [-1, 1]."""
        b = self.bundle
        images = image_batch([s.image for s in samples], b.size, b.channels) * 2 - 1
        masks = [torch.from_numpy(_mask_of(s))[None, None] for s in samples]
        planes = torch.cat([resize_planes(m, (b.size, b.size)) for m in masks]) * 2 - 1
        targets = image_batch([s.meta[REFERENCE] for s in samples], b.size, b.channels) * 2 - 1
        return torch.cat([images, planes], dim=1), targets

    # ---- guided reverse diffusion ----------------------------------------------------------
    def stylise(self, cluster: int, sources: torch.Tensor, targets: torch.Tensor,
                seeds: Sequence[int]) -> tuple[torch.Tensor, list[float]]:
        """Run the guided chain; return the styled images (B x C x size x size, [-1, 1], CPU) and final losses."""
        cfg, b = self.config, self.bundle
        device = torch.device(b.device)
        unet = b.unet(cluster)
        c = b.channels
        sources, targets = sources.to(device), targets.to(device)
        gens = [torch_generator(s) for s in seeds]
        terms = _Terms(self, unet, sources, targets, gens)
        times = np.round(np.linspace(0, TRAIN_STEPS - 1, cfg.inference_steps)).astype(int).tolist()
        start = cfg.inference_steps - cfg.skip_steps - 1
        x = self.schedule.q_sample(sources, times[start], _noise(gens, sources))
        prev = sources[:, :c]
        total = torch.zeros(len(seeds))
        # a mean over fewer pixels gives each pixel a larger gradient: rescale so that the paper's
        # weights push each pixel as hard as they did at 3 x 256 x 256
        pixel_scale = c * b.size * b.size / PAPER_PIXELS
        for i in range(start, -1, -1):
            t, t_prev = times[i], (times[i - 1] if i > 0 else -1)
            x = x.detach().requires_grad_(True)
            eps, var_values = split_output(unet(x, t).sample, b.planes)
            if not cfg.learned_variance:
                var_values = None
            x0 = self.schedule.predict_x0(x, t, eps)
            losses = terms(x0[:, :c], prev, t)
            total = sum(losses.values())
            grad = torch.autograd.grad(total.sum() * pixel_scale, x)[0] if total.requires_grad \
                else torch.zeros_like(x)
            with torch.no_grad():
                # the posterior uses the clipped estimate for stability; the losses saw the raw one
                mean, var = self.schedule.step_posterior(x0.clamp(-1, 1), x, t, t_prev,
                                                         None if var_values is None else var_values.clamp(-1, 1))
                mean = mean - var * grad  # guided-diffusion's condition_mean: μ + Σ ∇log p, with log p = -L
                if t_prev >= 0:
                    noise = _noise(gens, sources)
                    x = mean + var.sqrt() * noise
                    # the mask plane is known: the pair's own mask, noised to the next step
                    x[:, c:] = self.schedule.q_sample(sources[:, c:], t_prev, noise[:, c:])
                else:
                    x = mean
                prev = x0[:, :c].detach()
        return x[:, :c].detach().clamp(-1, 1).float().cpu(), [float(v) for v in total.detach().cpu()]

    @torch.no_grad()
    def objective(self, cluster: int, images: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor,
                  seeds: Sequence[int]) -> torch.Tensor:
        """The content + style loss of finished images (no semantic-divergence term): lower is better."""
        device = torch.device(self.bundle.device)
        gens = [torch_generator(s) for s in seeds]
        terms = _Terms(self, self.bundle.unet(cluster), sources.to(device), targets.to(device), gens)
        return sum(terms(images.to(device), None, 0).values()).cpu()


class _Terms:
    """The weighted loss terms of one batch, with the source and target features computed once."""

    def __init__(self, refiner: DiffusionStyleRefiner, unet, sources: torch.Tensor, targets: torch.Tensor,
                 gens: list[torch.Generator]) -> None:
        self.cfg, self.unet, self.gens = refiner.config, unet, gens
        self.vgg, self.vit = refiner.vgg, refiner.vit
        self.c = refiner.bundle.channels
        self.sources, self.targets, self.mask = sources, targets, sources[:, self.c:]
        with torch.no_grad():
            src_feats = encoder_features(unet, sources, 0)
            self.layers = [i for i in self.cfg.zecon_layers if i < len(src_feats)] or [0]
            self.src_feats = [src_feats[i] for i in self.layers]
            self.src_vgg = _vgg_features(self.vgg, sources[:, :self.c]) if self.vgg is not None else None
            self.trg_cls = self.cls(targets)

    def cls(self, images: torch.Tensor, feats: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The semantic embedding: DINO-ViT's last-layer [CLS] token, or the pooled deepest UNet features."""
        if self.vit is not None:
            x = _imagenet(images, VIT_SIZE)
            return self.vit(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 0]
        if feats is None:
            feats = encoder_features(self.unet, torch.cat([images, self.mask], dim=1), 0)
        return feats[-1].mean(dim=(2, 3))

    def __call__(self, x0: torch.Tensor, prev: torch.Tensor | None, t: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        feats = encoder_features(self.unet, torch.cat([x0, self.mask], dim=1), 0)
        chosen = [feats[i] for i in self.layers]
        per = {}
        if cfg.lambda_zecon:
            nce = [_patch_nce(q, k, self.gens, cfg.zecon_patches, cfg.zecon_temperature)
                   for q, k in zip(chosen, self.src_feats)]
            per["zecon"] = cfg.lambda_zecon * sum(nce)
        if cfg.lambda_vgg:
            if self.vgg is not None:
                pairs = zip(_vgg_features(self.vgg, x0), self.src_vgg)
            else:
                pairs = zip(chosen, self.src_feats)
            per["vgg"] = cfg.lambda_vgg * sum(_mse(a, b) for a, b in pairs)
        if cfg.lambda_mse:
            per["mse"] = cfg.lambda_mse * _mse(x0, self.sources[:, :self.c])
        if cfg.lambda_sty or cfg.lambda_sem:
            cls = self.cls(x0, feats)
            if cfg.lambda_sty:
                per["sty"] = cfg.lambda_sty * _mse(cls, self.trg_cls)
            if cfg.lambda_sem and prev is not None and t > cfg.sem_min_t:
                with torch.no_grad():
                    prev_cls = self.cls(prev)
                per["sem"] = -cfg.lambda_sem * _mse(cls, prev_cls)
        if cfg.lambda_l2:
            per["l2"] = cfg.lambda_l2 * _mse(x0, self.targets)
        if cfg.lambda_rng:
            per["rng"] = cfg.lambda_rng * (x0 - x0.clamp(-1, 1)).pow(2).flatten(1).mean(dim=1)
        return per or {"none": torch.zeros(len(x0), device=x0.device)}


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference (B,)."""
    return (a - b).pow(2).flatten(1).mean(dim=1)


def _patch_nce(q: torch.Tensor, k: torch.Tensor, gens: list[torch.Generator], patches: int,
               temperature: float) -> torch.Tensor:
    """ZeCon's PatchNCE per sample: each location of x0 should match the same location of the source."""
    losses = []
    for b in range(q.shape[0]):
        qb, kb = q[b].flatten(1).T, k[b].flatten(1).T.detach()
        ids = torch.randperm(qb.shape[0], generator=gens[b])[:patches].to(q.device)
        qb, kb = F.normalize(qb[ids], dim=1), F.normalize(kb[ids], dim=1)
        logits = qb @ kb.T / temperature  # positives on the diagonal, the other locations are negatives
        losses.append(F.cross_entropy(logits, torch.arange(len(ids), device=q.device)))
    return torch.stack(losses)


def _noise(gens: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.randn((1, *like.shape[1:]), generator=g) for g in gens]).to(like.device, like.dtype)


def _imagenet(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """[-1, 1] model images as ImageNet-normalised RGB, optionally resized."""
    x = (images + 1) / 2
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _vgg_features(vgg, images: torch.Tensor) -> list[torch.Tensor]:
    x, out = _imagenet(images), []
    for i, layer in enumerate(vgg):
        x = layer(x)
        if i in VGG_LAYERS:
            out.append(x)
    return out


def _load_vgg(path: str, device: str):
    """torchvision's VGG19 feature stack up to conv2_1, from a local state dict."""
    import torchvision

    try:
        model = torchvision.models.vgg19(weights=None)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError) as err:
        raise ConfigError(f"vgg_weights: cannot load a torchvision vgg19 state dict from {path} "
                          f"({str(err).splitlines()[0]})") from None
    return model.features[:max(VGG_LAYERS) + 1].to(device).eval().requires_grad_(False)


def _load_vit(path: str, device: str):
    """A DINO ViT from a local transformers folder (never downloaded)."""
    from transformers import ViTModel

    try:
        model = ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"vit_weights: cannot load a ViT from {path} ({str(err).splitlines()[0]})") from None
    return model.to(device).eval().requires_grad_(False)


def _mask_of(sample: Sample) -> np.ndarray:
    """The pair's mask as a float foreground map: the binary mask if set, else the soft mask."""
    if sample.mask is not None:
        return (sample.mask > 0).astype(np.float32)
    if sample.soft_mask is not None:
        return sample.soft_mask.astype(np.float32)
    return np.zeros(sample.size, dtype=np.float32)
