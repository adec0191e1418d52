"""Checkpoint folders written by ``Generator.fit`` and read by ``Generator.load``.

A checkpoint folder holds the generator's own files plus ``checkpoint.json``: which component
wrote it, its config, the training step and software versions. Reading it back checks that
the folder belongs to the generator that loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_path, write_json_atomic
from .config import config_to_dict
from .errors import CheckpointError
from .provenance import now_iso, software_versions

CARD = "checkpoint.json"


def write_checkpoint_card(folder: Path, component: Any, step: int, **extra: Any) -> None:
    """Write ``checkpoint.json`` for ``component`` at training ``step`` (atomically)."""
    write_json_atomic(folder / CARD, {
        "component": component.name,
        "role": component.role,
        "config": config_to_dict(component.config),
        "step": int(step),
        "written": now_iso(),
        "versions": software_versions(),
        **extra,
    })


def read_checkpoint_card(folder: str | Path, expected: str | None = None) -> dict[str, Any]:
    """Read ``checkpoint.json``; raise CheckpointError if missing or made by another component."""
    folder = Path(folder)
    path = folder / CARD
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a medsynth checkpoint (no {CARD}); train one with `medsynth train`")
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"{path}: unreadable (expected a JSON object)")
    if expected is not None and card.get("component") != expected:
        raise CheckpointError(f"{folder}: checkpoint of {card.get('component')!r}, not of {expected!r}")
    return card


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically, so a kill never leaves half a checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: Path) -> Any:
    """``torch.load`` on CPU with a one-line error for missing or damaged files."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several unrelated types for damaged files
        raise CheckpointError(f"{path}: cannot load ({err})") from None
