"""Cross-attention maps of chosen prompt tokens, read through diffusers' ``set_attn_processor`` hook.

:class:`AttentionStore` accumulates eq. 2 of the paper,

    Â_j = 1 / (S·T) · Σ_{s, t} A_j^{s,t} / max(A_j^{s,t}),

over the denoising steps ``s`` and UNet layers ``t`` it is told to record. Each head-averaged map is
normalised by its maximum and *added* to one running sum per attention resolution, so memory is
``batch x tokens x (8² + 16² + 32² + 64²)`` floats at 512 px whatever the number of steps. Because
upsampling is linear, upsampling each resolution's sum to the image size and dividing by the number of
maps is exactly the mean of the upsampled maps.

:func:`record_attention` installs :class:`TokenAttentionProcessor` on every attention layer of a UNet
(self-attention passes straight through to PyTorch's fused kernel) and counts UNet calls as steps;
:func:`real_image_attention` noises real images to chosen timesteps and reads the same maps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_core import ConfigError, torch_generator

PLACES = ("down", "mid", "up")


@dataclass(frozen=True)
class AttentionOptions:
    """Which maps count: UNet places, attention resolutions (cells per side; empty: all) and a step window.

    ``steps`` is a (from, to) fraction of the UNet calls of one sampling run, 0 being the first (noisiest)
    call; call ``k`` of ``n`` is recorded when ``from <= k / n < to``.
    """

    places: tuple[str, ...] = PLACES
    resolutions: tuple[int, ...] = ()
    steps: tuple[float, float] = (0.0, 1.0)


def token_positions(tokenizer: Any, prompt: str, words: Sequence[str]) -> list[int]:
    """Positions in the tokenized ``prompt`` of every token of every word in ``words``.

    A word the tokenizer splits into several tokens contributes all of them; a word that does not occur in
    the prompt is a ConfigError naming it.
    """
    ids = _ids(tokenizer, prompt, special=True)
    positions: list[int] = []
    for word in words:
        piece = _ids(tokenizer, word, special=False)
        found = [k for k in range(len(ids) - len(piece) + 1) if piece and ids[k:k + len(piece)] == piece]
        if not found:
            raise ConfigError(f"token word {word!r} does not occur in prompt {prompt!r} (within the tokenizer's "
                              f"{tokenizer.model_max_length} tokens); put the class word in every prompt")
        for start in found:
            positions.extend(range(start, start + len(piece)))
    return sorted(set(positions))


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, truncation=True, max_length=tokenizer.model_max_length,
                          add_special_tokens=special).input_ids)


def grid_size(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of a layer's map from its number of query tokens and the UNet input's size
    (each down-sampling halves the size, rounding up)."""
    h, w = latent_hw
    for k in range(8):
        hk, wk = math.ceil(h / 2**k), math.ceil(w / 2**k)
        if hk * wk == tokens:
            return hk, wk
    side = int(round(math.sqrt(tokens)))
    if side * side != tokens:
        raise ValueError(f"cannot place {tokens} attention queries on a grid for input {latent_hw}")
    return side, side


class AttentionStore:
    """Running sums of max-normalised cross-attention maps of chosen tokens (eq. 2), one per resolution.

    ``positions[k]`` lists the token positions of sample ``k``'s prompt whose maps make its soft mask.
    ``latent_hw`` is the spatial size of the UNet input, used to recover each layer's map size.
    ``calls`` is how many UNet calls one run makes (for the step window). With classifier-free guidance
    the UNet sees [unconditional, conditional] batches; only the conditional half is read.
    """

    def __init__(self, positions: Sequence[Sequence[int]], latent_hw: tuple[int, int], calls: int,
                 options: AttentionOptions | None = None) -> None:
        if not positions or any(not p for p in positions):
            raise ValueError("every sample needs at least one token position")
        self.options = options or AttentionOptions()
        self.latent_hw, self.calls = latent_hw, max(1, int(calls))
        width = max(len(p) for p in positions)
        # pad short lists by repeating their first position; the weights give the padding no say
        self.index = torch.tensor([[*p, *([p[0]] * (width - len(p)))] for p in positions], dtype=torch.long)
        self.weight = torch.tensor([[1.0 / len(p)] * len(p) + [0.0] * (width - len(p)) for p in positions])
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.maps = 0  # maps added per sample and token: S·T of eq. 2
        self.step = -1

    @property
    def batch(self) -> int:
        return int(self.index.shape[0])

    def next_step(self) -> None:
        """Called before every UNet forward: one more denoising step."""
        self.step += 1

    def recording(self) -> bool:
        """Whether the current step lies in the step window."""
        lo, hi = self.options.steps
        k = min(max(self.step, 0), self.calls - 1)
        return lo <= k / self.calls < hi

    def wants(self, place: str, hw: tuple[int, int]) -> bool:
        """Whether a layer at ``place`` with maps of ``hw`` cells is read at the current step."""
        res = self.options.resolutions
        return place in self.options.places and (not res or max(hw) in res) and self.recording()

    def map_size(self, tokens: int) -> tuple[int, int]:
        """Rows and columns of a layer's map from its number of query tokens."""
        return grid_size(tokens, self.latent_hw)

    def add(self, probs: torch.Tensor, heads: int, hw: tuple[int, int]) -> None:
        """Add the attention probabilities of one layer call: ``probs`` is (batch·heads) x queries x keys."""
        n = self.batch
        probs = probs.detach()
        total = probs.shape[0] // heads
        probs = probs.reshape(total, heads, probs.shape[1], probs.shape[2])[total - n:]  # conditional half
        index = self.index.to(probs.device)[:, None, None, :].expand(n, heads, probs.shape[2], self.index.shape[1])
        picked = probs.gather(3, index).float().mean(dim=1)  # n x queries x tokens, averaged over heads
        maps = picked.transpose(1, 2).reshape(n, -1, *hw)
        maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        if hw in self.sums:
            self.sums[hw] += maps
        else:
            self.sums[hw] = maps.clone()
        self.maps += 1

    def nbytes(self) -> int:
        """Bytes held by the accumulators (independent of the number of steps)."""
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    def token_maps(self, size: tuple[int, int]) -> torch.Tensor:
        """Â_j of eq. 2 for every chosen token: batch x tokens x size, upsampled bilinearly."""
        if not self.maps:
            raise ValueError("no attention map was recorded; check the places, resolutions and steps options")
        total = None
        for s in self.sums.values():
            up = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            total = up if total is None else total + up
        return total / self.maps

    def soft_masks(self, size: tuple[int, int]) -> torch.Tensor:
        """One soft mask per sample: its tokens' Â_j averaged (batch x size), in [0, 1]."""
        maps = self.token_maps(size)
        return (maps * self.weight.to(maps)[:, :, None, None]).sum(dim=1).clamp(0, 1)


