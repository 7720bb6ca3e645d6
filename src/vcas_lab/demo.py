"""``vcas demo``: exact training and VCAS side by side on the built-in default task.

Three epochs of BBC News with the pretrained MiniLM (321 steps), exact training and VCAS with
VCASConfig's defaults, in lockstep (each batch trains both models in turn, so their times are
comparable on a shared machine), with three independent variance checks during the VCAS run.
"""

from __future__ import annotations

import argparse
import sys

from . import compare

FULL = {"task": "bbc-minilm", "epochs": 3, "max_length": 128, "methods": "exact,vcas"}
QUICK = {"task": "bbc-minilm", "steps": 12, "max_length": 64, "eval_limit": 96, "train_limit": 400,
         "variance_checks": 1, "check_max_pairs": 4, "evaluations": 2, "methods": "exact,vcas"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smoke run of under 2 minutes")
    parser.add_argument("--all", action="store_true",
                        help="add exact training with zero-row skipping and the SB and UB baselines")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if vcas created it")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast")
    parser.add_argument("--no-progress", action="store_true")


def compare_arguments(args: argparse.Namespace) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    preset = dict(QUICK if args.quick else FULL)
    if args.all:
        preset["methods"] = "exact,exact-skip,vcas,sb,ub"
    argv = ["--out", args.out, "--seeds", args.seeds, "--device", args.device, "--lockstep"]
    for key, value in preset.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    for flag in ("overwrite", "no_progress", "bf16"):
        if getattr(args, flag):
            argv.append(f"--{flag.replace('_', '-')}")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    options = compare_arguments(args)
    what = "a 12-step smoke run" if args.quick else "3 epochs (321 steps, about 20 minutes on 2 CPU cores)"
    print(f"vcas demo: fine-tuning the pretrained MiniLM on BBC News, {what}, with exact training and "
          f"with VCAS ({options.methods.replace(',', ', ')}), the methods training on each batch in turn; "
          f"{options.variance_checks} independent variance check(s) during the VCAS run (not timed). "
          f"Writing to {options.out}/ (report.md, report.json, steps.csv, plots).", file=sys.stderr)
    code = compare.run(options)
    if code == 0:
        print("\n'final train loss' is the mean training loss over the last 5 % of steps (the progress "
              "bars show single batches); 'train FLOPs saved by sampling' is against exact training "
              "that also skips rows whose gradient is exactly zero, 'in all' against stock PyTorch.")
    return code
