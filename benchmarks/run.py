"""One table of generation cost: every generator's pairs per second, peak memory and sampler steps,
with ratios against the paper's own sampler settings on the same model, and CPU refine throughput.

Each generator is trained for a handful of steps at 32 px (the sampling cost does not depend on
how well a model is trained), then whole pipelines run through the real runner (mask source,
generator, refiners, PNG writing, manifest) in a fresh process per row, so the peak resident
memory of a row is its own. Ratios compare samplers on the same model and carry over to paper
scale; absolute numbers describe this machine. Results go to ``benchmarks/RESULTS.md``.

    python benchmarks/run.py                # the whole table, about 10-15 minutes on two CPU cores
    python benchmarks/run.py --only ddpm4   # re-measure one generator; the other rows are kept
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIZE = 32
TINY_SD = {"resolution": SIZE, "base_widths": [16, 32], "base_steps": 2, "batch_size": 2, "seed": 0}


@dataclass
class Variant:
    """One sampler setting of a generator; ``paper`` marks the setting the paper used."""

    label: str
    generator: dict[str, Any] = field(default_factory=dict)
    steps: str = "-"
    paper: bool = False


@dataclass
class Case:
    """A generator, how to train a tiny model of it, and the pipeline around it."""

    name: str
    pipeline: dict[str, Any]
    variants: list[Variant]
    train: dict[str, Any] | None = None  # {"generator": name, "options": {...}}
    pairs: int = 4


CASES = [
    Case("augment", {"mask_source": {"name": "real-pairs"}, "generator": {"name": "augment"}},
         [Variant("flips, affine, elastic, intensity")], pairs=64),
    Case("ddpm4",
         {"generator": {"name": "ddpm4", "checkpoint": "{ckpt}"}, "refiners": [{"name": "threshold"}]},
         [Variant("DPM-Solver++", {"scheduler": "dpm-solver++", "inference_steps": 20}, "20"),
          Variant("DDIM", {"scheduler": "ddim", "inference_steps": 50}, "50"),
          Variant("DDPM respaced (paper)", {"scheduler": "ddpm", "inference_steps": 200}, "200", paper=True),
          Variant("DDPM full chain", {"scheduler": "ddpm", "inference_steps": 1000}, "1000")],
         train={"generator": "ddpm4", "options": {
             "size": SIZE, "per_cluster": False, "block_out_channels": [16, 32], "layers_per_block": 1,
             "attention_resolutions": [], "attention_head_dim": 16, "norm_num_groups": 8, "steps": 2,
             "batch_size": 2, "save_every": 2}}),
    Case("repaint",
         {"mask_source": {"name": "real-pairs"}, "generator": {"name": "repaint", "model": "{ckpt}"},
          "refiners": [{"name": "threshold"}]},
         [Variant("50 steps, skip 20, jumps 10 x 5", {"inference_steps": 50, "skip_steps": 20}, "50"),
          Variant("paper: 200 steps, skip 80, jumps 10 x 5", {"inference_steps": 200, "skip_steps": 80}, "200",
                  paper=True)],
         train={"generator": "ddpm4", "options": {
             "size": SIZE, "per_cluster": False, "block_out_channels": [16, 32], "layers_per_block": 1,
             "attention_resolutions": [], "attention_head_dim": 16, "norm_num_groups": 8, "steps": 2,
             "batch_size": 2, "save_every": 2}}, pairs=2),
    Case("diffuseexpand",
         {"mask_source": {"name": "diffuseexpand-masks", "checkpoint": "{ckpt}"},
          "generator": {"name": "diffuseexpand", "checkpoint": "{ckpt}"}},
         [Variant("DPM-Solver++ (paper)", {"sampler": "dpm-solver++", "solver_steps": 20}, "20 + 20", paper=True),
          Variant("DDPM full chain", {"sampler": "ddpm"}, "1000 + 1000")],
         train={"generator": "diffuseexpand", "options": {"size": SIZE, "steps": 2, "batch_size": 2, "save_every": 2}},
         pairs=2),
    Case("controlnet",
         {"mask_source": {"name": "real-masks"}, "generator": {"name": "controlnet", "checkpoint": "{ckpt}"}},
         [Variant("DPM-Solver++ 2M", {"scheduler": "dpm++", "sampling_steps": 25}, "25"),
          Variant("DDIM (ControlNet repository)", {"scheduler": "ddim", "sampling_steps": 50}, "50", paper=True),
          Variant("DDPM full chain", {"scheduler": "ddpm", "sampling_steps": 1000}, "1000")],
         train={"generator": "controlnet", "options": {**TINY_SD, "steps": 2, "checkpoint_every": 2,
                                                       "validate_every": 0}}),
    Case("sd-attention",
         {"generator": {"name": "sd-attention", "checkpoint": "{ckpt}"},
          "refiners": [{"name": "adaptive-threshold"}]},
         [Variant("DPM-Solver++ 2M", {"scheduler": "dpm++", "sampling_steps": 25}, "25"),
          Variant("DDIM (Stable Diffusion default)", {"scheduler": "ddim", "sampling_steps": 50}, "50", paper=True)],
         train={"generator": "sd-attention", "options": {**TINY_SD, "grounding_steps": 2, "checkpoint_every": 2}}),
    Case("um2i",
         {"mask_source": {"name": "real-masks"},
          "generator": {"name": "um2i", "checkpoint": "{ckpt}", "condition": "mask"}},
         [Variant("one generator pass (GAN)", {}, "1", paper=True)],
         train={"generator": "um2i", "options": {"condition": "mask", "size": SIZE, "supervised_steps": 2,
                                                 "semi_steps": 0, "vum_steps": 0, "checkpoint_every": 2}},
         pairs=16),
]
REFINERS = ["threshold", "adaptive-threshold", "affinity", "densecrf"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="Generators (case names) to measure.")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _spawn({"task": "data", "root": str(root)})
        for case in CASES:
            if args.only and case.name not in args.only:
                continue
            if case.train:
                _spawn({"task": "train", "root": str(root), "case": case.name, **case.train})
            for variant in case.variants:
                result = _spawn({"task": "run", "root": str(root), "case": case.name, "pairs": case.pairs,
                                 "pipeline": case.pipeline, "overrides": variant.generator})
                rows.append({"case": case.name, "variant": variant.label, "steps": variant.steps,
                             "paper": variant.paper, **result})
                print(_row_text(rows[-1]), flush=True)
        refine_rows = [] if args.only else [
            {"refiner": name, "size": size, **_spawn({"task": "refine", "name": name, "size": size})}
            for name in REFINERS for size in (64, 256)]
    for r in refine_rows:
        print(f"{r['refiner']:<20}{r['size']:>5} px {r['per_second']:10.1f} images/s {r['peak_mib']:8.0f} MiB")
    saved = args.out.with_suffix(".json")
    if args.only and saved.is_file():  # re-measured generators replace their rows, the rest are kept
        old = json.loads(saved.read_text())
        rows = [r for r in old["rows"] if r["case"] not in args.only] + rows
        rows.sort(key=lambda r: [c.name for c in CASES].index(r["case"]))
        refine_rows = old["refine_rows"]
    saved.write_text(json.dumps({"rows": rows, "refine_rows": refine_rows}, indent=1) + "\n")
    table = render(rows, refine_rows)
    print(table)
    args.out.write_text(table)
    print(f"written: {args.out} and {saved}")


def _spawn(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task in a fresh interpreter; its stdout's last line is the JSON result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(task)], capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark task {task.get('task')} {task.get('case', task.get('name', ''))} failed:\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(task: dict[str, Any]) -> dict[str, Any]:
    from medsynth_core import Context, build_pipeline, default_registry, open_dataset, parse_pipeline
    from medsynth_core.demo_data import write_demo_dataset
    from medsynth_core.runner import run_pipeline

    root = Path(task.get("root", "."))
    data = root / "demo"
    if task["task"] == "data":
        write_demo_dataset(data, n=16, size=SIZE)
        return {}
    registry = default_registry()
    if task["task"] == "train":
        generator = registry.create("generator", task["generator"], task["options"], context=Context())
        generator.fit(open_dataset(data), root / f"ckpt-{task['case']}")
        return {}
    if task["task"] == "refine":
        return _refine_rate(task["name"], task["size"])
    ckpt = str(root / f"ckpt-{task['case']}")
    raw = json.loads(json.dumps(task["pipeline"]).replace("{ckpt}", ckpt))
    raw["generator"].update(task["overrides"])
    out = root / f"run-{task['case']}-{time.monotonic_ns()}"
    raw["run"] = {"n": task["pairs"], "seed": 0, "batch_size": task["pairs"], "data": str(data), "out": str(out),
                  "device": "cpu"}
    pipeline = build_pipeline(parse_pipeline(raw, task["case"]), registry, Context())
    sampling = _timed_sampling(pipeline)
    started = time.perf_counter()
    result = run_pipeline(pipeline, out, real=open_dataset(data))
    seconds = time.perf_counter() - started
    return {"pairs": result.kept, "seconds": seconds, "pairs_per_second": result.kept / seconds,
            "sampling_per_pair": sampling[0] / result.kept, "peak_mib": _peak_mib()}


def _timed_sampling(pipeline: Any) -> list[float]:
    """Wrap the mask source and the generator so the time spent sampling is summed apart from the
    rest (loading, refining, writing); returns the one-element list the sum goes into."""
    total = [0.0]

    def wrap(component: Any, method: str) -> None:
        inner = getattr(component, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - started

        setattr(component, method, timed)

    wrap(pipeline.generator, "generate")
    if pipeline.mask_source is not None:
        wrap(pipeline.mask_source, "conditions")
    return total


def _refine_rate(name: str, size: int) -> dict[str, Any]:
    import numpy as np
    from scipy import ndimage

    from medsynth_core import Context, Sample, default_registry

    refiner = default_registry().create("refiner", name, {}, context=Context())
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    truth = ((yy - 0.5) / 0.3) ** 2 + ((xx - 0.3) / 0.13) ** 2 <= 1
    image = np.clip(np.where(truth, 0.3, 0.65) + rng.normal(0, 0.05, truth.shape), 0, 1).astype(np.float32)
    soft = np.clip(0.6 * ndimage.gaussian_filter(truth.astype(float), size / 12) + 0.05, 0, 1).astype(np.float32)
    samples = [Sample(image=image, soft_mask=soft, meta={"seed": k}) for k in range(8)]
    refiner.refine(samples[:1])  # warm-up
    started = time.perf_counter()
    refiner.refine(samples)
    return {"per_second": len(samples) / (time.perf_counter() - started), "peak_mib": _peak_mib()}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _row_text(row: dict[str, Any]) -> str:
    return (f"{row['case']:<15}{row['variant']:<42}{row['steps']:>12}{row['pairs_per_second']:10.3f} pairs/s"
            f"{row['sampling_per_pair']:9.3g} s/pair sampling{row['peak_mib']:8.0f} MiB")


def render(rows: list[dict[str, Any]], refine_rows: list[dict[str, Any]]) -> str:
    """RESULTS.md: the machine, then the generation and refine tables."""
    import torch

    paper_cost = {r["case"]: r["sampling_per_pair"] for r in rows if r["paper"]}
    lines = [
        "# Benchmark results",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/run.py` on {_machine()}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, no GPU. Models are tiny "
        f"({SIZE} px, trained for a few steps): absolute rates describe this machine, the ratios compare "
        "sampler settings on the same model and carry over to paper scale, where network evaluations "
        "dominate even more. Each row is a whole pipeline in a fresh process (load, generate, refine, write "
        "PNGs and manifest); peak memory is that process's maximum resident set.",
        "",
        "## Generation",
        "",
        "`pairs/s` is the whole pipeline; `sampling s/pair` is the time inside the mask source and the "
        "generator alone, and `x paper's setting` is the paper's sampling time per pair divided by this row's "
        "(above 1: faster than the paper's sampler on the same model).",
        "",
        "| generator | sampler setting | steps | pairs/s | sampling s/pair | peak memory (MiB) | x paper's setting |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = paper_cost[r["case"]] / r["sampling_per_pair"] if r["case"] in paper_cost else float("nan")
        mark = " (paper)" if r["paper"] and "paper" not in r["variant"] else ""
        lines.append(f"| {r['case']} | {r['variant']}{mark} | {r['steps']} | {r['pairs_per_second']:.3f} | "
                     f"{r['sampling_per_pair']:.3g} | {r['peak_mib']:.0f} | "
                     f"{'-' if ratio != ratio else f'{ratio:.2f}'} |")
    if refine_rows:
        lines += ["", "## CPU refiners", "", "| refiner | image size | images/s | peak memory (MiB) |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['refiner']} | {r['size']} px | {r['per_second']:.1f} | {r['peak_mib']:.0f} |"
                  for r in refine_rows]
    lines.append("")
    return "\n".join(lines)


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {platform.system()} {platform.release()}"


if __name__ == "__main__":
    main()
