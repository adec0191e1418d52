"""``medsynth bench``: methods from generator recipes, trained, run and scored alike, one table, resumable."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import medsynth_plugins.baseline as baseline
from medsynth_cli.app import app
from medsynth_core import ConfigError, Context, Generator, MedsynthError, Sample, hookimpl
from medsynth_core.bench import BenchSettings, bench_methods, run_bench
from medsynth_core.registry import Registry, make_plugin_manager
from medsynth_core.sample import Condition

FITS: list[Path] = []


class MeanImageGenerator(Generator):
    """A trainable toy: learns the mean real image, paints it under each real mask."""

    requires = frozenset({"mask"})
    trainable = True
    recipe = {"train": {}, "mask_source": {"name": "real-masks"}}

    def fit(self, dataset, workdir: Path) -> Path:
        FITS.append(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        mean = np.mean([dataset[i].image for i in range(len(dataset))], axis=0)
        np.save(workdir / "mean.npy", mean)
        return workdir

    def load(self, checkpoint: Path) -> None:
        self.mean = np.load(checkpoint / "mean.npy")

    def generate(self, conditions: Sequence[Condition], seeds: Sequence[int]) -> list[Sample]:
        return [Sample(image=self.mean.astype(np.float32), mask=c.mask) for c in conditions]


class _Plugin:
    @hookimpl
    def register_generators(self, register):
        register("mean-image", MeanImageGenerator)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(baseline, name="baseline")
    pm.register(_Plugin(), name="bench-test")
    yield Registry(pm)


def _settings(demo: Path, out: Path) -> BenchSettings:
    return BenchSettings(data=demo, out=out, n=6, seed=0, batch_size=3,
                         evaluators=[{"name": "mask-stats"}])


def test_every_method_with_a_recipe_is_benched_and_tabled(registry: Registry, demo_dir: Path,
                                                         tmp_path: Path) -> None:
    FITS.clear()
    methods = bench_methods(registry)
    assert set(methods) == {"augment", "mean-image"}
    result = run_bench(_settings(demo_dir, tmp_path), registry, Context(), methods)
    table = result.table.read_text().splitlines()
    header = next(line for line in table if line.startswith("| method"))
    assert "cost: train_seconds" in header and "cost: pairs_per_second" in header
    assert "mask-stats: fraction_wasserstein" in header
    rows = {line.split("|")[1].strip(): line for line in table if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"method", "augment", "mean-image"}
    for name in ("augment", "mean-image"):
        assert len(list((tmp_path / name / "pairs" / "images").iterdir())) == 6
    assert [str(p) for p in FITS] == [str(tmp_path / "mean-image" / "checkpoint")]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {r["synthetic"] for r in report["results"]} == {"augment", "mean-image"}
    assert "metrics.png" in report["figures"]


def test_a_finished_bench_resumes_without_training_or_scoring_again(
        registry: Registry, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medsynth_core.bench as bench

    FITS.clear()
    scored: list[str] = []
    real_evaluate = bench.evaluate
    monkeypatch.setattr(bench, "evaluate", lambda e, r, s: scored.append(s.name) or real_evaluate(e, r, s))
    run_bench(_settings(demo_dir, tmp_path), registry, Context(), bench_methods(registry))
    state = json.loads((tmp_path / "bench.json").read_text())
    table = (tmp_path / "bench.md").read_text()
    run_bench(_settings(demo_dir, tmp_path), registry, Context(), bench_methods(registry))
    assert len(FITS) == 1, "training ran once"
    assert sorted(scored) == ["augment", "mean-image"], "each set was scored once"
    assert json.loads((tmp_path / "bench.json").read_text()) == state
    assert (tmp_path / "bench.md").read_text() == table
    other = _settings(demo_dir, tmp_path)
    other.evaluators = [{"name": "mask-stats", "min_component": 2}]
    run_bench(other, registry, Context(), bench_methods(registry))
    assert len(scored) == 4, "other evaluators: the sets are scored again"


def test_a_bench_folder_of_another_seed_is_refused(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    run_bench(_settings(demo_dir, tmp_path), registry, Context(), bench_methods(registry, ["augment"]))
    other = _settings(demo_dir, tmp_path)
    other.seed = 1
    with pytest.raises(ConfigError, match="other data, n or seed"):
        run_bench(other, registry, Context(), bench_methods(registry, ["augment"]))


class Recipeless(Generator):
    """A generator with no recipe."""

    def generate(self, conditions, seeds):
        return []


def test_unknown_or_recipeless_methods_are_one_line_errors(registry: Registry) -> None:
    with pytest.raises(MedsynthError, match="unknown generator 'no-such'"):
        bench_methods(registry, ["no-such"])

    class Plugin:
        @hookimpl
        def register_generators(self, register):
            register("recipeless", Recipeless)

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(Plugin(), name="recipeless")
    with pytest.raises(ConfigError, match="no recipe for `medsynth bench`"):
        bench_methods(Registry(pm), ["recipeless"])
    with pytest.raises(ConfigError, match="no installed generator has a recipe"):
        bench_methods(Registry(pm))


def test_bench_command_with_one_method(demo_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "--data", str(demo_dir), "--out", str(tmp_path), "-m", "augment",
                                      "-n", "4", "-e", "mask-stats", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| augment |" in (tmp_path / "bench.md").read_text()
    bad = CliRunner().invoke(app, ["bench", "--data", str(demo_dir), "--out", str(tmp_path / "x"), "-m", "threshold"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
