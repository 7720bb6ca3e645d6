"""``vcas compare``: train one model on one task with several methods, side by side.

Every method of a seed starts from the same weights and sees the same batches; ``--lockstep``
trains them on each batch in turn (the fair way to compare time on a shared machine). The VCAS
settings are flags generated from :class:`vcas.VCASConfig`'s fields (``--tau-act``,
``--update-every``, ...). Every input is checked before anything is loaded or trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shutil
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vcas import VCASConfig
from vcas.errors import ConfigError

from . import report, tasks
from .train import DESCRIPTIONS, METHODS, Run, RunSettings, run_in_lockstep, run_sequentially

MARKER = ".vcas-run"  # in every output folder vcas creates: --overwrite only replaces those
# VCASConfig fields with flags of their own here (the seed comes from --seeds).
_NOT_FLAGS = {"seed"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("task (a built-in one, or a model with data)")
    source.add_argument("--task", default="bbc-minilm",
                        help=f"built-in task: {', '.join(sorted(tasks.BUILTIN))} (default bbc-minilm)")
    source.add_argument("--model", help="a transformers sequence-classification checkpoint: a local "
                        "folder, or a Hub name when the Hub is reachable")
    source.add_argument("--train", help="training file (.csv or .jsonl) for --model")
    source.add_argument("--eval", help="evaluation file (.csv or .jsonl) for --model")
    source.add_argument("--dataset", help="a dataset for --model, loaded with datasets.load_dataset "
                        "(Hub name or local path; needs the datasets package)")
    source.add_argument("--train-split", default="train")
    source.add_argument("--eval-split", default="test")
    source.add_argument("--text-column", default="text")
    source.add_argument("--label-column", default="label")
    source.add_argument("--max-length", type=int, default=128, help="tokens per text (default 128)")
    source.add_argument("--train-limit", type=int, help="use only the first N training items")
    source.add_argument("--eval-limit", type=int, help="evaluate on the first N held-out items only")

    run = parser.add_argument_group("runs")
    run.add_argument("--methods", default="exact,vcas",
                     help="comma-separated, from " + ", ".join(METHODS) + " (default exact,vcas). "
                     + "; ".join(f"{m}: {d}" for m, d in DESCRIPTIONS.items()))
    run.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    run.add_argument("--epochs", type=float, help="training epochs (the task's default if omitted)")
    run.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    run.add_argument("--batch-size", type=int, help="the task's default if omitted")
    run.add_argument("--lr", type=float, help="AdamW learning rate (the task's default if omitted)")
    run.add_argument("--lockstep", action="store_true",
                     help="train the methods on each batch in turn (fair time ratios on a shared machine)")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    run.add_argument("--bf16", action="store_true", help="train under bf16 autocast")
    run.add_argument("--baseline-keep", type=float, default=1 / 3, help="SB / UB keep ratio (default 1/3)")
    run.add_argument("--adaptive-update-every", type=int,
                     help="update_every of vcas-adaptive (default: that of the vcas method)")
    run.add_argument("--variance-checks", type=int, default=3,
                     help="independent large-sample checks of V/V_sgd during each VCAS run (default 3)")
    run.add_argument("--check-target", type=float, default=0.25,
                     help="relative standard error each check stops at (default 0.25)")
    run.add_argument("--check-max-pairs", type=int, default=24,
                     help="the most pairs of batches per check (default 24)")
    run.add_argument("--no-flop-checks", action="store_true",
                     help="do not count the FLOPs of the checked steps independently")
    run.add_argument("--evaluations", type=int, default=5, help="evaluations during each run (default 5)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace --out if vcas created it (a folder vcas did not create is never deleted)")
    output.add_argument("--logdir", help="also write TensorBoard logs here (needs the tensorboard package)")
    output.add_argument("--no-progress", action="store_true")

    add_config_arguments(parser.add_argument_group("VCAS (VCASConfig fields)"))


# --------------------------------------------------------------------- VCASConfig flags
def config_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(VCASConfig) if f.name not in _NOT_FLAGS]


def add_config_arguments(group: Any) -> None:
    """A flag per VCASConfig field, typed and documented from the dataclass."""
    helps = _field_help()
    hints = typing.get_type_hints(VCASConfig)
    for field in config_fields():
        kind = _flag_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        text = f"{helps.get(field.name, '')} (default {default!r})".strip()
        if field.name == "controller":
            group.add_argument(flag, choices=("auto", "adaptive", "paper"), default=None, help=text)
        else:
            group.add_argument(flag, type=kind, default=None, help=text)
    group.add_argument("--tau", type=float, help="shorthand for --tau-act and --tau-w together")


def _flag_type(hint: Any) -> Callable[[str], Any]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return base if base in (int, float, str) else str


def _field_help() -> dict[str, str]:
    """The first sentence of each field's entry in VCASConfig's docstring."""
    doc = VCASConfig.__doc__ or ""
    entries = re.findall(r"^\s{8}(\w+): (.*?)(?=^\s{8}\w+: |\Z)", doc, flags=re.M | re.S)
    return {name: " ".join(text.split()).split(". ")[0].rstrip(".") for name, text in entries}


def config_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name, None) is not None}
    if getattr(args, "tau", None) is not None:
        options.setdefault("tau_act", args.tau)
        options.setdefault("tau_w", args.tau)
    return options


# --------------------------------------------------------------------- validation
@dataclasses.dataclass
class CompareOptions:
    methods: list[str]
    out: Path
    seeds: list[int]
    device: str


def _positive(args: argparse.Namespace, name: str, kind: type = int, allow_zero: bool = False) -> None:
    value = getattr(args, name)
    if value is None:
        return
    bad = value < 0 if allow_zero else value <= 0
    if bad or (kind is float and not math.isfinite(value)):
        flag = "--" + name.replace("_", "-")
        raise tasks.TaskError(f"{flag} {value!r}: it must be {'at least 0' if allow_zero else 'positive'}")


def validate(args: argparse.Namespace) -> CompareOptions:
    """Every input problem, found before any model is loaded or trained."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise tasks.TaskError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    for name in ("steps", "batch_size", "max_length", "train_limit", "eval_limit", "evaluations",
                 "check_max_pairs", "adaptive_update_every"):
        _positive(args, name)
    for name in ("epochs", "lr"):
        _positive(args, name, float)
    _positive(args, "variance_checks", allow_zero=True)
    if args.check_max_pairs is not None and args.check_max_pairs < 2:
        raise tasks.TaskError(f"--check-max-pairs {args.check_max_pairs}: a check needs at least 2 pairs "
                              "of batches (the default 24)")
    if not 0 < args.baseline_keep <= 1:
        raise tasks.TaskError(f"--baseline-keep {args.baseline_keep}: it must be in (0, 1]")
    if not 0 < args.check_target <= 1:
        raise tasks.TaskError(f"--check-target {args.check_target}: it must be in (0, 1]")
    if args.steps is not None and args.epochs is not None:
        raise tasks.TaskError("give --steps or --epochs, not both")
    if args.model is None:
        if args.train or args.eval or args.dataset:
            raise tasks.TaskError("--train, --eval and --dataset go with --model")
        tasks.check_task_name(args.task)
    elif not ((args.train and args.eval) or args.dataset):
        raise tasks.TaskError("--model needs --train FILE and --eval FILE, or --dataset NAME")
    try:
        seeds = [int(s) for s in str(args.seeds).split(",")]
    except ValueError:
        raise tasks.TaskError(f"--seeds {args.seeds!r}: give integers such as 0,1,2") from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise tasks.TaskError(f"--seeds {args.seeds!r}: give distinct non-negative integers")
    device = _device(args.device)
    VCASConfig(**config_options(args))  # validates, with the field and the range in the message
    out = Path(args.out)
    check_output(out, args.overwrite)
    if args.logdir and not _has_tensorboard():
        raise tasks.TaskError("--logdir needs the tensorboard package: pip install tensorboard")
    return CompareOptions(methods, out, seeds, device)


