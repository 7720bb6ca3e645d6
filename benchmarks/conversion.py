"""How much of the FLOPs saving reached the clock, per seed, from `vcas compare` reports.

    python3 benchmarks/conversion.py results/demo results/compare-mnist-vit

For every VCAS run of each report (a run trained in lockstep with exact training on the same
batches) it prints the sampling-only reduction of training FLOPs, the time ratio to exact, the
conversion (time saved / FLOPs saved), the time-ratio target ``1 - 0.5 x FLOPs saved``, and the
final train loss, the held-out loss and the metric against exact's; then, per task and method
(pooling the reports of one task with the same settings, e.g. seeds run apart), the median
conversion over seeds and the quality over seeds: the mean losses against exact's (the target: at
most 10 % above) and, for accuracy, the mean accuracy against exact's (at most 1 point below).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows(report: dict) -> list[dict]:
    exact = {r["seed"]: r for r in report["runs"] if r["method"] == "exact"}
    found = []
    for run in report["runs"]:
        if not run["method"].startswith("vcas") or run["seed"] not in exact or "time_ratio" not in run:
            continue
        base = exact[run["seed"]]
        saved = run["sampling_train_flops_reduction"]
        found.append({
            "method": run["method"], "seed": run["seed"], "saved": saved, "total": run["train_flops_reduction"],
            "time_ratio": run["time_ratio"], "conversion": (1 - run["time_ratio"]) / saved if saved > 0 else None,
            "target": 1 - 0.5 * saved, "loss": run["final_train_loss"], "exact_loss": base["final_train_loss"],
            "held_out": run.get("eval_eval_loss"), "exact_held_out": base.get("eval_eval_loss"),
            "metric": run["metric"], "exact_metric": base["metric"]})
    return found


# Differences of floats that print as exactly on a target count as meeting it.
ROUNDING = 1e-9


def settings_key(report: dict) -> str:
    """The report's settings without the seed: reports of one task pool only where they agree."""
    settings = dict(report.get("settings", {}))
    settings["vcas"] = {k: v for k, v in settings.get("vcas", {}).items() if k != "seed"}
    return json.dumps(settings, sort_keys=True)


def claim_seeds(claimed: dict[int, str], seeds: list[int], folder: str, label: str) -> None:
    """Note that ``seeds`` of one pool (``label``: task and method) come from ``folder``; exit if
    one of them already came from a folder given before (the same folder twice, or runs that
    overlap), so no seed counts twice in a pool's statistics."""
    repeated = sorted(seed for seed in seeds if seed in claimed)
    if repeated:
        sources = ", ".join(dict.fromkeys(claimed[seed] for seed in repeated))
        sys.exit(f"{folder}: {label} seed(s) {repeated} already come from {sources}; give each seed once")
    claimed.update(dict.fromkeys(seeds, folder))


def _pair(value: float | None, exact: float | None) -> str:
    return "-" if value is None or exact is None else f"{value:.4f} ({exact:.4f})"


def quality(found: list[dict], metric: str) -> str:
    """The runs' mean losses and metric against exact's, each against its target (losses at most
    10 % above exact's, accuracy at most 1 point below)."""
    def change(key: str) -> str:
        pairs = [(r[key], r[f"exact_{key}"]) for r in found if r[key] is not None and r[f"exact_{key}"] is not None]
        if not pairs:
            return "-"
        mine, exact = (statistics.fmean(side) for side in zip(*pairs))
        relative = mine / exact - 1
        return f"{relative:+.1%} ({'met' if relative <= 0.10 + ROUNDING else 'not met'}: at most +10 %)"

    parts = [f"final train loss {change('loss')}", f"held-out loss {change('held_out')}"]
    gap = statistics.fmean(r["metric"] for r in found) - statistics.fmean(r["exact_metric"] for r in found)
    if metric == "accuracy":
        parts.append(f"accuracy {100 * gap:+.2f} points ({'met' if gap >= -0.01 - ROUNDING else 'not met'}"
                     ": at least -1 point)")
    else:
        parts.append(f"{metric} {gap:+.4g}")
    return f"against exact, means over {len(found)} seeds (point estimates): " + ", ".join(parts)


def main(folders: list[str]) -> None:
    print("| task | method | seed | train FLOPs saved by sampling (total) | time / exact | conversion "
          "| target time ratio | met | final train loss (exact) | held-out loss (exact) | metric (exact) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    # The runs of one task and method from reports with the same settings pool; a seed twice
    # (the same folder given twice, or overlapping runs) is refused.
    pools: dict[tuple[str, str, str], tuple[str, list[str], list[dict]]] = {}
    claimed: dict[tuple[str, str, str], dict[int, str]] = {}  # where each pooled seed came from
    for folder in folders:
        report = json.loads((Path(folder) / "report.json").read_text())
        if not report.get("lockstep"):
            print(f"{folder}: not a lockstep run; its times are not comparable", file=sys.stderr)
        found = rows(report)
        for r in found:
            print_row(report["task"], r)
        for method in dict.fromkeys(r["method"] for r in found):
            key = (report["task"], method, settings_key(report))
            metric, sources, pooled = pools.setdefault(key, (report["metric"], [], []))
            runs = [r for r in found if r["method"] == method]
            claim_seeds(claimed.setdefault(key, {}), [r["seed"] for r in runs], folder,
                        f"{report['task']} {method}")
            sources.append(folder)
            pooled.extend(runs)
    print()
    labels = [(task, method) for task, method, _ in pools]
    for (task, method, _), (metric, sources, found) in pools.items():
        conversions = [r["conversion"] for r in found if r["conversion"] is not None]
        if not conversions:
            continue
        label = f"{task} {method}" if method != "vcas" else task
        if labels.count((task, method)) > 1:  # the same task with other settings elsewhere
            label += f" ({', '.join(sources)})"
        print(f"{label}: median conversion {statistics.median(conversions):.2f} "
              f"over {len(conversions)} run(s); {quality(found, metric)}")


def print_row(task: str, r: dict) -> None:
    conversion = "-" if r["conversion"] is None else f"{r['conversion']:.2f}"
    print(f"| {task} | {r['method']} | {r['seed']} | {r['saved']:.1%} ({r['total']:.1%}) "
          f"| {r['time_ratio']:.3f} | {conversion} | {r['target']:.3f} "
          f"| {'yes' if r['time_ratio'] <= r['target'] else 'no'} "
          f"| {r['loss']:.4f} ({r['exact_loss']:.4f}) | {_pair(r['held_out'], r['exact_held_out'])} "
          f"| {r['metric']:.4f} ({r['exact_metric']:.4f}) |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
