"""One row per `vcas compare` report: the README's results table.

    python3 benchmarks/results_table.py results/demo results/compare-mnist-vit ...

Per report (the ``vcas`` method against ``exact``, means over seeds): training FLOPs saved by
sampling alone and in all, backward FLOPs saved by sampling, the time ratio to exact (lockstep
runs only), final training loss and the task's metric against exact's, the independent variance
checks (mean and largest of all checks, against tau) and the FLOPs checks (accounted / counted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _checks(runs: list[dict], key: str) -> str:
    values = [c[key] for r in runs for c in r.get("variance_checks", [])]
    return f"{sum(values) / len(values):.4f} ({max(values):.4f})" if values else "-"


def row(report: dict) -> str:
    vcas = report["methods"]["vcas"]
    exact = report["methods"]["exact"]
    runs = [r for r in report["runs"] if r["method"] == "vcas"]
    flop_checks = [c["ratio"] for r in runs for c in r.get("flop_checks", []) if "ratio" in c]
    flops = f"{min(flop_checks):.3f}-{max(flop_checks):.3f}" if flop_checks else "-"
    time = f"{vcas['time_ratio']:.3f}x" if report["lockstep"] and "time_ratio" in vcas else "-"
    metric = report["metric"]
    return (f"| {report['task']} | {len(runs)} | {report['settings']['steps']} "
            f"| **{vcas['sampling_train_flops_reduction']:.1%}** ({vcas['train_flops_reduction']:.1%}) "
            f"| {vcas['sampling_bp_flops_reduction']:.1%} | {time} "
            f"| {vcas['final_train_loss']:.4f} ({exact['final_train_loss']:.4f}) "
            f"| {metric} {vcas['metric']:.4g} ({exact['metric']:.4g}) "
            f"| {_checks(runs, 'act_ratio')} | {_checks(runs, 'weight_ratio')} | {flops} |")


def main(folders: list[str]) -> None:
    print("| task | seeds | steps | train FLOPs saved by sampling (in all) | backward FLOPs saved by sampling "
          "| time / exact | final train loss (exact) | metric (exact) | checked V_act / V_sgd: mean (max) "
          "| checked V_w / V_sgd: mean (max) | FLOPs check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for folder in folders:
        print(row(json.loads((Path(folder) / "report.json").read_text())))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
