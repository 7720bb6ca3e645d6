"""Quality against exact training, seed by seed, with the spread over seeds, from `vcas compare`
reports; the exact run of a seed may come from another report.

    python3 benchmarks/quality_spread.py results/compare-mnist-vit results/mnist-vit-null-control

For every VCAS run it prints the final train loss and the held-out loss relative to exact's on
the same seed (in %), and the metric's difference (accuracy: in points); then, per task, method
and settings (the reports that agree on them pool, as in ``conversion.py``), the mean and the
standard deviation over seeds. A run with ``--tau-act`` so small that nothing is sampled (a
negative control: the same gradient as exact's, computed by vcas's operations, so only rounding
differs) shows how far two runs of the same training drift apart: differences of that size say
nothing about sampling.

The exact run of a seed is looked up in every report given, for the same task and the same
settings apart from vcas's (``vcas compare --methods vcas`` trains no exact run of its own).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from conversion import claim_seeds, settings_key


def exact_key(report: dict, seed: int) -> str:
    """The task, the seed and the settings an exact run depends on (not vcas's)."""
    settings = {k: v for k, v in report.get("settings", {}).items() if k != "vcas"}
    return json.dumps([report["task"], seed, settings], sort_keys=True)


def exact_runs(reports: list[tuple[str, dict]]) -> dict[str, dict]:
    """Every report's exact runs by :func:`exact_key`; two that disagree are refused."""
    found: dict[str, tuple[str, dict]] = {}
    for folder, report in reports:
        for run in report["runs"]:
            if run["method"] != "exact":
                continue
            key = exact_key(report, run["seed"])
            if key in found and found[key][1]["final_train_loss"] != run["final_train_loss"]:
                sys.exit(f"{folder}: exact seed {run['seed']} ends at another train loss than in "
                         f"{found[key][0]}; exact runs of one seed must agree")
            found.setdefault(key, (folder, run))
    return {key: run for key, (_, run) in found.items()}


def differences(run: dict, exact: dict, metric: str) -> dict[str, float | None]:
    """The run against exact's: losses in % above exact's, the metric's difference (accuracy in
    points)."""
    held_out, exact_held_out = run.get("eval_eval_loss"), exact.get("eval_eval_loss")
    scale = 100.0 if metric == "accuracy" else 1.0
    return {"loss": 100 * (run["final_train_loss"] / exact["final_train_loss"] - 1),
            "held_out": None if held_out is None or exact_held_out is None else 100 * (held_out / exact_held_out - 1),
            "metric": scale * (run["metric"] - exact["metric"])}


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.2f} (one seed)"
    return f"{statistics.fmean(values):+.2f} +- {statistics.stdev(values):.2f} (sd)"


def main(folders: list[str]) -> None:
    reports = [(folder, json.loads((Path(folder) / "report.json").read_text())) for folder in folders]
    exact = exact_runs(reports)
    print("| report | task | method | seed | final train loss vs exact | held-out loss vs exact | metric vs exact |")
    print("|---|---|---|---|---|---|---|")
    pools: dict[tuple[str, str, str], tuple[str, list[str], list[dict]]] = {}
    claimed: dict[tuple[str, str, str], dict[int, str]] = {}  # where each pooled seed came from
    for folder, report in reports:
        metric = report["metric"]
        unit = "points" if metric == "accuracy" else ""
        for run in report["runs"]:
            if not run["method"].startswith("vcas"):
                continue
            base = exact.get(exact_key(report, run["seed"]))
            if base is None:
                print(f"{folder}: no exact run of seed {run['seed']} in the reports given", file=sys.stderr)
                continue
            found = differences(run, base, metric)
            held_out = "-" if found["held_out"] is None else f"{found['held_out']:+.1f} %"
            print(f"| {folder} | {report['task']} | {run['method']} | {run['seed']} | {found['loss']:+.1f} % "
                  f"| {held_out} | {found['metric']:+.2f} {unit} |")
            key = (report["task"], run["method"], settings_key(report))
            _, sources, pooled = pools.setdefault(key, (metric, [], []))
            claim_seeds(claimed.setdefault(key, {}), [run["seed"]], folder, f"{report['task']} {run['method']}")
            if folder not in sources:
                sources.append(folder)
            pooled.append(found)
    print()
    for (task, method, _), (metric, sources, pooled) in pools.items():
        spreads = [f"{label} {_spread([p[key] for p in pooled if p[key] is not None])}"
                   for key, label in (("loss", "final train loss %"), ("held_out", "held-out loss %"),
                                      ("metric", f"{metric}{' points' if metric == 'accuracy' else ''}"))]
        seeds = f"{len(pooled)} seed{'s' if len(pooled) != 1 else ''}"
        print(f"{task} {method} ({', '.join(sources)}), {seeds}, mean +- sd: " + "; ".join(spreads))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