class TokenAttentionProcessor:
    """Attention that also hands the cross-attention probabilities of one layer to an :class:`AttentionStore`
    (or any object with its ``wants``, ``map_size``, ``add`` and ``next_step``, such as the grounding loss).

    Layers and steps the store does not want run PyTorch's fused attention unchanged; the ones it wants
    compute the probabilities explicitly (eq. 1, ``softmax(QK^T / sqrt(d))``), which is what diffusers'
    plain ``AttnProcessor`` does, so the UNet's output is the same either way.
    """

    def __init__(self, store: AttentionStore, place: str) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.store, self.place = store, place
        self.fused = AttnProcessor2_0()

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is None or hidden_states.ndim != 3 or attn.spatial_norm is not None:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        hw = self.store.map_size(hidden_states.shape[1])
        if not self.store.wants(self.place, hw):
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        batch, keys = encoder_hidden_states.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store.add(probs, attn.heads, hw)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def layer_place(name: str) -> str:
    """'down', 'mid' or 'up' for an attention layer name such as ``up_blocks.1.attentions.0...attn2.processor``."""
    head = name.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, "other")


@contextmanager
def record_attention(unet: Any, store: AttentionStore) -> Iterator[AttentionStore]:
    """Install the recording processors on ``unet`` (and a step counter); restore the old ones on exit."""
    before = dict(unet.attn_processors)
    unet.set_attn_processor({name: TokenAttentionProcessor(store, layer_place(name)) for name in before})
    hook = unet.register_forward_pre_hook(lambda module, args: store.next_step())
    try:
        yield store
    finally:
        hook.remove()
        unet.set_attn_processor(before)


@torch.no_grad()
def real_image_attention(base: Any, images: torch.Tensor, prompts: Sequence[str], words: Sequence[str],
                         timesteps: Sequence[int], seeds: Sequence[int],
                         options: AttentionOptions | None = None) -> np.ndarray:
    """Soft masks (N x H x W in [0, 1]) of real ``images`` (N x C x H x W in [0, 1]) from their attention.

    Each image is noised to every timestep in ``timesteps`` (noise drawn from its own seed) and denoised
    once with its prompt; the maps of the tokens of ``words`` are read as when sampling, so the timesteps
    play the role of eq. 2's steps. For a latent base the image is encoded to the mean of its posterior.
    """
    if len(images) != len(prompts) or len(images) != len(seeds):
        raise ValueError("one prompt and one seed per image")
    device = base.unet.device
    dtype = base.unet.dtype
    x = images.to(device) * 2 - 1
    if base.vae is not None:
        x0 = base.vae.encode(x.to(base.vae.dtype)).latent_dist.mean * base.vae.config.scaling_factor
    else:
        x0 = x
    x0 = x0.float()
    emb = base.encode_prompts(list(prompts), device).to(dtype)
    positions = [token_positions(base.tokenizer, p, words) for p in prompts]
    store = AttentionStore(positions, tuple(x0.shape[-2:]), len(timesteps), options)
    gens = [torch_generator(s, "cpu") for s in seeds]
    with record_attention(base.unet, store):
        for t in timesteps:
            noise = torch.stack([torch.randn(tuple(x0.shape[1:]), generator=g) for g in gens]).to(x0)
            steps = torch.full((len(x0),), int(t), device=device, dtype=torch.long)
            noisy = base.scheduler.add_noise(x0, noise, steps)
            base.unet(noisy.to(dtype), steps, emb)
    return store.soft_masks(tuple(images.shape[-2:])).cpu().numpy().astype(np.float32)
