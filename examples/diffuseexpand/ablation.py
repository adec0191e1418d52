"""Regenerate DiffuseExpand's Table 1 ablation (and the tau-versus-s comparison of Fig. 2) in one report.

    python examples/diffuseexpand/ablation.py [--data data/demo] [--checkpoint runs/train-diffuseexpand]
        [--out runs/diffuseexpand] [-n 32] [--utility] [--set generator.solver_steps=10 ...]

Trains the checkpoint first when the folder holds none (``medsynth train diffuseexpand``, CPU
defaults), runs every pipeline file of this folder (``medsynth run``, resumed when its folder
exists) and scores all the sets against the real one in one ``medsynth evaluate`` report:
mask-stats, mask-agreement (do a real-trained segmenter and each synthetic mask agree, the
alignment Stage IV selects for), FID and KID (clean-fid's InceptionV3 when
MEDSYNTH_INCEPTION_WEIGHTS names a local copy, else the encoder of a U-Net trained on the real
masks), and ms-ssim (variety). ``--utility`` adds the paper's Dice row: a U-Net trained on the
real pairs with and without each synthetic set, scored on held-out real pairs (slower).
Extra ``--set`` flags go to every ``medsynth run``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = ["cf", "cf_cg", "cf_cg_tau2", "cf_cg_tau3", "cf_cg_s2", "cf_cg_s3", "cf_cg_cs", "cf_cg_cs_tau2",
        "cf_cg_cs_tau3"]


def medsynth(*args: str) -> None:
    exe = Path(sys.executable).with_name("medsynth")
    command = [str(exe) if exe.exists() else (shutil.which("medsynth") or "medsynth"), *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--checkpoint", default="runs/train-diffuseexpand")
    parser.add_argument("--out", default="runs/diffuseexpand")
    parser.add_argument("-n", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--utility", action="store_true", help="also train downstream U-Nets (Table 1's Dice row)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every run")
    args = parser.parse_args()

    checkpoint, out = Path(args.checkpoint), Path(args.out)
    if not (checkpoint / "checkpoint.json").is_file():
        medsynth("train", "diffuseexpand", "--data", args.data, "--out", str(checkpoint), "--device", args.device)
    for row in ROWS:
        folder = out / row
        sets = [f"generator.checkpoint={checkpoint}", f"mask_source.checkpoint={checkpoint}", *args.sets]
        medsynth("run", str(HERE / f"{row}.toml"), "--data", args.data, "--out", str(folder), "-n", str(args.n),
                 "--device", args.device, *(x for s in sets for x in ("--set", s)),
                 *(["--resume"] if folder.is_dir() and any(folder.iterdir()) else []))

    extractor = "inception" if os.environ.get("MEDSYNTH_INCEPTION_WEIGHTS") else "segmenter"
    evaluators = ["mask-stats", "mask-agreement", "fid", "kid", "ms-ssim", *(["utility"] if args.utility else [])]
    medsynth("evaluate", "--real", args.data, *(x for row in ROWS for x in ("--synthetic", str(out / row))),
             *(x for e in evaluators for x in ("--evaluator", e)),
             "--set", f"fid.extractor={extractor}", "--set", f"kid.extractor={extractor}",
             "--device", args.device, "--out", str(out / "report"))
    print(f"report: {out / 'report' / 'report.md'}")


if __name__ == "__main__":
    main()
