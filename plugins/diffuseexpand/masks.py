"""The ``diffuseexpand-masks`` mask source: Stage III's first phase, masks sampled from noise (y1 = 0)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsynth_core import Condition, ConfigError, MaskSource, option, sample_seed, torch_generator

from . import store
from .networks import decode_masks
from .sampling import Phase, SamplingOptions, initial_noise, sample

MASK_STREAM = 1  # the mask's noise comes from a stream derived from the sample seed, not from the image's


@dataclass(frozen=True)
class DiffuseExpandMasksConfig(SamplingOptions):
    """Options of the diffuseexpand-masks source."""

    checkpoint: str | None = option(None, "The folder `medsynth train diffuseexpand` wrote (required).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.checkpoint is not None and not (Path(self.checkpoint) / "checkpoint.json").is_file():
            raise ConfigError(f"checkpoint {self.checkpoint!r} is not a checkpoint folder (no checkpoint.json); "
                              "give the folder `medsynth train diffuseexpand` wrote")


class DiffuseExpandMaskSource(MaskSource):
    """DiffuseExpand masks: sampled from noise by the trained DPM (y1 = 0), then binarised."""

    Config = DiffuseExpandMasksConfig
    provides = frozenset({"mask"})

    bundle: store.Bundle | None = None

    def conditions(self, indices: Sequence[int], seeds: Sequence[int]) -> list[Condition]:
        bundle = self._loaded()
        device = self.context.device
        noise, generators = initial_noise((bundle.channels, bundle.size, bundle.size),
                                          [sample_seed(seed, MASK_STREAM) for seed in seeds], device, torch_generator)
        # masks need no mask condition; classifier guidance only asks the segmenter's head for "a mask"
        x0 = sample(bundle.denoiser, bundle.segmenter, bundle.schedule, self.config, Phase(y1=0), noise, generators,
                    bundle.classes)
        index = decode_masks(x0, bundle.classes).cpu().numpy()
        values = np.asarray(bundle.values, dtype=np.uint8)
        return [Condition(mask=values[k], meta={"source": "diffuseexpand"}) for k in index]

    def _loaded(self) -> store.Bundle:
        if self.bundle is None:
            if self.config.checkpoint is None:
                raise ConfigError(f"{self.name}: set checkpoint to the folder `medsynth train diffuseexpand` wrote")
            with torch.no_grad():
                self.bundle = store.load_bundle(self.config.checkpoint, self.context.device)
        return self.bundle
