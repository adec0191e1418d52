"""The ``medsynth`` command line, run in-process with Typer's CliRunner on 64 px demo data.

Click >= 8.2 keeps stderr apart from stdout in the runner (``result.stderr``), which is how the
CLI is meant to be used: results (``--json``, tables) on stdout, log lines and errors on stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsynth_cli.app import app
from medsynth_core import UnknownComponentError, default_registry, read_mask

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.toml"
BUILTINS = {("mask_source", "real-masks"), ("mask_source", "real-pairs"), ("generator", "augment"),
            ("refiner", "threshold"), ("filter", "mask-area"), ("evaluator", "mask-stats")}
FLAGS = ("--generator", "augment", "--mask-source", "real-pairs")
IDENTITY = ("--set", "generator.rotation=0", "--set", "generator.hflip=0", "--set", "generator.scale=0",
            "--set", "generator.translate=0", "--set", "generator.elastic=0")

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every command from a scratch folder, so a stray relative path cannot touch the repository."""
    monkeypatch.chdir(tmp_path)


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: object):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def user_error(*args: object) -> str:
    """Invoke quietly, check the one-line error contract and return the line."""
    result = invoke("-q", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pairs(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(folder).items() if k.startswith(("images/", "masks/"))}


def card(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


@pytest.fixture(scope="module")
def synthetic_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four augmented pairs made by ``medsynth run``; do not modify."""
    out = tmp_path_factory.mktemp("synthetic") / "aug"
    result = runner.invoke(app, ["-q", "run", *FLAGS, "--data", str(demo_dir), "--out", str(out), "-n", "4"])
    assert result.exit_code == 0, result.output
    return out


# list


def test_list_prints_a_table_of_the_builtins() -> None:
    result = ok("list")
    assert "medsynth components" in result.stdout
    for _, name in BUILTINS:
        assert name in result.stdout
    assert "baseline" in result.stdout and "mask source" in result.stdout


def test_list_role_shows_only_that_role() -> None:
    refiners = ok("list", "--role", "refiner").stdout
    assert "threshold" in refiners and "augment" not in refiners and "mask-stats" not in refiners
    sources = ok("list", "-r", "mask-source").stdout  # the dash spelling of mask_source
    assert "real-masks" in sources and "real-pairs" in sources and "threshold" not in sources


def test_list_json_has_every_builtin() -> None:
    rows = json.loads(ok("list", "--json").stdout)
    assert {(r["role"], r["name"]) for r in rows} >= BUILTINS
    for r in rows:
        assert set(r) == {"role", "name", "plugin", "version", "description"}
        if (r["role"], r["name"]) in BUILTINS:
            assert r["plugin"] == "baseline" and r["version"] == "0.1.0" and r["description"]
    only = json.loads(ok("list", "--role", "filter", "--json").stdout)
    assert {r["role"] for r in only} == {"filter"}


def test_list_unknown_role_is_one_line() -> None:
    line = user_error("list", "--role", "painter")
    assert "unknown role 'painter'" in line and "generator" in line


# info


def test_info_shows_options_with_defaults_and_help() -> None:
    out = ok("info", "augment").stdout
    assert "augment (generator, plugin baseline 0.1.0)" in out
    for text in ("rotation", "10.0", "hflip", "0.5", "Probability of a left-right flip.", "float"):
        assert text in out
    assert "no options" not in out


def test_info_json() -> None:
    (item,) = json.loads(ok("info", "mask-area", "--json").stdout)
    assert (item["role"], item["name"], item["plugin"]) == ("filter", "mask-area", "baseline")
    options = {o["name"]: o for o in item["options"]}
    assert options["min_fraction"] == {"name": "min_fraction", "type": "float", "default": 0.01,
                                       "help": "Smallest foreground fraction kept."}
    assert options["max_fraction"]["default"] == 0.9
    (threshold,) = json.loads(ok("info", "threshold", "--json").stdout)
    method = next(o for o in threshold["options"] if o["name"] == "method")
    assert method["type"] == "'otsu' | 'fixed'" and method["default"] == "otsu"


def test_info_unknown_name_lists_the_available_ones() -> None:
    line = user_error("info", "painter")
    assert "'painter'" in line
    every = sorted({c.name for c in default_registry().components()})
    assert f"available: {', '.join(every)}" in line
    line = user_error("info", "threshold", "--role", "generator")
    generators = sorted(c.name for c in default_registry().components("generator"))
    assert "augment" in generators
    assert line == f"error: unknown generator 'threshold'; available: {', '.join(generators)}"


# demo-data


def test_demo_data_writes_n_pairs(tmp_path: Path) -> None:
    result = ok("demo-data", tmp_path / "d", "-n", "3", "--size", "32")
    assert "3 pairs" in result.stderr and f"{tmp_path / 'd'}\n" in result.stderr
    files = snapshot(tmp_path / "d")
    assert sorted(k for k in files if k.startswith("images/")) == [f"images/case_{i:04d}.png" for i in range(3)]
    assert sorted(k for k in files if k.startswith("masks/")) == [f"masks/case_{i:04d}.png" for i in range(3)]
    assert card(tmp_path / "d")["pairs"] == 3 and card(tmp_path / "d")["labels"] == {"background": 0, "lung": 1}
    with Image.open(tmp_path / "d" / "images" / "case_0000.png") as img:
        assert img.size == (32, 32)
    assert not list(tmp_path.glob(".*partial"))


def test_demo_data_is_deterministic_by_seed(tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        ok("-q", "demo-data", tmp_path / name, "-n", "2", "--size", "32", "--seed", seed)
    assert pairs(tmp_path / "a") == pairs(tmp_path / "b")
    assert pairs(tmp_path / "a") != pairs(tmp_path / "c")


def test_demo_data_refuses_a_non_empty_folder(tmp_path: Path, demo_copy: Path) -> None:
    before = snapshot(demo_copy)
    line = user_error("demo-data", demo_copy, "-n", "2", "--size", "32")
    assert str(demo_copy) in line and "not empty" in line
    assert snapshot(demo_copy) == before
    (tmp_path / "empty").mkdir()
    ok("-q", "demo-data", tmp_path / "empty", "-n", "1", "--size", "32")  # an empty folder is fine


@pytest.mark.parametrize("args, message", [
    (("--size", "8"), "size must be 32-512 px, got 8"),
    (("--size", "4096"), "size must be 32-512 px, got 4096"),
    (("-n", "0"), "n must be >= 1, got 0"),
])
def test_demo_data_bad_arguments(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    line = user_error("demo-data", tmp_path / "d", *args)
    assert line == f"error: {message}"
    assert not (tmp_path / "d").exists()


# run


def test_run_pipeline_file(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = ok("run", QUICKSTART, "--data", demo_dir, "--out", out, "-n", "4")
    assert len(list((out / "images").iterdir())) == 4 and len(list((out / "masks").iterdir())) == 4
    info = card(out)
    assert info["status"] == "complete" and info["pairs"] == 4
    assert info["pipeline"]["generator"] == {"name": "augment", "rotation": 12.0, "elastic": 0.02}
    assert [s["name"] for s in info["stages"]] == ["real-pairs", "augment", "mask-area", "mask-stats"]
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    assert "kept 4 pairs" in result.stderr
    assert "empty_synthetic" in result.stdout  # the evaluation table


def test_run_with_flags_is_seeded(demo_dir: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        ok("-q", "run", *FLAGS, "--evaluator", "mask-stats", "--data", demo_dir, "--out", out, "-n", "4",
           "--batch-size", "3" if name == "a" else "4")
        runs.append(out)
    assert len(pairs(runs[0])) == 8
    assert pairs(runs[0]) == pairs(runs[1])  # same seed, different batch size: same pairs
    report = json.loads((runs[0] / "report.json").read_text())
    assert report["results"][0]["evaluator"] == "mask-stats"
    ok("-q", "run", *FLAGS, "--data", demo_dir, "--out", tmp_path / "c", "-n", "4", "--seed", "7")
    assert pairs(tmp_path / "c") != pairs(runs[0])


def test_run_set_overrides_generator_options(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ok("-q", "run", *FLAGS, *IDENTITY, "--data", demo_dir, "--out", out, "-n", "3")
    config = next(s["config"] for s in card(out)["stages"] if s["name"] == "augment")
    assert config["rotation"] == 0.0 and config["elastic"] == 0.0 and config["hflip"] == 0.0
    # with no geometry left the masks are the real ones, in order
    for i in range(3):
        np.testing.assert_array_equal(read_mask(out / "masks" / f"{i:06d}.png"),
                                      read_mask(demo_dir / "masks" / f"case_{i:04d}.png"))


def test_run_set_overrides_a_filter_by_name(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = ok("run", QUICKSTART, "--set", "mask-area.min_fraction=0.2", "--data", demo_dir, "--out", out,
                "-n", "4")
    info = card(out)
    assert info["pipeline"]["filters"] == [{"name": "mask-area", "min_fraction": "0.2", "max_fraction": 0.6}]
    assert next(s for s in info["stages"] if s["name"] == "mask-area")["config"]["min_fraction"] == 0.2
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(r["scores"]["mask-area"] >= 0.2 for r in records if r["kept"])
    dropped = [r for r in records if not r["kept"]]
    assert all(r["dropped_by"] == "mask-area" and r["scores"]["mask-area"] < 0.2 for r in dropped)
    assert info["dropped"] == len(dropped) and f"dropped {len(dropped)}" in result.stderr


@pytest.mark.parametrize("setting, message", [
    ("painter.size=3", "no section or stage 'painter'"),
    ("generator.bogus=1", "[generator] 'augment': unknown option 'bogus'; valid options: brightness,"),
    ("generator.rotation=wide", "[generator] 'augment' option 'rotation': expected float, got 'wide'"),
    ("generator.hflip=2", "hflip is a probability in [0, 1], got 2.0"),
    ("rotation", "--set 'rotation': expected SECTION.OPTION=VALUE"),
    ("filters.3.min_fraction=0.1", "the pipeline has 1 filters; index out of range"),
])
def test_run_bad_set(demo_dir: Path, tmp_path: Path, setting: str, message: str) -> None:
    line = user_error("run", QUICKSTART, "--set", setting, "--data", demo_dir, "--out", tmp_path / "out")
    assert message in line
    assert not (tmp_path / "out").exists()


def test_run_that_keeps_nothing_leaves_no_folder(demo_dir: Path, tmp_path: Path) -> None:
    line = user_error("run", QUICKSTART, "--set", "mask-area.min_fraction=0.55", "--data", demo_dir,
                      "--out", tmp_path / "out", "-n", "1")
    assert "only 0 of 1 pairs kept after 50 candidates" in line
    assert not (tmp_path / "out").exists()


def test_run_resume_continues_to_the_same_pairs(demo_dir: Path, tmp_path: Path) -> None:
    common = (*FLAGS, "--data", demo_dir, "--batch-size", "2")
    ok("-q", "run", *common, "--out", tmp_path / "whole", "-n", "5")
    part = tmp_path / "part"
    ok("-q", "run", *common, "--out", part, "-n", "2")
    assert len(pairs(part)) == 4
    before = snapshot(part)
    line = user_error("run", *common, "--out", part, "-n", "5")  # without --resume
    assert str(part) in line and "--resume" in line
    line = user_error("run", *common, "--out", part, "-n", "5", "--seed", "3", "--resume")
    assert "different pipeline" in line
    assert snapshot(part) == before
    ok("-q", "run", *common, "--out", part, "-n", "5", "--resume")
    assert pairs(part) == pairs(tmp_path / "whole")
    assert card(part)["pairs"] == 5 and card(part)["status"] == "complete"


def test_run_needs_a_file_or_a_generator_but_not_both(demo_dir: Path, tmp_path: Path) -> None:
    assert "at least --generator" in user_error("run", "--data", demo_dir, "--out", tmp_path / "o")
    assert "not both" in user_error("run", QUICKSTART, "--generator", "augment", "--out", tmp_path / "o")
    line = user_error("run", "--generator", "augment", "--data", demo_dir, "--out", tmp_path / "o")
    assert "needs conditions with image, mask" in line
    assert not (tmp_path / "o").exists()


# evaluate


def test_evaluate_writes_a_report(demo_dir: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    result = ok("evaluate", "--real", demo_dir, "--synthetic", synthetic_dir, "--evaluator", "mask-stats",
                "--out", tmp_path / "rep")
    assert "empty_synthetic" in result.stdout and "report.md" in result.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["real"]["pairs"] == 12
    (entry,) = report["results"]
    assert entry["evaluator"] == "mask-stats" and entry["synthetic"] == "aug"
    assert "| mask-stats | fraction_wasserstein |" in (tmp_path / "rep" / "report.md").read_text()


def test_evaluate_json_prints_the_report(demo_dir: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    result = ok("evaluate", "--real", demo_dir, "--synthetic", synthetic_dir, "-e", "mask-stats",
                "--out", tmp_path / "rep", "--json", "--set", "mask-stats.min_component=9")
    report = json.loads(result.stdout)
    assert report == json.loads((tmp_path / "rep" / "report.json").read_text())
    (entry,) = report["results"]
    assert entry["config"] == {"min_component": 9}
    names = {m["name"] for m in entry["metrics"]}
    assert {"fraction_real", "fraction_synthetic", "fraction_wasserstein", "components_wasserstein"} <= names


def test_evaluate_two_synthetic_sets(demo_dir: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    result = ok("-q", "evaluate", "--real", demo_dir, "--synthetic", synthetic_dir, "--synthetic", demo_dir,
                "--evaluator", "mask-stats", "--out", tmp_path / "rep", "--json")
    results = json.loads(result.stdout)["results"]
    assert [r["synthetic"] for r in results] == ["aug", "demo"]
    itself = {m["name"]: m["value"] for m in results[1]["metrics"]}
    assert itself["fraction_wasserstein"] == 0.0  # the real set scored against itself
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Synthetic set `aug`" in md and "## Synthetic set `demo`" in md


def test_evaluate_errors(demo_dir: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    rep = tmp_path / "rep"
    line = user_error("evaluate", "--real", demo_dir, "--synthetic", synthetic_dir, "--evaluator", "fid-ish",
                      "--out", rep)
    evaluators = sorted(c.name for c in default_registry().components("evaluator"))
    assert f"unknown evaluator 'fid-ish'; available: {', '.join(evaluators)}" in line
    line = user_error("evaluate", "--real", demo_dir, "--synthetic", synthetic_dir, "--synthetic", synthetic_dir,
                      "--evaluator", "mask-stats", "--out", rep)
    assert "given twice" in line
    line = user_error("evaluate", "--real", demo_dir, "--synthetic", tmp_path / "nowhere", "--evaluator",
                      "mask-stats", "--out", rep)
    assert f"{tmp_path / 'nowhere'}: dataset folder not found" in line
    assert not rep.exists()


# train


def test_train_rejects_a_generator_that_needs_no_training(demo_dir: Path, tmp_path: Path) -> None:
    line = user_error("train", "augment", "--data", demo_dir, "--out", tmp_path / "ck")
    assert line == "error: generator 'augment' needs no training; use it directly in `medsynth run`"
    assert not (tmp_path / "ck").exists()


def test_train_unknown_generator(demo_dir: Path, tmp_path: Path) -> None:
    line = user_error("train", "painter", "--data", demo_dir, "--out", tmp_path / "ck")
    generators = sorted(c.name for c in default_registry().components("generator"))
    assert line == f"error: unknown generator 'painter'; available: {', '.join(generators)}"
    assert not (tmp_path / "ck").exists()


# bad inputs: one line, exit 2, nothing half-written


def _garbage_image(data: Path) -> str:
    (data / "images" / "case_0003.png").write_bytes(b"not a png at all")
    return "case_0003.png: cannot read"


def _size_mismatch(data: Path) -> str:
    Image.new("L", (32, 32)).save(data / "masks" / "case_0005.png")
    return "case_0005.png: mask is 32x32 but its image is 64x64"


def _extra_labels(data: Path) -> str:
    mask = np.zeros((64, 64), np.uint8)
    mask[:20], mask[20:40] = 1, 2
    Image.fromarray(mask).save(data / "masks" / "case_0007.png")
    return "case_0007.png: mask values {0, 1, 2}"


def _empty(data: Path) -> str:
    for sub in ("images", "masks"):
        for path in (data / sub).iterdir():
            path.unlink()
    return "images: no images found"


def _no_masks_folder(data: Path) -> str:
    for path in (data / "masks").iterdir():
        path.unlink()
    (data / "masks").rmdir()
    return "case_0000.png: image has no mask"


@pytest.mark.parametrize("damage", [_garbage_image, _size_mismatch, _extra_labels, _empty, _no_masks_folder])
def test_run_on_bad_data(demo_copy: Path, tmp_path: Path, damage) -> None:
    message = damage(demo_copy)
    before = snapshot(demo_copy)
    line = user_error("run", QUICKSTART, "--data", demo_copy, "--out", tmp_path / "out", "-n", "2")
    assert message in line and str(demo_copy) in line
    assert not (tmp_path / "out").exists()
    assert snapshot(demo_copy) == before


def test_run_on_a_missing_data_folder(tmp_path: Path) -> None:
    line = user_error("run", QUICKSTART, "--data", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert line == f"error: {tmp_path / 'nowhere'}: dataset folder not found"
    assert not (tmp_path / "out").exists()


def test_evaluate_on_bad_data(demo_copy: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    message = _extra_labels(demo_copy)
    line = user_error("evaluate", "--real", synthetic_dir, "--synthetic", demo_copy, "-e", "mask-stats",
                      "--out", tmp_path / "rep")
    assert message in line
    assert not (tmp_path / "rep").exists()


GOOD = '[run]\nn = 2\n\n[mask_source]\nname = "real-pairs"\n\n[generator]\nname = "augment"\n'


@pytest.mark.parametrize("text, message", [
    (GOOD.replace('"augment"', '"painter"'), "unknown generator 'painter'; available: augment"),
    (GOOD + "[[filters]]\nname = \"sieve\"\n", "unknown filter 'sieve'; available: "),
    (GOOD + "twirl = 3\n", "[generator] 'augment': unknown option 'twirl'; valid options:"),
    (GOOD + 'rotation = "wide"\n', "[generator] 'augment' option 'rotation': expected float, got 'wide'"),
    (GOOD.replace("n = 2", "n = \"two\""), "pipeline.toml [run] option 'n': expected int, got 'two'"),
    (GOOD.replace("[run]", "[runn]"), "pipeline.toml: unknown section [runn]; valid sections: run,"),
    (GOOD.replace("[run]", "[run"), "pipeline.toml: invalid TOML"),
    (GOOD.replace("[generator]\nname = \"augment\"\n", ""), "pipeline.toml: no [generator] section"),
])
def test_run_bad_pipeline_file(demo_dir: Path, tmp_path: Path, text: str, message: str) -> None:
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(text)
    line = user_error("run", pipeline, "--data", demo_dir, "--out", tmp_path / "out")
    assert message in line
    if "available: " in message:
        role = message.split()[1]
        names = sorted(c.name for c in default_registry().components(role))
        assert line.endswith("available: " + ", ".join(names))
    assert not (tmp_path / "out").exists()


def test_run_missing_pipeline_file(demo_dir: Path, tmp_path: Path) -> None:
    line = user_error("run", tmp_path / "nope.toml", "--data", demo_dir, "--out", tmp_path / "out")
    assert line == f"error: {tmp_path / 'nope.toml'}: pipeline file not found"
    assert not (tmp_path / "out").exists()


def test_errors_without_quiet_are_still_one_error_line(demo_copy: Path, tmp_path: Path) -> None:
    _garbage_image(demo_copy)
    result = invoke("run", QUICKSTART, "--data", demo_copy, "--out", tmp_path / "out")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert result.stderr.rstrip().endswith(errors[0])
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_error_lines_are_plain_text_not_markup(tmp_path: Path) -> None:
    # "[runn]" and "[bold]" must reach the user as written, not be eaten as rich markup
    pipeline = tmp_path / "[bold]p.toml"
    pipeline.write_text("[runn]\n")
    line = user_error("run", pipeline, "--out", tmp_path / "out")
    assert line.startswith(f"error: {pipeline}: unknown section [runn];")


# --debug, the console script


def test_debug_raises_instead_of_one_line(tmp_path: Path) -> None:
    result = invoke("--debug", "info", "painter")
    assert result.exit_code == 1
    assert isinstance(result.exception, UnknownComponentError)
    assert "error:" not in result.stderr


def test_debug_prints_the_traceback_in_a_real_process(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "medsynth_cli", "--debug", "run", str(tmp_path / "nope.toml")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ConfigError" in done.stderr and "pipeline file not found" in done.stderr
    plain = subprocess.run(command[:3] + command[4:], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == f"error: {tmp_path / 'nope.toml'}: pipeline file not found"


def test_console_script_help() -> None:
    script = Path(sys.executable).with_name("medsynth")
    assert script.is_file(), "install the project (pip install -e .) to get the console script"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("list", "info", "demo-data", "run", "train", "evaluate", "--debug", "--quiet"):
        assert command in done.stdout
