"""Errors that medsynth reports to the user as one line.

Every message names what failed, the offending value and what is allowed. The CLI prints
``str(error)`` and exits with status 2; tracebacks appear only with ``--debug``.
"""

from __future__ import annotations


class MedsynthError(Exception):
    """Base class of every error meant for the user rather than for a debugger."""


class ConfigError(MedsynthError, ValueError):
    """A configuration key, value or pipeline file is wrong."""


class UnknownComponentError(MedsynthError, LookupError):
    """A component name is not registered for the requested role."""


class PluginError(MedsynthError, RuntimeError):
    """A plugin failed to load or registered something invalid."""


class DatasetError(MedsynthError, ValueError):
    """A dataset folder or one of its files cannot be used."""


class PipelineError(MedsynthError, RuntimeError):
    """A pipeline cannot run as configured, or a run folder is inconsistent."""


class CheckpointError(MedsynthError, ValueError):
    """A checkpoint is missing, unreadable or made by another component."""
