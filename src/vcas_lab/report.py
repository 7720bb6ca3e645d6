"""What a comparison writes: report.json, report.md, steps.csv, PNG plots, a one-screen table,
and optionally TensorBoard logs.

FLOPs reductions come in two kinds (vcas.accounting): ``sampling`` ones, against exact training
that also skips rows whose gradient is exactly zero (what sampling alone saved), shown first,
and ``total`` ones against stock PyTorch. Across seeds, every number is a mean with its spread;
against exact training, loss and metric differences are paired by seed with a 95 % t-interval.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .tasks import Task
from .train import DESCRIPTIONS, RunResult, RunSettings

logger = logging.getLogger(__name__)

# Two-sided 95 % points of Student's t by degrees of freedom (1.96 beyond 30).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: int) -> float:
    if df <= 0:
        return math.inf
    return _T95.get(df) or (_T95[max(k for k in _T95 if k <= df)] if df <= 30 else 1.96)


# --------------------------------------------------------------------- records
def run_record(run: RunResult, exact: RunResult | None, metric: str) -> dict[str, Any]:
    stats = run.stats
    record: dict[str, Any] = {
        "method": run.method, "seed": run.seed, "steps": len(run.steps),
        "final_train_loss": run.final_train_loss(), "last_train_loss": run.losses[-1],
        "metric": run.evaluation.get(metric), **{f"eval_{k}": v for k, v in run.evaluation.items()},
        "train_seconds": run.train_seconds,
        "sampling_bp_flops_reduction": stats.get("sampling_bp_flops_reduction", 0.0),
        "sampling_train_flops_reduction": stats.get("sampling_train_flops_reduction", 0.0),
        "bp_flops_reduction": stats.get("bp_flops_reduction", 0.0),
        "train_flops_reduction": stats.get("train_flops_reduction", 0.0),
    }
    if exact is not None and exact is not run and exact.train_seconds > 0:
        record["time_ratio"] = run.train_seconds / exact.train_seconds
    record["phase_seconds"] = phase_seconds(run)
    if run.flop_checks:
        record["flop_checks"] = run.flop_checks
        ratios = [c["ratio"] for c in run.flop_checks if "ratio" in c]
        if ratios:
            record["flop_check_ratio"] = statistics.fmean(ratios)
        if exact is not None and exact.flop_checks and stats.get("steps"):
            counted_exact = statistics.fmean(c["counted"] for c in exact.flop_checks)
            record["exact_reference_check"] = stats["exact_training_flops"] / stats["steps"] / counted_exact
    if run.variance_checks:
        record["variance_checks"] = run.variance_checks
        for kind in ("act", "weight"):
            values = [c[f"{kind}_ratio"] for c in run.variance_checks]
            record[f"checked_{kind}_ratio_mean"] = statistics.fmean(values)
            record[f"checked_{kind}_ratio_max"] = max(values)
    if stats:
        record.update(controller=stats["controller"], update_every=stats["update_every"], s=stats["s"],
                      act_ratios=stats["act_ratios"], weight_ratios=stats["weight_ratios"],
                      updates=stats["updates"], skipped_updates=stats["skipped_updates"],
                      compact_backwards=stats["compact_backwards"])
    return record


PHASES = ("forward", "backward", "calibration backward", "optimizer", "controller")


def phase_seconds(run: RunResult) -> dict[str, float]:
    """Training time per phase: forward, backward (of calibration steps apart), optimizer,
    controller (``maybe_calibrate``); steps whose FLOPs were counted are left out."""
    totals = dict.fromkeys(PHASES, 0.0)
    for log in run.steps:
        for phase, seconds in log.phases.items():
            key = "calibration backward" if phase == "backward" and log.calibrating else phase
            totals[key] += seconds
    return totals


SUMMARY_KEYS = ["final_train_loss", "metric", "sampling_bp_flops_reduction", "sampling_train_flops_reduction",
                "bp_flops_reduction", "train_flops_reduction", "train_seconds", "time_ratio",
                "checked_act_ratio_mean", "checked_act_ratio_max", "checked_weight_ratio_mean",
                "checked_weight_ratio_max", "flop_check_ratio"]


def aggregate(records: list[dict[str, Any]], exact: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Means and spreads over seeds, and paired differences against exact training."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in records]}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            out[key] = statistics.fmean(values)
            out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    for key in ("final_train_loss", "metric"):
        pairs = [(r[key], exact[r["seed"]][key]) for r in records
                 if r["seed"] in exact and r.get(key) is not None and exact[r["seed"]].get(key) is not None]
        if pairs and records[0]["method"] != "exact":
            differences = [a - b for a, b in pairs]
            mean = statistics.fmean(differences)
            half = t95(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences)) \
                if len(differences) > 1 else None  # one seed: no interval
            out[f"{key}_difference"] = {"mean": mean, "low": None if half is None else mean - half,
                                        "high": None if half is None else mean + half,
                                        "seeds": len(differences),
                                        "relative": mean / statistics.fmean(b for _, b in pairs)
                                        if any(b for _, b in pairs) else None}
    return out


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "machine": platform.machine(),
                            "processor": platform.processor() or platform.machine(),
                            "threads": torch.get_num_threads(),
                            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                            "command": " ".join(sys.argv)}
    for package in ("vcas", "transformers", "peft", "accelerate", "lightning"):
        try:
            info[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            info[package] = None
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                  cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, timeout=10)
        info["git_revision"] = (revision.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")) \
            if revision.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        info["git_revision"] = None
    return info


def write_report(out: Path, task: Task, settings: RunSettings, runs: list[RunResult],
                 arguments: dict[str, Any], lockstep: bool,
                 measured_on: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write report.json, steps.csv, the plots and report.md; ``measured_on`` is the
    :func:`environment` taken when training started (now, if not given)."""
    metric = task.kind.metric
    exact_runs = {run.seed: run for run in runs if run.method == "exact"}
    records = [run_record(run, exact_runs.get(run.seed), metric) for run in runs]
    exact_records = {r["seed"]: r for r in records if r["method"] == "exact"}
    methods = list(dict.fromkeys(r["method"] for r in records))
    summary = {
        "task": task.name, "description": task.description, "metric": metric,
        "higher_is_better": task.kind.higher_is_better, "lockstep": lockstep,
        "settings": {"steps": settings.steps, "batch_size": settings.batch_size, "lr": settings.lr,
                     "vcas": settings.vcas.to_dict(), "baseline_keep": settings.baseline_keep,
                     "device": settings.device, "bf16": settings.bf16,
                     "variance_checks": settings.variance_checks, "check_target": settings.check_target},
        "environment": measured_on or environment(),
        "arguments": {k: v for k, v in arguments.items() if k not in ("module", "func")},
        "methods": {m: aggregate([r for r in records if r["method"] == m], exact_records) for m in methods},
        "runs": records,
        "curves": {f"{run.method}/seed{run.seed}": {"steps": [vars(log) for log in run.steps],
                                                     "eval": run.eval_curve, "history": run.history}
                   for run in runs},
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    write_step_log(out / "steps.csv", runs)
    plots = write_plots(out, runs, settings, task)
    (out / "report.md").write_text(markdown(summary, plots))
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return float(value)


def write_step_log(path: Path, runs: list[RunResult]) -> None:
    """One row per method, seed and step: wall-clock, loss, FLOPs, ratios."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "seed", "step", "seconds", "loss", "flops", "s", "act_ratio",
                         "weight_ratio", "calibrating", *(f"{p}_seconds" for p in ("forward", "backward",
                                                                                   "optimizer", "controller"))])
        for run in runs:
            for log in run.steps:
                writer.writerow([run.method, run.seed, log.step, f"{log.seconds:.4f}", f"{log.loss:.6f}",
                                 f"{log.flops:.6g}", _maybe(log.s), _maybe(log.act_ratio),
                                 _maybe(log.weight_ratio), int(log.calibrating),
                                 *(_maybe(log.phases.get(p)) for p in ("forward", "backward", "optimizer",
                                                                      "controller"))])


def _maybe(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def write_tensorboard(logdir: Path, runs: list[RunResult], metric: str) -> None:
    """Per run, the step log and the evaluations as TensorBoard scalars."""
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    for run in runs:
        writer = SummaryWriter(str(logdir / f"{run.method}-seed{run.seed}"))
        try:
            for log in run.steps:
                writer.add_scalar("train/loss", log.loss, log.step)
                writer.add_scalar("train/seconds", log.seconds, log.step)
                if log.flops:
                    writer.add_scalar("train/flops", log.flops, log.step)
                for name in ("s", "act_ratio", "weight_ratio"):
                    if getattr(log, name) is not None:
                        writer.add_scalar(f"vcas/{name}", getattr(log, name), log.step)
            for point in run.eval_curve:
                writer.add_scalar(f"eval/{metric}", point[metric], point["step"])
            for check in run.variance_checks:
                writer.add_scalar("vcas/checked_act_ratio", check["act_ratio"], check["step"])
                writer.add_scalar("vcas/checked_weight_ratio", check["weight_ratio"], check["step"])
        finally:
            writer.close()


# --------------------------------------------------------------------- text
def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f} %"
    if kind == "s":
        return f"{value:.0f} s"
    if kind == "x":
        return f"{value:.3f}x"
    if kind == "ratio":
        return f"{value:.4f}"
    return f"{value:.4f}"


def columns(metric: str) -> list[tuple[str, str, str]]:
    return [("final_train_loss", "final train loss", "f"), ("metric", metric, "f"),
            ("sampling_train_flops_reduction", "train FLOPs saved by sampling", "pct"),
            ("train_flops_reduction", "train FLOPs saved in all", "pct"),
            ("sampling_bp_flops_reduction", "BP FLOPs saved by sampling", "pct"),
            ("train_seconds", "time", "s"), ("time_ratio", "time / exact", "x")]


def _cell(stats: dict[str, Any], key: str, kind: str) -> str:
    text = _fmt(stats.get(key), kind)
    spread = stats.get(key + "_std")
    if spread and len(stats.get("seeds", [])) > 1 and kind in ("f", "pct"):
        text += f" ± {_fmt(spread, kind)}"
    return text


def summary_table(summary: dict[str, Any]) -> str:
    """The one-screen table: one row per method, means (± standard deviations) over seeds."""
    cols = columns(summary["metric"])
    header = ["method"] + [title for _, title, _ in cols]
    rows = [[method] + [_cell(stats, key, kind) for key, _, kind in cols]
            for method, stats in summary["methods"].items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    seeds = len(next(iter(summary["methods"].values()))["seeds"])
    mode = "lockstep" if summary["lockstep"] else "one method after the other"
    title = f"{summary['task']}: {summary['settings']['steps']} steps, {seeds} seed(s), {mode}"
    lines = [title, line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    lines += differences(summary)
    return "\n".join(lines)


def differences(summary: dict[str, Any]) -> list[str]:
    """Paired differences against exact training, with their 95 % intervals."""
    lines = []
    for method, stats in summary["methods"].items():
        for key, label in (("final_train_loss", "final train loss"), ("metric", summary["metric"])):
            d = stats.get(f"{key}_difference")
            if d is None:
                continue
            interval = "" if d["low"] is None else f", 95 % interval [{d['low']:+.4f}, {d['high']:+.4f}]"
            relative = f" ({100 * d['relative']:+.1f} %)" if d.get("relative") is not None else ""
            lines.append(f"{method} - exact, {label}: {d['mean']:+.4f}{relative}{interval} over {d['seeds']} seed(s)")
    return ([""] + lines) if lines else []


def phase_table(summary: dict[str, Any]) -> list[str]:
    """Seconds per phase, summed over seeds, each method against exact training."""
    totals: dict[str, dict[str, float]] = {}
    for run in summary["runs"]:
        method = totals.setdefault(run["method"], dict.fromkeys(PHASES, 0.0))
        for phase, seconds in run["phase_seconds"].items():
            method[phase] += seconds
    exact = totals.get("exact")
    lines = ["| phase | " + " | ".join(totals) + " |", "|---|" + "---|" * len(totals)]
    for phase in PHASES:
        cells = []
        for method, values in totals.items():
            cell = f"{values[phase]:.1f} s"
            if exact is not None and method != "exact" and exact[phase] > 0:
                cell += f" ({values[phase] / exact[phase]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return ["Time per phase (summed over seeds; steps whose FLOPs were counted left out):", ""] + lines


def markdown(summary: dict[str, Any], plots: list[str]) -> str:
    cols = columns(summary["metric"])
    header = "| method | " + " | ".join(title for _, title, _ in cols) + " |"
    lines = [f"# vcas compare: {summary['task']}", "", summary["description"], "",
             f"Settings: {json.dumps(summary['settings'])}", "",
             f"Measured on: {summary['environment']['processor']}, torch {summary['environment']['torch']}, "
             f"{summary['environment']['threads']} threads, revision {summary['environment']['git_revision']}; "
             f"{'lockstep' if summary['lockstep'] else 'methods one after the other'}.", "",
             header, "|" + "---|" * (len(cols) + 1)]
    for method, stats in summary["methods"].items():
        lines.append(f"| {method} | " + " | ".join(_cell(stats, k, kind) for k, _, kind in cols) + " |")
    lines += differences(summary)
    lines += [""] + phase_table(summary)
    lines += ["", "Methods: " + "; ".join(f"`{m}`: {DESCRIPTIONS[m]}" for m in summary["methods"]), "",
              "Final train loss: the mean over the last 5 % of steps. FLOPs saved by sampling: against "
              "exact training that skips rows whose gradient is exactly zero; in all: against stock "
              "PyTorch. Train FLOPs include VCAS's calibration work. Means (± standard deviations) "
              "over seeds.", ""]
    lines += _check_lines(summary)
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _check_lines(summary: dict[str, Any]) -> list[str]:
    tau = summary["settings"]["vcas"]["tau_act"]
    lines = []
    for run in summary["runs"]:
        if run["method"].startswith("vcas") and "controller" in run:
            lines.append(f"{run['method']} seed {run['seed']} ({run['controller']} controller, F = "
                         f"{run['update_every']}): s = {run['s']:.3f}, {run['updates']} updates, act ratios "
                         f"{[round(x, 3) for x in run['act_ratios']]}, mean weight ratio "
                         f"{statistics.fmean(run['weight_ratios']) if run['weight_ratios'] else 1.0:.3f}")
        for check in run.get("variance_checks", []):
            lines.append(
                f"{run['method']} seed {run['seed']} step {check['step']}: independent check "
                f"({check['batches']} batches, {check['draws']} + {check['draws']} draws each) V_act / V_sgd = "
                f"{check['act_ratio']:.4f} ± {check['act_ratio_stderr']:.4f}, V_w / V_sgd = "
                f"{check['weight_ratio']:.4f} ± {check['weight_ratio_stderr']:.4f} (tau {tau})")
    flops = [(r["method"], r["seed"], r["flop_check_ratio"]) for r in summary["runs"] if "flop_check_ratio" in r]
    if flops:
        lines += ["", "FLOPs accounted / counted independently on real training steps (compact recompute "
                  "and calibration included): " + ", ".join(f"{m} seed {s}: {v:.6f}" for m, s, v in flops)]
    references = [(r["method"], r["seed"], r["exact_reference_check"]) for r in summary["runs"]
                  if "exact_reference_check" in r]
    if references:
        lines.append("Exact-training reference per step / counted exact step: " +
                     ", ".join(f"{m} seed {s}: {v:.6f}" for m, s, v in references))
    return lines


# --------------------------------------------------------------------- plots
def write_plots(out: Path, runs: list[RunResult], settings: RunSettings, task: Task) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    first_seed = runs[0].seed
    shown = [run for run in runs if run.seed == first_seed]
    names = [_loss_plots(out, shown, settings, task, plt)]
    for run in shown:
        if run.method.startswith("vcas") and run.history:
            names += _controller_plots(out, run, settings, plt)
    return names


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _loss_plots(out: Path, runs: list[RunResult], settings: RunSettings, task: Task, plt: Any) -> str:
    window = max(1, settings.steps // 30)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (by_step, by_flops), (by_time, by_eval) = axes
    for run in runs:
        smooth = _smooth(run.losses, window)
        by_step.plot([log.step for log in run.steps], smooth, label=run.method)
        if any(log.flops for log in run.steps):
            by_flops.plot([log.flops / 1e12 for log in run.steps], smooth, label=run.method)
        by_time.plot([log.seconds for log in run.steps], smooth, label=run.method)
        if run.eval_curve:
            by_eval.plot([p["step"] for p in run.eval_curve], [p[task.kind.metric] for p in run.eval_curve],
                         "o-", ms=3, label=run.method)
    by_step.set(xlabel="optimizer step", ylabel=f"train loss (moving mean of {window})", yscale="log")
    by_flops.set(xlabel="training FLOPs spent (TFLOP)", ylabel="train loss", yscale="log")
    by_time.set(xlabel="training time (s)", ylabel="train loss", yscale="log")
    by_eval.set(xlabel="optimizer step", ylabel=f"held-out {task.kind.metric}")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    return "loss.png"


def _controller_plots(out: Path, run: RunResult, settings: RunSettings, plt: Any) -> list[str]:
    steps = [h["step"] for h in run.history]
    fig, (ax_s, ax_rho, ax_nu) = plt.subplots(1, 3, figsize=(14, 3.8))
    ax_s.plot(steps, [h["s"] for h in run.history])
    ax_s.set(title="s (kept gradient-norm share)", xlabel="step", ylim=(0, 1.02))
    for block in range(len(run.history[0]["act_ratios"])):
        ax_rho.plot(steps, [h["act_ratios"][block] for h in run.history], label=f"block {block}")
    ax_rho.set(title="rho per block (activation keep ratio)", xlabel="step", ylim=(0, 1.02))
    ax_rho.legend(fontsize=6)
    for layer in range(len(run.history[0]["weight_ratios"])):
        ax_nu.plot(steps, [h["weight_ratios"][layer] for h in run.history], lw=0.6)
    ax_nu.set(title="nu per linear layer (weight keep ratio)", xlabel="step", ylim=(0, 1.02))
    fig.suptitle(run.method)
    fig.tight_layout()
    fig.savefig(out / f"{run.method}_ratios.png", dpi=110)
    plt.close(fig)
    return [f"{run.method}_ratios.png", _variance_plot(out, run, settings, plt)]


def _variance_plot(out: Path, run: RunResult, settings: RunSettings, plt: Any) -> str:
    """What the controller keeps within tau, its per-calibration estimates, and the independent
    checks with their standard errors, on a log axis."""
    tau = settings.vcas.tau_act
    fig, ax = plt.subplots(figsize=(8, 4.2))
    controlled = [(h["step"], h["controlled_act_ratio"]) for h in run.history
                  if h.get("controlled_act_ratio") is not None and h["controlled_act_ratio"] > 0]
    if controlled:
        ax.plot(*zip(*controlled), "-", color="C0", lw=1.5, label="V_act / V_sgd the controller keeps within tau")
    estimates = [(h["step"], h["var_act"] / h["var_sgd"]) for h in run.history
                 if h.get("var_sgd") and h.get("var_act") is not None and h["var_act"] > 0]
    if estimates:
        ax.plot(*zip(*estimates), ".", color="C0", alpha=0.4, ms=4, label="V_act / V_sgd of each calibration")
    for kind, color, marker in (("act", "C1", "o"), ("weight", "C2", "s")):
        points = [c for c in run.variance_checks if c[f"{kind}_ratio"] > 0]
        if points:
            ax.errorbar([c["step"] for c in points], [c[f"{kind}_ratio"] for c in points],
                        yerr=[c[f"{kind}_ratio_stderr"] for c in points], fmt=marker, color=color,
                        capsize=3, label=f"independent check of V_{'act' if kind == 'act' else 'w'} / V_sgd (± s.e.)")
    ax.axhline(tau, color="k", ls="--", label=f"tau = {tau}")
    ax.axhline(2 * tau, color="k", ls=":", lw=0.8, label="2 tau")
    ax.set(xlabel="step", ylabel="added variance / SGD variance", yscale="log", title=run.method)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{run.method}_variance.png", dpi=110)
    plt.close(fig)
    return f"{run.method}_variance.png"