def _device(name: str) -> str:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise tasks.TaskError(f"--device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise tasks.TaskError(f"--device {name}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise tasks.TaskError(f"--device {name!r}: use cpu, cuda or cuda:N")
    return str(device)


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def check_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise tasks.TaskError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not (out / MARKER).exists():
        raise tasks.TaskError(f"--out {out} holds files vcas did not write; choose another folder "
                              "(--overwrite only replaces folders vcas created)")
    if not overwrite:
        raise tasks.TaskError(f"--out {out} exists; pass --overwrite to replace it")


def prepare_output(out: Path) -> None:
    if out.exists() and (out / MARKER).exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by vcas compare; --overwrite may replace this folder\n")


# --------------------------------------------------------------------- running
def load_task(args: argparse.Namespace) -> tasks.Task:
    if args.model is not None and args.dataset:
        task = tasks.hub_dataset(args.model, args.dataset, args.text_column, args.label_column,
                                 args.max_length, args.train_split, args.eval_split)
    elif args.model is not None:
        task = tasks.text_files(args.model, args.train, args.eval, args.text_column, args.label_column,
                                args.max_length)
    else:
        task = tasks.builtin_task(args.task, max_length=args.max_length)
    return task.limited(args.train_limit)


def settings_for(task: tasks.Task, args: argparse.Namespace, seed: int, device: str) -> RunSettings:
    batch_size = args.batch_size or task.batch_size
    per_epoch = task.train_size // batch_size
    if per_epoch < 1:
        raise tasks.TaskError(f"the training set ({task.train_size} items) holds no full batch of {batch_size}")
    steps = args.steps or max(1, math.ceil((args.epochs or task.epochs) * per_epoch))
    return RunSettings(steps=steps, batch_size=batch_size, lr=args.lr or task.lr, seed=seed,
                       vcas=VCASConfig(seed=seed, **config_options(args)),
                       adaptive_update_every=args.adaptive_update_every, baseline_keep=args.baseline_keep,
                       variance_checks=args.variance_checks, check_target=args.check_target,
                       check_max_pairs=args.check_max_pairs, flop_checks=not args.no_flop_checks,
                       evaluations=args.evaluations, eval_limit=args.eval_limit, device=device, bf16=args.bf16)


def progress_bars(total: int, disabled: bool) -> Callable[[Run], Callable[[int, float], None] | None]:
    """Per run, a tqdm bar (plain lines every 10 % without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None

    def make(run: Run) -> Callable[[int, float], None] | None:
        label = f"{run.method} seed {run.settings.seed}"
        if disabled:
            return None
        if tqdm is not None:
            bar = tqdm(total=total, desc=label, leave=True)

            def tick(step: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if step == total:
                    bar.close()
            return tick

        def line(step: int, loss: float) -> None:
            if step == total or step % max(1, total // 10) == 0:
                print(f"{label}: step {step}/{total} loss {loss:.4f}", file=sys.stderr, flush=True)
        return line

    return make


def compare(args: argparse.Namespace) -> dict[str, Any]:
    options = validate(args)
    measured_on = report.environment()  # the code as it was when training started
    task = load_task(args)
    settings = [settings_for(task, args, seed, options.device) for seed in options.seeds]
    prepare_output(options.out)
    results = []
    for seed_settings in settings:
        progress = progress_bars(seed_settings.steps, args.no_progress)
        runner = run_in_lockstep if args.lockstep else run_sequentially
        results += runner(task, options.methods, seed_settings, progress)
    summary = report.write_report(options.out, task, settings[0], results, vars(args), args.lockstep,
                                 measured_on)
    if args.logdir:
        report.write_tensorboard(Path(args.logdir), results, task.kind.metric)
    print(report.summary_table(summary))
    print(f"\nreport: {options.out / 'report.md'}; per-step log: {options.out / 'steps.csv'}")
    return summary


def run(args: argparse.Namespace) -> int:
    try:
        compare(args)
    except (tasks.TaskError, ConfigError) as error:
        print(f"vcas compare: error: {error}", file=sys.stderr)
        return 2
    return 0
