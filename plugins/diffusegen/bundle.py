"""A ddpm4 checkpoint folder, and the trained models it holds, for the generators and the refiner.

Layout::

    checkpoint.json         the card: config, steps, per-cluster summary and the stem -> cluster map
    clusters.json           the clustering (extractor, centroids) to place pairs it has not seen
    models/cluster-00/      one diffusers UNet2DModel per cluster (or models/all/ for the whole set),
                            written with save_pretrained, plus train_state.pt to resume training
    loss.csv                step, model, loss (append-only)

Models load lazily and at most ``max_models`` stay in memory: twenty paper-scale UNets do not
fit on one GPU together.
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medsynth_core import CheckpointError, read_checkpoint_card

from .clustering import Clusters, read_clusters

GENERATOR = "ddpm4"
CLUSTERS_FILE = "clusters.json"
MODELS = "models"
_SHARED: dict[tuple[str, str, int], DiffusionBundle] = {}


def model_dir(folder: Path, index: int, per_cluster: bool) -> Path:
    """Where the model of cluster ``index`` lives (``models/all`` for the single Full-Diff model)."""
    return folder / MODELS / (f"cluster-{index:02d}" if per_cluster else "all")


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; a kill at any point leaves the old or the new one findable."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """Undo a replacement cut between its two renames."""
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():
        old.rename(target)


class DiffusionBundle:
    """The trained image+mask diffusion models of one checkpoint, with their clustering."""

    def __init__(self, *, channels: int, size: int, learn_sigma: bool, per_cluster: bool, clusters: Clusters,
                 loader: Callable[[int], Any], device: str = "cpu", max_models: int = 4, source: str = "") -> None:
        self.channels, self.size, self.learn_sigma = channels, size, learn_sigma
        self.per_cluster, self.clusters = per_cluster, clusters
        self.device, self.max_models, self.source = device, max(1, max_models), source
        self._loader = loader
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self.on_load: Callable[[Any], Any] | None = None  # e.g. Generator.tune: the run's channels_last/compile

    @property
    def planes(self) -> int:
        """Model channels: the image channels and one mask channel."""
        return self.channels + 1

    def model_index(self, cluster: int) -> int:
        return int(cluster) if self.per_cluster else 0

    def unet(self, cluster: int):
        """The (frozen, eval-mode) UNet that models ``cluster``."""
        index = self.model_index(cluster)
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        while len(self._cache) >= self.max_models:
            self._cache.popitem(last=False)
        unet = self._loader(index).to(self.device).eval().requires_grad_(False)
        if self.on_load is not None:
            unet = self.on_load(unet)
        self._cache[index] = unet
        return unet

    def weighted_cluster(self, rng: np.random.Generator) -> int:
        """A cluster drawn in proportion to its size (so the generated set mirrors the real one)."""
        sizes = np.asarray(self.clusters.sizes(), dtype=np.float64)
        if len(sizes) == 1:
            return 0
        return int(rng.choice(len(sizes), p=sizes / sizes.sum()))

    def clusters_of(self, stems: list[str | None], images: list[np.ndarray], masks: list[np.ndarray]) -> list[int]:
        """The cluster of each real pair: its training assignment, else the nearest centroid."""
        found = [self.clusters.assignments.get(s) if s is not None else None for s in stems]
        unknown = [i for i, c in enumerate(found) if c is None]
        if unknown:
            guessed = self.clusters.predict([images[i] for i in unknown], [masks[i] for i in unknown], self.device)
            for i, c in zip(unknown, guessed):
                found[i] = c
        return [int(c) for c in found]

    @classmethod
    def in_memory(cls, unets: dict[int, Any], *, channels: int, clusters: Clusters, device: str = "cpu",
                  per_cluster: bool = True) -> DiffusionBundle:
        """A bundle over UNets built in code (tests, benchmarks)."""
        first = next(iter(unets.values()))
        learn_sigma = first.config.out_channels == 2 * first.config.in_channels
        return cls(channels=channels, size=int(first.config.sample_size), learn_sigma=learn_sigma,
                   per_cluster=per_cluster, clusters=clusters, loader=lambda i: unets[i], device=device,
                   max_models=len(unets), source="in-memory")

    @classmethod
    def shared(cls, folder: str | Path, *, device: str = "cpu", max_models: int = 4) -> DiffusionBundle:
        """``open``, but one bundle per checkpoint and device in a process, so that ``repaint`` and
        ``diffusion-style`` of one pipeline hold a single copy of the models."""
        folder = Path(folder)
        card = folder / "checkpoint.json"
        key = (str(folder.resolve()), str(device), card.stat().st_mtime_ns if card.is_file() else 0)
        bundle = _SHARED.get(key)
        if bundle is None:
            bundle = _SHARED[key] = cls.open(folder, device=device, max_models=max_models)
        bundle.max_models = max(bundle.max_models, max_models)
        return bundle

    @classmethod
    def open(cls, folder: str | Path, *, device: str = "cpu", max_models: int = 4,
             require_complete: bool = False) -> DiffusionBundle:
        """Open a ddpm4 checkpoint folder; CheckpointError (one line) if it is not one or lacks a model."""
        from diffusers import UNet2DModel

        folder = Path(folder)
        card = read_checkpoint_card(folder, expected=GENERATOR)
        try:
            info = card["model"]
            per_cluster = bool(info["per_cluster"])
            clusters = read_clusters(folder / CLUSTERS_FILE)
        except (KeyError, OSError, ValueError) as err:
            raise CheckpointError(f"{folder}: incomplete ddpm4 checkpoint ({err})") from None
        count = clusters.k if per_cluster else 1
        steps = card.get("models", {})
        for index in range(count):
            path = model_dir(folder, index, per_cluster)
            recover_dir(path)
            if not (path / "config.json").is_file():
                raise CheckpointError(f"{folder}: model {path.name} has not been trained yet; continue with "
                                      f"`medsynth train ddpm4 --out {folder} --resume`")
            if require_complete and int(steps.get(path.name, {}).get("step", 0)) < int(card["config"]["steps"]):
                raise CheckpointError(f"{folder}: model {path.name} is not fully trained")

        def load(index: int):
            try:
                return UNet2DModel.from_pretrained(str(model_dir(folder, index, per_cluster)))
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{model_dir(folder, index, per_cluster)}: cannot load ({err})") from None

        return cls(channels=int(info["image_channels"]), size=int(info["size"]), learn_sigma=bool(info["learn_sigma"]),
                   per_cluster=per_cluster, clusters=clusters, loader=load, device=device, max_models=max_models,
                   source=str(folder))
