"""Tests of checkpoint folders: the checkpoint.json card and atomic torch files."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth_core import (
    CheckpointError,
    Generator,
    build_config,
    load_torch,
    option,
    read_checkpoint_card,
    save_torch,
    write_checkpoint_card,
)
from medsynth_core.checkpoint import CARD


@dataclass(frozen=True)
class TinyConfig:
    """Options of the tiny trainable generator."""

    steps: int = option(10, "Training steps.")
    size: tuple[int, int] = option((8, 8), "Image size.")
    out: Path = option(Path("weights"), "Where weights go.")


class TinyGenerator(Generator):
    """A generator that only exists to own checkpoints."""

    Config = TinyConfig
    trainable = True


def _component(**options) -> TinyGenerator:
    return TinyGenerator(TinyConfig(**options), name="tiny")


def test_card_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"  # created on demand
    comp = _component(steps=7, size=(4, 6))
    write_checkpoint_card(folder, comp, np.int64(120), dataset="demo", loss=0.25)
    card = read_checkpoint_card(folder, expected="tiny")
    assert card["component"] == "tiny" and card["role"] == "generator"
    assert card["step"] == 120 and type(card["step"]) is int
    assert card["config"] == {"steps": 7, "size": [4, 6], "out": "weights"}
    assert card["dataset"] == "demo" and card["loss"] == 0.25
    assert "python" in card["versions"] and "torch" in card["versions"]
    assert datetime.fromisoformat(card["written"]).tzinfo is not None
    # The stored config rebuilds the component's own config.
    assert build_config(TinyConfig, card["config"], "card") == comp.config
    assert read_checkpoint_card(str(folder)) == card
    assert sorted(p.name for p in folder.iterdir()) == [CARD]


def test_card_is_rewritten_whole(tmp_path: Path) -> None:
    write_checkpoint_card(tmp_path, _component(), 1)
    write_checkpoint_card(tmp_path, _component(), 2)
    assert read_checkpoint_card(tmp_path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [CARD]


def test_card_of_another_component(tmp_path: Path) -> None:
    write_checkpoint_card(tmp_path, _component(), 3)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint_card(tmp_path, expected="ddpm")
    assert str(err.value) == f"{tmp_path}: checkpoint of 'tiny', not of 'ddpm'"


def test_missing_card(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"no {CARD}") as err:
        read_checkpoint_card(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(CheckpointError, match="not a medsynth checkpoint"):
        read_checkpoint_card(tmp_path / "absent", expected="tiny")


@pytest.mark.parametrize("text", ['{"component": "tiny", ', "", '["tiny"]', '"tiny"'])
def test_damaged_card(tmp_path: Path, text: str) -> None:
    (tmp_path / CARD).write_text(text)
    with pytest.raises(CheckpointError, match="unreadable") as err:
        read_checkpoint_card(tmp_path, expected="tiny")
    assert str(tmp_path / CARD) in str(err.value)
    assert "\n" not in str(err.value)


def test_save_and_load_torch_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    obj = {"model": net.state_dict(), "step": 9, "history": [0.5, 0.25], "note": "ok"}
    path = tmp_path / "sub" / "model.pt"
    save_torch(path, obj)
    back = load_torch(path)
    assert back["step"] == 9 and back["history"] == [0.5, 0.25] and back["note"] == "ok"
    assert back["model"].keys() == obj["model"].keys()
    for key, value in obj["model"].items():
        assert torch.equal(back["model"][key], value)
        assert back["model"][key].device.type == "cpu"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_save_torch_replaces_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_torch(path, {"step": 1})
    save_torch(path, {"step": 2})
    assert load_torch(path) == {"step": 2}


def test_failed_save_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_torch(path, {"step": 1})
    with pytest.raises(Exception):  # noqa: B017 - torch decides what an unpicklable object raises
        save_torch(path, {"step": 2, "bad": lambda: None})
    assert load_torch(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_load_missing_torch_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint file not found") as err:
        load_torch(tmp_path / "model.pt")
    assert str(tmp_path / "model.pt") in str(err.value)


@pytest.mark.parametrize("damage", ["random", "truncated", "empty", "text"])
def test_load_damaged_torch_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "model.pt"
    save_torch(path, {"weights": torch.ones(64, 64)})
    raw = path.read_bytes()
    data = {
        "random": np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes(),
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "text": b"this is not a checkpoint\n",
    }[damage]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="cannot load") as err:
        load_torch(path)
    assert str(err.value).startswith(str(path))
    assert err.value.__suppress_context__
