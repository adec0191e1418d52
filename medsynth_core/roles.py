"""The five roles a component can fill, as small base classes.

Every component has a registry ``name``, a one-line ``description`` (the first line of its
docstring unless set), a ``Config`` dataclass of options with defaults and help texts, and a
``context`` (device, progress, log). A component sees its inputs, never the pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .config import EmptyConfig
from .progress import Progress, SilentProgress
from .sample import Condition, Metric, Sample, Verdict

if TYPE_CHECKING:
    from .dataset import Dataset

_log = logging.getLogger("medsynth")


@dataclass
class Context:
    """What the runner lends a component: where to compute, how to report.

    ``device`` is a torch device string. ``progress`` opens progress bars. ``log`` takes one
    human-readable line (the CLI prints it unless ``--quiet``). ``extras`` is room for
    run-wide services (for example a distributed launcher) without changing signatures.
    """

    device: str = "cpu"
    progress: Progress = field(default_factory=SilentProgress)
    log: Callable[[str], None] = _log.info
    extras: dict[str, Any] = field(default_factory=dict)


NETWORK_TUNER = "network_tuner"  # context.extras key: the run's channels_last / compile, as a function


class Component:
    """Base of all components: a name, a description, a typed config and a context."""

    Config: ClassVar[type] = EmptyConfig
    description: ClassVar[str] = ""
    role: ClassVar[str] = ""

    def __init__(self, config: Any = None, *, context: Context | None = None, name: str = "") -> None:
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {self.Config.__name__}, got {type(self.config).__name__}")
        self.context = context or Context()
        self.name = name or type(self).__name__
        self.plugin = type(self).__module__  # the registry replaces these with the providing plugin
        self.version = "unknown"

    def __getstate__(self) -> dict[str, Any]:
        # a copy sent to a worker process leaves the context (progress bars, log) behind
        return {**self.__dict__, "context": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.context = Context()

    @classmethod
    def summary(cls) -> str:
        """The one-line description: ``description`` or the docstring's first line."""
        if cls.description:
            return cls.description
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class MaskSource(Component):
    """Gives one Condition per requested sample.

    ``provides`` names the condition kinds it fills (``mask``, ``image``, ``prompt``); a
    generator whose ``requires`` is not covered is rejected before the run. Sources that learn
    from the real set set ``needs_data`` and implement ``fit``.
    """

    role = "mask_source"
    provides: ClassVar[frozenset[str]] = frozenset({"mask"})
    needs_data: ClassVar[bool] = False

    def fit(self, dataset: Dataset) -> None:
        """Learn from the real dataset (called once before ``conditions``); optional."""

    def conditions(self, indices: Sequence[int], seeds: Sequence[int]) -> list[Condition]:
        """Return one Condition per sample index.

        ``seeds[k]`` is the seed of sample ``indices[k]``; the condition of a sample must depend
        only on its index and seed, never on the batch it arrives in.
        """
        raise NotImplementedError


class Generator(Component):
    """Makes samples from conditions.

    ``requires``: condition kinds it needs. ``makes``: what its samples carry besides the image
    (``mask``, ``soft_mask``); a sample without either gets the condition's mask as its mask.
    Trainable generators set ``trainable`` and implement ``fit`` and ``load``.
    ``recipe`` (optional) is a small CPU-sized demonstration of the generator, so that
    ``medsynth bench`` can run it beside every other installed method: pipeline sections
    (``mask_source``, ``generator`` options, ``refiners``, ``filters``) and, for a trainable
    generator, ``train`` (the options of its ``fit``). The string ``"{checkpoint}"`` in a section
    stands for the folder that training wrote.
    """

    role = "generator"
    requires: ClassVar[frozenset[str]] = frozenset()
    makes: ClassVar[frozenset[str]] = frozenset()
    trainable: ClassVar[bool] = False
    recipe: ClassVar[dict[str, Any] | None] = None

    def fit(self, dataset: Dataset, workdir: Path) -> Path:
        """Train on ``dataset``, writing checkpoints into ``workdir``; return the checkpoint folder.

        Calling it again on the same ``workdir`` resumes from the last checkpoint written there.
        """
        raise NotImplementedError(f"{self.name} needs no training")

    def load(self, checkpoint: Path) -> None:
        """Load the weights written by ``fit`` (a folder, or a hub id for pretrained models)."""
        raise NotImplementedError(f"{self.name} has no checkpoint to load")

    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        """Return one Sample per condition, sample ``k`` drawn with ``seeds[k]`` alone."""
        raise NotImplementedError

    def networks(self) -> list[Any]:
        """The torch modules ``generate`` runs, once loaded; the runner applies ``[run]``
        ``channels_last`` and ``compile`` to them. Optional: the default is none."""
        return []

    def tune(self, network: Any) -> Any:
        """Apply the run's ``channels_last`` and ``compile`` to a network loaded later, on demand
        (a generator that loads models lazily calls it on each); returns the network."""
        tuner = self.context.extras.get(NETWORK_TUNER)
        return tuner(network) if tuner is not None else network


class Refiner(Component):
    """Improves samples, for example a soft mask turned into a binary mask.

    ``in_worker`` marks refiners whose work is plain CPU code on the sample (thresholds, CRF,
    superpixels): with ``[run] workers`` they run in worker processes while the next batch is
    sampled. Such a refiner must pickle (its config and plain attributes) and must not need the
    context's progress bars.
    """

    role = "refiner"
    in_worker: ClassVar[bool] = False

    def refine(self, samples: Sequence[Sample]) -> list[Sample]:
        """Return the refined samples, one per input, in the same order."""
        raise NotImplementedError


class Filter(Component):
    """Scores samples and decides which to keep.

    Filters that learn from the real set (for example a segmenter) set ``needs_data`` and
    implement ``fit``, called once before the first ``judge``. A filter with ``scope = "set"``
    judges the whole generated set at once, after generation (for example ranking pairs by a
    segmenter trained on all of them); then ``[run] n`` counts the pairs it is shown, and the
    pairs it drops move to ``dropped/``.
    """

    role = "filter"
    needs_data: ClassVar[bool] = False
    scope: ClassVar[Literal["sample", "set"]] = "sample"

    def fit(self, dataset: Dataset) -> None:
        """Learn from the real dataset before judging; optional."""

    def judge(self, samples: Sequence[Sample]) -> list[Verdict]:
        """Return one Verdict per sample, in order.

        With ``scope = "sample"`` each verdict depends on its own sample only; with
        ``scope = "set"`` ``samples`` is the whole set, loaded lazily from disk.
        """
        raise NotImplementedError


class Evaluator(Component):
    """Scores a synthetic dataset against a real one.

    An evaluator that needs something the machine may lack (local network weights, say)
    answers ``unavailable()`` with one line saying how to enable it; ``medsynth evaluate
    --evaluator all`` then skips it with that line in the report, and naming it explicitly
    fails with that line.
    """

    role = "evaluator"

    def unavailable(self) -> str | None:
        """None when the evaluator can run as configured, else one line saying how to enable it."""
        return None

    def evaluate(self, real: Dataset, synthetic: Dataset) -> list[Metric]:
        """Return named metrics, each with the direction in which it improves."""
        raise NotImplementedError


ROLE_CLASSES: dict[str, type[Component]] = {
    cls.role: cls for cls in (Generator, MaskSource, Refiner, Filter, Evaluator)
}
