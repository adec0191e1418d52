"""Project-wide checks: documentation matches the code, layers hold, lint is clean."""

from __future__ import annotations

import ast
import inspect
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from medsynth_cli.reference import render_reference
from medsynth_core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name, fn in vars(hookspecs).items() if name.startswith("register_") and callable(fn)]


def _bin(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else (shutil.which(name) or name)


def test_there_is_one_hook_per_role() -> None:
    assert sorted(HOOKS) == sorted(["register_generators", "register_mask_sources", "register_refiners",
                                    "register_filters", "register_evaluators"])


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_and_tested(hook: str) -> None:
    fn = getattr(hookspecs, hook)
    assert inspect.getdoc(fn), f"{hook} has no docstring"
    assert list(inspect.signature(fn).parameters) == ["register"]
    assert f"### {hook}(register)" in (ROOT / "docs" / "plugins.md").read_text(), f"docs/plugins.md lacks {hook}"
    test_names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        test_names |= {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
    assert f"test_hook_{hook}" in test_names, f"no test named test_hook_{hook}"


def test_reference_is_up_to_date() -> None:
    committed = (ROOT / "docs" / "reference.md").read_text()
    stale = "docs/reference.md is stale: run `medsynth reference --out docs/reference.md`"
    assert committed == render_reference(), stale


def test_every_plugin_package_is_under_the_layers_contract() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    *plugins, shared = contract["layers"]
    assert shared == "medsynth_plugins.common"
    listed = {name.strip() for layer in plugins for name in layer.split("|")}
    packages = {f"medsynth_plugins.{p.name}" for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").is_file()}
    assert packages - {shared} == listed
    entry_points = set(config["project"]["entry-points"]["medsynth"].values())
    assert entry_points == listed, "every plugin package is registered, and only plugins are"
    assert set(config["tool"]["setuptools"]["packages"]) >= packages


def test_import_layers_hold() -> None:
    result = subprocess.run([_bin("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    result = subprocess.run([_bin("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
