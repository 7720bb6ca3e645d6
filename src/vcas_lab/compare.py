"""``vcas compare``: fine-tune one model on one task with several methods, side by side."""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

from vcas.config import VCASConfig
from vcas.errors import ConfigError
from . import report, tasks
from .train import METHODS, RunSettings, run_method


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="bbc-minilm",
                        help=f"built-in task: {', '.join(sorted(tasks.BUILTIN))} (default bbc-minilm)")
    parser.add_argument("--model", help="a local transformers sequence-classification checkpoint")
    parser.add_argument("--train", help="training file (.csv or .jsonl) for --model")
    parser.add_argument("--eval", help="evaluation file (.csv or .jsonl) for --model")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--methods", default="exact,vcas,sb,ub",
                        help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--out", default="runs/compare", help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--epochs", type=float, help="training epochs (task default if omitted)")
    parser.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--update-every", type=int,
                        help="VCAS controller period F (default: the controller's, 100 for paper, "
                             "20 for adaptive)")
    parser.add_argument("--tau", type=float, default=0.025, help="tau_act = tau_w")
    parser.add_argument("--controller", default="auto", choices=["auto", "adaptive", "paper"],
                        help="controller of the 'vcas' method (default auto: VCASConfig's "
                             "default; vcas-paper / vcas-adaptive pick one)")
    parser.add_argument("--adaptive-update-every", type=int,
                        help="longest calibration interval of vcas-adaptive (default 20)")
    parser.add_argument("--variance-checks", type=int, default=0,
                        help="independent large-sample checks of V/V_sgd during each VCAS run")
    parser.add_argument("--min-weight-numel", type=int,
                        help="VCASConfig.min_weight_numel: the smallest linear weight (entries) whose "
                             "gradient the controllers sample (default 65536; 0 samples every one)")
    parser.add_argument("--max-weight-ratio", type=float,
                        help="VCASConfig.max_weight_ratio: adaptive nu above this becomes 1 "
                             "(default 1)")
    parser.add_argument("--baseline-keep", type=float, default=1 / 3, help="SB / UB keep ratio")
    parser.add_argument("--train-limit", type=int, help="use only the first N training items")
    parser.add_argument("--eval-limit", type=int, help="evaluate on the first N items only")
    parser.add_argument("--no-progress", action="store_true")


@dataclasses.dataclass
class CompareOptions:
    methods: list[str]
    out: Path
    seeds: list[int]


def validate(args: argparse.Namespace) -> CompareOptions:
    """Every input problem, found before any model is loaded or trained."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise tasks.TaskError(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    if args.model is None:
        tasks.check_task_name(args.task)
    elif not (args.train and args.eval):
        raise tasks.TaskError("--model needs --train FILE and --eval FILE")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise tasks.TaskError(f"output directory {out} exists; pass --overwrite to replace it")
    try:
        seeds = [int(s) for s in str(args.seeds).split(",")]
    except ValueError:
        raise tasks.TaskError(f"--seeds {args.seeds!r}: give integers such as 0,1,2") from None
    VCASConfig(tau_act=args.tau, tau_w=args.tau, update_every=args.update_every,
               **_config_options(args))  # validates
    return CompareOptions(methods, out, seeds)


def load_task(args: argparse.Namespace) -> tasks.Task:
    if args.model is not None:
        task = tasks.text_files(args.model, args.train, args.eval, args.text_column,
                                args.label_column, args.max_length)
    else:
        task = tasks.builtin_task(args.task, max_length=args.max_length)
    if args.train_limit:
        task.train = {k: v[: args.train_limit] for k, v in task.train.items()}
    return task


def settings_for(task: tasks.Task, args: argparse.Namespace, seed: int) -> RunSettings:
    batch_size = args.batch_size or task.batch_size
    per_epoch = len(task.train["labels"]) // batch_size
    steps = args.steps or max(1, math.ceil((args.epochs or task.epochs) * per_epoch))
    return RunSettings(steps=steps, batch_size=batch_size, lr=args.lr or task.lr, seed=seed,
                       baseline_keep=args.baseline_keep, eval_limit=args.eval_limit,
                       adaptive_update_every=args.adaptive_update_every,
                       variance_checks=args.variance_checks,
                       vcas=VCASConfig(tau_act=args.tau, tau_w=args.tau,
                                       update_every=args.update_every, seed=seed,
                                       controller=args.controller, **_config_options(args)))


def _config_options(args: argparse.Namespace) -> dict[str, Any]:
    """The VCASConfig settings given on the command line beyond tau, F and the controller."""
    options = {name: getattr(args, name, None) for name in ("min_weight_numel", "max_weight_ratio")}
    return {name: value for name, value in options.items() if value is not None}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    options = validate(args)
    task = load_task(args)
    if options.out.exists():
        shutil.rmtree(options.out)
    options.out.mkdir(parents=True)
    runs = []
    for seed in options.seeds:
        settings = settings_for(task, args, seed)
        for method in options.methods:
            with report.progress_bar(settings.steps, f"{method} seed {seed}", args.no_progress) as tick:
                runs.append((seed, run_method(task, method, settings, tick)))
    summary = report.write_report(options.out, task, settings_for(task, args, options.seeds[0]),
                                  runs, vars(args))
    print(report.summary_table(summary))
    print(f"\nreport: {options.out / 'report.md'}")
    return summary


def run(args: argparse.Namespace) -> int:
    try:
        compare(args)
    except (tasks.TaskError, ConfigError) as error:
        print(f"vcas compare: error: {error}")
        return 2
    return 0
