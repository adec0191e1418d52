"""Evaluators of fidelity, variety, paired quality and downstream utility, the same for every method."""

from medsynth_core import hookimpl


@hookimpl
def register_evaluators(register):
    pass
