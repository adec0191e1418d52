"""``--processes N``: start the same command again as N processes under ``accelerate launch``.

One process per GPU when GPUs are visible, else CPU processes talking over gloo. For several
machines, call ``accelerate launch -m medsynth_cli ...`` directly with accelerate's own flags.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import typer

from medsynth_core import ConfigError


def launched() -> bool:
    """Whether this process is already one of a launched group."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(processes: int, device: str = "auto") -> None:
    """Run this command line again as ``processes`` processes; exit with their status.

    ``device`` ``cpu`` hides the GPUs from the processes, so they talk over gloo, not NCCL.
    """
    if processes < 1:
        raise ConfigError(f"--processes must be at least 1, not {processes}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(processes), "--num_machines", "1",
           "--main_process_port", str(_free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "medsynth_cli", *_without_processes(sys.argv[1:])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    status = subprocess.call(cmd, env=env)
    raise typer.Exit(0 if status == 0 else 2)


def _without_processes(args: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            kept.append(arg)
    return kept


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
