"""Reports: report.json, report.md, figures, and evaluators that cannot run here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsynth_cli.app import app
from medsynth_core import (
    ConfigError,
    Context,
    Dataset,
    Evaluator,
    EvaluatorResult,
    Metric,
    Registry,
    Sample,
    Skipped,
    build_evaluators,
    build_pipeline,
    default_registry,
    hookimpl,
    make_plugin_manager,
    open_dataset,
    parse_pipeline,
    write_report,
)

runner = CliRunner()


class NeedsWeightsEvaluator(Evaluator):
    """Stands in for an evaluator whose network weights are not on this machine."""

    def unavailable(self) -> str | None:
        return "needs local weights: set the option 'weights' or MEDSYNTH_TEST_WEIGHTS"

    def evaluate(self, real, synthetic):
        raise AssertionError("an unavailable evaluator must never run")


class _Plugin:
    @hookimpl
    def register_evaluators(self, register):
        register("needs-weights", NeedsWeightsEvaluator)


@pytest.fixture
def plugin() -> Iterator[None]:
    pm = default_registry().plugin_manager
    pm.register(_Plugin(), name="report-test")
    try:
        yield
    finally:
        pm.unregister(name="report-test")


def _tiny_set(name: str, shift: float) -> Dataset:
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(4):
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 1
        image = np.clip(rng.uniform(0, 0.5, (32, 32)) + shift * mask, 0, 1).astype(np.float32)
        samples.append(Sample(image=image, mask=mask))
    return Dataset.from_samples(samples, name=name)


def test_report_writes_json_markdown_and_figures(tmp_path: Path) -> None:
    real, synthetic = _tiny_set("real", 0.4), _tiny_set("fake", 0.2)
    curve = {"x": [2, 4], "series": {"real": {"mean": [0.5, 0.7], "sd": [0.1, 0.05]}},
             "xlabel": "real training pairs", "ylabel": "Dice"}
    results = [EvaluatorResult("toy", {}, "fake", [Metric("score", 0.25, "higher", 0.05),
                                                   Metric("dice", 0.7, "higher", details={"curve": curve})])]
    write_report(tmp_path, real, results, synthetic=[synthetic], skipped=[Skipped("fid", "set 'weights'")])
    payload = json.loads((tmp_path / "report.json").read_text())
    assert payload["skipped"] == [{"evaluator": "fid", "reason": "set 'weights'"}]
    assert payload["figures"] == ["pairs.png", "metrics.png", "curve-toy-dice.png"]
    for name in payload["figures"]:
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    markdown = (tmp_path / "report.md").read_text()
    assert "| toy | score | 0.25 ± 0.05 | ↑ |" in markdown
    assert "- `fid`: set 'weights'" in markdown
    assert "![curve-toy-dice.png](curve-toy-dice.png)" in markdown


def test_all_skips_what_cannot_run_and_says_why() -> None:
    import medsynth_plugins.baseline as baseline

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(baseline, name="baseline")
    pm.register(_Plugin(), name="report-test")
    registry = Registry(pm)
    stages = [{"name": "mask-stats", "min_component": 2}, {"name": "needs-weights"}]
    built, skipped = build_evaluators(registry, stages, Context(), skip_unavailable=True)
    assert [e.name for e in built] == ["mask-stats"] and built[0].config.min_component == 2
    assert skipped == [Skipped("needs-weights", "needs local weights: set the option 'weights' or "
                                                "MEDSYNTH_TEST_WEIGHTS")]
    with pytest.raises(ConfigError, match="^evaluator 'needs-weights': needs local weights"):
        build_evaluators(registry, stages, Context())


def test_naming_an_unavailable_evaluator_is_one_error_line(plugin, demo_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["-q", "evaluate", "--real", str(demo_dir), "--synthetic", str(demo_dir),
                                 "--evaluator", "needs-weights", "--out", str(tmp_path / "rep")])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: evaluator 'needs-weights': needs local weights: set the option "
                                     "'weights' or MEDSYNTH_TEST_WEIGHTS")
    assert not (tmp_path / "rep").exists()


def test_a_pipeline_with_an_unavailable_evaluator_is_refused_before_work(plugin, demo_dir: Path) -> None:
    spec = parse_pipeline({"run": {"data": str(demo_dir)}, "mask_source": "real-pairs", "generator": "augment",
                           "evaluators": ["needs-weights"]})
    with pytest.raises(ConfigError, match="needs-weights.*MEDSYNTH_TEST_WEIGHTS"):
        build_pipeline(spec, default_registry())


def test_run_report_has_a_contact_sheet_of_real_and_synthetic(demo_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["-q", "run", "--generator", "augment", "--mask-source", "real-pairs",
                                 "--evaluator", "mask-stats", "--data", str(demo_dir), "--out",
                                 str(tmp_path / "run"), "-n", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "pairs.png").is_file()
    assert len(open_dataset(tmp_path / "run")) == 3, "figures do not count as pairs"
