"""medsynth core: hook specs, roles, samples, dataset I/O, seeds, manifests and the runner.

Plugins import what they need from here::

    from medsynth_core import Generator, Sample, hookimpl, option
"""

from .checkpoint import load_torch, read_checkpoint_card, save_torch, write_checkpoint_card
from .config import EmptyConfig, OptionInfo, build_config, config_to_dict, describe_config, option
from .dataset import Dataset, PairFiles, foreground_fraction, open_dataset
from .errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    MedsynthError,
    PipelineError,
    PluginError,
    UnknownComponentError,
)
from .hookspecs import hookimpl, hookspec
from .image_io import read_image, read_mask, write_png_image, write_png_mask
from .pipeline import (
    Pipeline,
    PipelineSpec,
    RunConfig,
    StageSpec,
    build_pipeline,
    load_pipeline,
    parse_pipeline,
    read_pipeline_file,
)
from .progress import Progress, ProgressTask, SilentProgress
from .registry import ROLES, ComponentInfo, Registry, default_registry, make_plugin_manager
from .report import EvaluatorResult, Skipped, build_evaluators, evaluate, write_report
from .roles import Component, Context, Evaluator, Filter, Generator, MaskSource, Refiner
from .runner import RunResult, run_pipeline
from .sample import Condition, Metric, Sample, Verdict
from .seeds import numpy_rng, sample_seed, torch_generator

__all__ = [
    "CheckpointError", "Component", "ComponentInfo", "Condition", "ConfigError", "Context", "Dataset",
    "DatasetError", "EmptyConfig", "Evaluator", "EvaluatorResult", "Filter", "Generator", "MaskSource",
    "MedsynthError", "Metric", "OptionInfo", "PairFiles", "Pipeline", "PipelineError", "PipelineSpec",
    "PluginError", "Progress", "ProgressTask", "ROLES", "Refiner", "Registry", "RunConfig", "RunResult", "Sample",
    "SilentProgress", "Skipped", "StageSpec", "UnknownComponentError", "Verdict", "build_config",
    "build_evaluators", "build_pipeline", "config_to_dict", "default_registry", "describe_config", "evaluate",
    "foreground_fraction", "hookimpl", "hookspec", "load_pipeline", "load_torch", "make_plugin_manager",
    "numpy_rng", "open_dataset", "option", "parse_pipeline", "read_checkpoint_card", "read_image", "read_mask",
    "read_pipeline_file", "run_pipeline", "sample_seed", "save_torch", "torch_generator", "write_checkpoint_card",
    "write_png_image", "write_png_mask", "write_report",
]
