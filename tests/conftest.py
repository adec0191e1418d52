"""Shared fixtures: the suite runs offline, on the CPU, with small data."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: two workers on two cores, each with two OpenMP threads, thrash
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from medsynth_core.demo_data import write_demo_dataset  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve 64 px phantom pairs, written once per test session; do not modify."""
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", n=12, size=64, seed=0)


@pytest.fixture
def demo_copy(tmp_path: Path, demo_dir: Path) -> Path:
    """A private copy of the demo set that a test may damage."""
    import shutil

    return Path(shutil.copytree(demo_dir, tmp_path / "demo"))
