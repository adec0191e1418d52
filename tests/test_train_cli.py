"""``medsynth train`` with a small trainable generator, and running from its checkpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth_cli.app import app
from medsynth_core import (
    CheckpointError,
    Condition,
    Dataset,
    Generator,
    Sample,
    default_registry,
    hookimpl,
    load_torch,
    option,
    read_checkpoint_card,
    read_image,
    save_torch,
    write_checkpoint_card,
)

runner = CliRunner()


@dataclass(frozen=True)
class MeanImageConfig:
    """Options of the mean-image generator."""

    steps: int = option(4, "Passes over the data; each pass is one checkpoint.")


class MeanImageGenerator(Generator):
    """Learns the mean real image, one running-average pass per step, and paints it for every mask."""

    Config = MeanImageConfig
    trainable = True
    requires = frozenset({"mask"})

    def fit(self, dataset: Dataset, workdir: Path) -> Path:
        workdir.mkdir(parents=True, exist_ok=True)
        state = {"step": 0, "sum": None}
        if (workdir / "state.pt").is_file():
            state = load_torch(workdir / "state.pt")
        with self.context.progress.task("training mean-image", total=self.config.steps) as task:
            task.advance(state["step"])
            while state["step"] < self.config.steps:
                images = np.stack([s.image for s in dataset])
                state["sum"] = images.mean(axis=0) if state["sum"] is None else state["sum"]
                state["step"] += 1
                save_torch(workdir / "state.pt", state)
                write_checkpoint_card(workdir, self, state["step"])
                task.advance()
        return workdir

    def load(self, checkpoint: Path) -> None:
        read_checkpoint_card(checkpoint, expected=self.name)
        self._mean = load_torch(checkpoint / "state.pt")["sum"].astype(np.float32)

    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        return [Sample(image=self._mean.copy()) for _ in conditions]


class _Plugin:
    @hookimpl
    def register_generators(self, register):
        register("mean-image", MeanImageGenerator)


@pytest.fixture(autouse=True)
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    pm = default_registry().plugin_manager
    pm.register(_Plugin(), name="train-test")
    try:
        yield
    finally:
        pm.unregister(name="train-test")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_train_writes_a_checkpoint_that_run_uses(demo_dir: Path, tmp_path: Path) -> None:
    result = invoke("-q", "train", "mean-image", "--data", demo_dir, "--out", tmp_path / "ck", "--steps", "2")
    assert result.exit_code == 0, result.output
    card = read_checkpoint_card(tmp_path / "ck", expected="mean-image")
    assert card["step"] == 2 and card["config"] == {"steps": 2}
    result = invoke("-q", "run", "--generator", "mean-image", "--mask-source", "real-masks", "--checkpoint",
                    tmp_path / "ck", "--data", demo_dir, "--out", tmp_path / "run", "-n", "3")
    assert result.exit_code == 0, result.output
    expected = np.mean([read_image(p) for p in sorted((demo_dir / "images").iterdir())], axis=0)
    produced = read_image(tmp_path / "run" / "images" / "000000.png")
    assert np.abs(produced - expected).max() <= 1 / 255 + 1e-6


def test_info_shows_a_checkpoint_card(demo_dir: Path, tmp_path: Path) -> None:
    invoke("-q", "train", "mean-image", "--data", demo_dir, "--out", tmp_path / "ck", "--steps", "1")
    result = invoke("info", tmp_path / "ck", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["component"] == "mean-image"


def test_train_resumes_only_when_asked(demo_dir: Path, tmp_path: Path) -> None:
    invoke("-q", "train", "mean-image", "--data", demo_dir, "--out", tmp_path / "ck", "--steps", "1")
    again = invoke("-q", "train", "mean-image", "--data", demo_dir, "--out", tmp_path / "ck", "--steps", "3")
    assert again.exit_code == 2 and "--resume" in again.stderr
    assert read_checkpoint_card(tmp_path / "ck")["step"] == 1
    resumed = invoke("-q", "train", "mean-image", "--data", demo_dir, "--out", tmp_path / "ck", "--steps", "3",
                     "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert read_checkpoint_card(tmp_path / "ck")["step"] == 3


def test_train_rejects_unknown_and_mistyped_options(demo_dir: Path, tmp_path: Path) -> None:
    unknown = invoke("-q", "train", "mean-image", "--data", demo_dir, "--out", tmp_path / "ck", "--stepz", "2")
    assert unknown.exit_code == 2 and "--stepz" in unknown.stderr and "--steps" in unknown.stderr
    mistyped = invoke("-q", "train", "mean-image", "--data", demo_dir, "--out", tmp_path / "ck", "--steps", "x")
    assert mistyped.exit_code == 2 and "'steps'" in mistyped.stderr
    assert not (tmp_path / "ck").exists()


def test_run_refuses_a_checkpoint_of_another_generator(demo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoint.json").write_text(json.dumps({"component": "painter"}))
    with pytest.raises(CheckpointError):
        read_checkpoint_card(tmp_path / "other", expected="mean-image")
    result = invoke("-q", "run", "--generator", "mean-image", "--mask-source", "real-masks", "--checkpoint",
                    tmp_path / "other", "--data", demo_dir, "--out", tmp_path / "run", "-n", "2")
    assert result.exit_code == 2 and "painter" in result.stderr
    assert not (tmp_path / "run").exists()
