"""The pluggy hook specifications of medsynth: one registration hook per role.

A plugin is a module (found through the ``medsynth`` entry-point group) with one
``@hookimpl`` function per role it offers. Each hook receives a single keyword argument,
``register``, and calls it once per component: ``register(name, cls)``. Names are short,
lowercase and unique within their role.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "medsynth"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_generators(register):
    """Register Generator classes.

    Call ``register(name, cls)`` once per generator. ``cls`` subclasses
    :class:`medsynth_core.Generator` and defines a ``Config`` dataclass. A generator turns
    conditions (from a MaskSource) into samples: an image, plus a mask or a soft mask when
    it makes one. Trainable generators also implement ``fit`` and ``load``.
    """


@hookspec
def register_mask_sources(register):
    """Register MaskSource classes.

    Call ``register(name, cls)`` once per mask source. ``cls`` subclasses
    :class:`medsynth_core.MaskSource` and defines a ``Config`` dataclass. A mask source gives
    one :class:`medsynth_core.Condition` per requested sample: a real or sampled mask, an
    unsupervised mask, a prompt, a reference image, or nothing at all.
    """


@hookspec
def register_refiners(register):
    """Register Refiner classes.

    Call ``register(name, cls)`` once per refiner. ``cls`` subclasses
    :class:`medsynth_core.Refiner` and defines a ``Config`` dataclass. A refiner takes a batch
    of samples and returns the same number of improved samples, for example a soft mask
    turned into a binary mask by a threshold or a CRF.
    """


@hookspec
def register_filters(register):
    """Register Filter classes.

    Call ``register(name, cls)`` once per filter. ``cls`` subclasses
    :class:`medsynth_core.Filter` and defines a ``Config`` dataclass. A filter gives each
    sample a :class:`medsynth_core.Verdict`: a score and whether to keep it. The runner records
    both in the manifest and counts the dropped pairs.
    """


@hookspec
def register_evaluators(register):
    """Register Evaluator classes.

    Call ``register(name, cls)`` once per evaluator. ``cls`` subclasses
    :class:`medsynth_core.Evaluator` and defines a ``Config`` dataclass. An evaluator scores a
    synthetic dataset against a real one and returns :class:`medsynth_core.Metric` values,
    each with the direction in which it improves.
    """
