"""The example third-party plugin, examples/medsynth-hello: installed for real, found and used.

The distribution is installed once per module with pip into a temporary target folder (about
a second); the commands then run in subprocesses with that folder on PYTHONPATH, so discovery
goes through the installed ``*.dist-info`` entry point exactly as after ``pip install``. The
refiner itself is unit-tested from the source folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medsynth_core import ConfigError, Registry, Sample, build_config, make_plugin_manager, read_mask

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "medsynth-hello"


@pytest.fixture(scope="module")
def hello_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the installed medsynth-hello distribution (module and dist-info)."""
    root = tmp_path_factory.mktemp("hello")
    # build from a copy, so setuptools leaves no build/ or egg-info in the repository
    source = Path(shutil.copytree(EXAMPLE, root / "src", ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__")))
    target = root / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (target / "medsynth_hello-0.1.0.dist-info").is_dir()
    return target


def medsynth(target: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m medsynth_cli ARGS`` with the installed plugin importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "medsynth_cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_installed_plugin_is_listed_with_its_name_and_version(hello_target: Path) -> None:
    done = medsynth(hello_target, "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    hello = [r for r in rows if r["name"] == "largest-component"]
    assert hello == [{
        "role": "refiner", "name": "largest-component", "plugin": "hello", "version": "0.1.0",
        "description": "Keep the largest connected component(s) of each label and clear the specks around them.",
    }]
    # the built-ins are still there, found the same way
    assert {"augment", "real-pairs", "threshold", "mask-area", "mask-stats"} <= {r["name"] for r in rows}


def test_installed_plugin_info_shows_its_options(hello_target: Path) -> None:
    done = medsynth(hello_target, "info", "largest-component", "--json")
    assert done.returncode == 0, done.stderr
    (item,) = json.loads(done.stdout)
    assert (item["plugin"], item["version"], item["role"]) == ("hello", "0.1.0", "refiner")
    options = {o["name"]: o for o in item["options"]}
    assert set(options) == {"keep", "connectivity"}
    assert options["keep"]["type"] == "int" and options["keep"]["default"] == 1
    assert "largest first" in options["keep"]["help"]
    table = medsynth(hello_target, "info", "largest-component")
    assert table.returncode == 0, table.stderr
    assert "plugin hello 0.1.0" in table.stdout
    assert "keep" in table.stdout and "connectivity" in table.stdout


def test_installed_plugin_runs_in_a_pipeline(hello_target: Path, demo_dir: Path, tmp_path: Path) -> None:
    pipeline = tmp_path / "hello.toml"
    pipeline.write_text(
        '[run]\nn = 4\nseed = 0\nbatch_size = 4\n\n'
        '[mask_source]\nname = "real-pairs"\n\n'
        '[generator]\nname = "augment"\nelastic = 0.05\n\n'
        '[[refiners]]\nname = "largest-component"\nkeep = 2\n\n'
        '[[evaluators]]\nname = "mask-stats"\n')
    out = tmp_path / "run"
    done = medsynth(hello_target, "-q", "run", str(pipeline), "--data", str(demo_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sum(r["kept"] for r in records) == 4
    for r in records:
        stage = r["provenance"][-1]
        assert (stage["name"], stage["plugin"], stage["version"]) == ("largest-component", "hello", "0.1.0")
        assert stage["config"] == {"keep": 2, "connectivity": 1}
        assert r["meta"]["removed_pixels"] >= 0
        mask = read_mask(out / r["mask"])
        assert ndimage.label(mask > 0)[1] <= 2
    assert (out / "report.json").is_file()


def test_installed_plugin_rejects_a_bad_option_in_one_line(hello_target: Path, demo_dir: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = medsynth(hello_target, "-q", "run", "--generator", "augment", "--mask-source", "real-pairs",
                    "--refiner", "largest-component", "--set", "largest-component.keep=0",
                    "--data", str(demo_dir), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: [[refiners]] 'largest-component': keep must be >= 1, got 0"
    assert not out.exists()


# The component itself, imported from the source folder.


@pytest.fixture
def hello(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import medsynth_hello

    return medsynth_hello


def _refiner(hello, **options):
    return hello.LargestComponentRefiner(build_config(hello.LargestComponentConfig, options, "test"))


def _sample(mask: np.ndarray) -> Sample:
    return Sample(image=np.zeros(mask.shape, np.float32), mask=mask.astype(np.uint8), meta={"seed": 0})


def test_refiner_removes_specks_and_keeps_the_largest_blob(hello) -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 1  # the organ: 144 px
    mask[0, 0] = mask[30, 2] = 1  # single-pixel specks
    mask[25:27, 25:28] = 1  # a 6 px speck
    (out,) = _refiner(hello).refine([_sample(mask)])
    expected = np.zeros_like(mask)
    expected[8:20, 8:20] = 1
    np.testing.assert_array_equal(out.mask, expected)
    assert out.mask.dtype == np.uint8
    assert out.meta["removed_pixels"] == 8
    assert mask[0, 0] == 1, "the input sample must not be modified"


def test_refiner_keeps_both_lungs_of_a_demo_mask_and_drops_added_specks(hello, demo_dir: Path) -> None:
    real = read_mask(demo_dir / "masks" / "case_0000.png")
    assert ndimage.label(real)[1] == 2
    noisy = real.copy()
    noisy[0, 0] = noisy[0, -1] = noisy[-1, 0] = 1
    (out,) = _refiner(hello, keep=2).refine([_sample(noisy)])
    np.testing.assert_array_equal(out.mask, real)
    one = _refiner(hello, keep=1).refine([_sample(noisy)])[0].mask
    assert ndimage.label(one)[1] == 1 and 0 < one.sum() < real.sum()


def test_refiner_treats_each_label_on_its_own(hello) -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[1:5, 1:5] = 1
    mask[10, 10] = 1
    mask[8:14, 1:7] = 2
    mask[1, 14] = 2
    (out,) = _refiner(hello).refine([_sample(mask)])
    assert out.mask[1:5, 1:5].min() == 1 and (out.mask[8:14, 1:7] == 2).all()
    assert out.mask[10, 10] == 0 and out.mask[1, 14] == 0
    assert out.meta["removed_pixels"] == 2


def test_refiner_connectivity_decides_whether_corners_touch(hello) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[1:4, 1:4] = 1
    mask[4, 4] = mask[5, 5] = 1  # a diagonal tail
    four = _refiner(hello, connectivity="1").refine([_sample(mask)])[0].mask
    eight = _refiner(hello, connectivity=2).refine([_sample(mask)])[0].mask
    assert four[4, 4] == 0 and four[5, 5] == 0
    np.testing.assert_array_equal(eight, mask)


def test_refiner_passes_samples_without_a_mask_and_empty_masks(hello) -> None:
    bare = Sample(image=np.zeros((8, 8), np.float32), soft_mask=np.zeros((8, 8), np.float32))
    empty = _sample(np.zeros((8, 8), np.uint8))
    out = _refiner(hello).refine([bare, empty])
    assert out[0] is bare
    assert out[1].mask.sum() == 0 and out[1].meta["removed_pixels"] == 0


@pytest.mark.parametrize("options, message", [
    ({"keep": 0}, "keep must be >= 1, got 0"),
    ({"connectivity": 3}, "connectivity must be 1 or 2, got 3"),
    ({"keep": "many"}, "expected int, got 'many'"),
    ({"size": 3}, "unknown option 'size'"),
])
def test_config_rejects_bad_values(hello, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(hello.LargestComponentConfig, options, "largest-component")


def test_module_registers_one_refiner(hello) -> None:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(hello, name="hello")
    try:
        infos = Registry(pm).components()
        assert [(c.role, c.name, c.plugin) for c in infos] == [("refiner", "largest-component", "hello")]
        refiner = Registry(pm).create("refiner", "largest-component", {"keep": "2"})
        assert refiner.config.keep == 2 and refiner.plugin == "hello"
    finally:
        pm.unregister(name="hello")
