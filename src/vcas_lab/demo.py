"""``vcas demo``: exact training and VCAS side by side on the built-in default task."""

from __future__ import annotations

import argparse

from . import compare

# Three epochs of BBC News (321 steps) with VCASConfig's defaults (controller "auto": the adaptive
# one on this model, calibrating at most every 20 steps): about 15 minutes for both runs on a
# 2-core CPU. README "Choosing a controller" compares it with the paper's controller.
FULL = {"epochs": 3, "controller": "auto", "max_length": 128}
QUICK = {"steps": 12, "update_every": 4, "controller": "auto", "max_length": 64,
         "eval_limit": 96, "train_limit": 400}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smoke run of under 2 minutes")
    parser.add_argument("--all", action="store_true", help="add the SB and UB baselines")
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--no-progress", action="store_true")


def compare_arguments(args: argparse.Namespace) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    preset = QUICK if args.quick else FULL
    argv = ["--task", "bbc-minilm", "--out", args.out, "--seeds", args.seeds,
            "--methods", "exact,vcas,sb,ub" if args.all else "exact,vcas"]
    for key, value in preset.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    if args.overwrite:
        argv.append("--overwrite")
    if args.no_progress:
        argv.append("--no-progress")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    return compare.run(compare_arguments(args))
