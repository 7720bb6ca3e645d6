"""Reports of ``vcas compare``: report.json, report.md, PNG plots and a one-screen summary."""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
from pathlib import Path
from typing import Any, Callable, Iterator

from .tasks import Task
from .train import RunResult, RunSettings

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def progress_bar(total: int, label: str, disabled: bool = False) -> Iterator[Callable[[int, float], None]]:
    """A tqdm bar (plain lines every 10 % without tqdm) that the training loop ticks."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=label, disable=disabled, leave=True)
        with bar:
            yield lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}", refresh=False))
        return

    def tick(step: int, loss: float) -> None:
        if not disabled and (step == total or step % max(1, total // 10) == 0):
            print(f"{label}: step {step}/{total} loss {loss:.4f}", flush=True)

    yield tick


def _run_record(seed: int, run: RunResult, exact: RunResult | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "method": run.method, "seed": seed, "steps": len(run.losses),
        "final_train_loss": run.final_train_loss(), "eval_accuracy": run.eval_accuracy,
        "train_seconds": run.train_seconds,
        "bp_flops_reduction": run.stats.get("bp_flops_reduction", 0.0),
        "train_flops_reduction": run.stats.get("train_flops_reduction", 0.0),
    }
    if exact is not None and exact.train_seconds > 0:
        record["time_reduction"] = 1 - run.train_seconds / exact.train_seconds
    if exact is not None and exact.exact_step_flops and run.stats:
        counted = run.cumulative_flops and run.stats.get("flops_scope") == "model"
        if counted:
            # Exact-training FLOPs as this run's accounting sees them vs torch.utils.flop_counter.
            record["flop_counter_check"] = run.stats["exact_training_flops"] / (
                exact.exact_step_flops * len(run.losses))
    if run.variance_checks:
        record["variance_checks"] = run.variance_checks
        record["checked_act_ratio"] = statistics.fmean(c["act_ratio"] for c in run.variance_checks)
        record["checked_weight_ratio"] = statistics.fmean(c["weight_ratio"] for c in run.variance_checks)
    if run.method.startswith("vcas"):
        record.update(s=run.stats["s"], act_ratios=run.stats["act_ratios"],
                      weight_ratios=run.stats["weight_ratios"], updates=run.stats["updates"],
                      skipped_updates=run.stats["skipped_updates"],
                      controller=run.stats["controller"], update_every=run.stats["update_every"])
    return record


def _aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["final_train_loss", "eval_accuracy", "bp_flops_reduction", "train_flops_reduction",
            "train_seconds", "time_reduction", "flop_counter_check", "checked_act_ratio",
            "checked_weight_ratio"]
    out: dict[str, Any] = {"seeds": [r["seed"] for r in records]}
    for key in keys:
        values = [r[key] for r in records if key in r]
        if values:
            out[key] = statistics.fmean(values)
            out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def write_report(out: Path, task: Task, settings: RunSettings, runs: list[tuple[int, RunResult]],
                 arguments: dict[str, Any]) -> dict[str, Any]:
    exact_by_seed = {seed: run for seed, run in runs if run.method == "exact"}
    records = [_run_record(seed, run, exact_by_seed.get(seed)) for seed, run in runs]
    methods = list(dict.fromkeys(r["method"] for r in records))
    summary = {
        "task": task.name, "description": task.description,
        "settings": {"steps": settings.steps, "batch_size": settings.batch_size, "lr": settings.lr,
                     "vcas": settings.vcas.to_dict(), "baseline_keep": settings.baseline_keep},
        "arguments": {k: v for k, v in arguments.items() if k not in ("module", "func")},
        "methods": {m: _aggregate([r for r in records if r["method"] == m]) for m in methods},
        "runs": records,
        "curves": {f"{run.method}/seed{seed}": {"loss": run.losses, "flops": run.cumulative_flops,
                                                "history": run.history} for seed, run in runs},
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=float))
    plots = _plots(out, runs, settings)
    (out / "report.md").write_text(_markdown(summary, plots))
    return summary


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f} %"
    if kind == "acc":
        return f"{value:.3f}"
    if kind == "s":
        return f"{value:.0f} s"
    return f"{value:.4f}"


COLUMNS = [("final_train_loss", "final train loss", "f"), ("eval_accuracy", "eval acc", "acc"),
           ("bp_flops_reduction", "BP FLOPs red.", "pct"),
           ("train_flops_reduction", "train FLOPs red.", "pct"),
           ("train_seconds", "time", "s"), ("time_reduction", "time red.", "pct")]


def summary_table(summary: dict[str, Any]) -> str:
    """The one-screen table: one row per method, means over seeds."""
    header = ["method"] + [title for _, title, _ in COLUMNS]
    rows = [[method] + [_fmt(stats.get(key), kind) for key, _, kind in COLUMNS]
            for method, stats in summary["methods"].items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    seeds = len(next(iter(summary["methods"].values()))["seeds"])
    title = f"{summary['task']}: {summary['settings']['steps']} steps, {seeds} seed(s)"
    return "\n".join([title, line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _markdown(summary: dict[str, Any], plots: list[str]) -> str:
    header = "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [f"# vcas compare: {summary['task']}", "", summary["description"], "",
             f"Settings: {json.dumps(summary['settings'])}", "", header,
             "|" + "---|" * (len(COLUMNS) + 1)]
    for method, stats in summary["methods"].items():
        lines.append(f"| {method} | " + " | ".join(_fmt(stats.get(k), kind) for k, _, kind in COLUMNS) + " |")
    lines += ["", "Means over seeds; BP FLOPs reduction counts training backward passes; train "
              "FLOPs reduction counts everything, VCAS calibration included, from the rows really "
              "kept (work outside the sampled layers counted as exact).", ""]
    vcas_runs = [r for r in summary["runs"] if r["method"].startswith("vcas")]
    for run in vcas_runs:
        lines.append(f"{run['method']} seed {run['seed']} ({run['controller']} controller, F = "
                     f"{run['update_every']}): s = {run['s']:.3f}, updates {run['updates']}, "
                     f"act ratios {[round(x, 3) for x in run['act_ratios']]}, mean weight ratio "
                     f"{statistics.fmean(run['weight_ratios']):.3f}")
    for run in summary["runs"]:
        for check in run.get("variance_checks", []):
            lines.append(f"{run['method']} seed {run['seed']} step {check['step']}: large-sample check "
                         f"({check['batches']} batches x {check['draws']} draws) V_act / V_sgd = "
                         f"{check['act_ratio']:.4f}, V_w / V_sgd = {check['weight_ratio']:.4f}")
    checks = [r["flop_counter_check"] for r in summary["runs"] if "flop_counter_check" in r]
    if checks:
        lines += ["", f"FLOPs accounting vs torch.utils.flop_counter (exact-training FLOPs ratio): "
                  f"{', '.join(f'{c:.4f}' for c in checks)}"]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _plots(out: Path, runs: list[tuple[int, RunResult]], settings: RunSettings) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    first_seed = runs[0][0]
    shown = [run for seed, run in runs if seed == first_seed]
    window = max(1, settings.steps // 30)
    names = []
    fig, (by_step, by_flops) = plt.subplots(1, 2, figsize=(11, 4))
    for run in shown:
        smooth = _smooth(run.losses, window)
        by_step.plot(range(1, len(smooth) + 1), smooth, label=run.method)
        if any(run.cumulative_flops):
            by_flops.plot([f / 1e12 for f in run.cumulative_flops], smooth, label=run.method)
    by_step.set(xlabel="optimizer step", ylabel=f"train loss (moving mean of {window})", yscale="log")
    by_flops.set(xlabel="training FLOPs spent (TFLOP)", ylabel="train loss", yscale="log")
    by_step.legend()
    by_flops.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    names.append("loss.png")
    for run in shown:
        if run.method.startswith("vcas") and run.history:
            names += _controller_plots(out, run, settings, plt)
    return names


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
    fig.tight_layout()
    fig.suptitle(run.method)
    fig.tight_layout()
    fig.savefig(out / f"{run.method}_ratios.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.8))
    rows = [h for h in run.history if h.get("var_sgd")]
    ax.plot([h["step"] for h in rows], [h["var_act"] / h["var_sgd"] for h in rows], "o-", ms=3,
            label="V_act / V_sgd")
    ax.plot([h["step"] for h in rows], [h["var_weight"] / h["var_sgd"] for h in rows], "s-", ms=3,
            label="V_w / V_sgd")
    ax.axhline(settings.vcas.tau_act, color="k", ls="--", label=f"tau = {settings.vcas.tau_act}")
    ax.set(xlabel="step", ylabel="variance ratio (measured at calibration)", yscale="symlog")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend()
    fig.tight_layout()
    ax.set_title(run.method)
    fig.savefig(out / f"{run.method}_variance.png", dpi=110)
    plt.close(fig)
    return [f"{run.method}_ratios.png", f"{run.method}_variance.png"]
