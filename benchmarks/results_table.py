"""One row per `vcas compare` report: the README's results table.

    python3 benchmarks/results_table.py results/demo results/compare-mnist-vit ...
    python3 benchmarks/results_table.py --methods results/compare-bbc-minilm-lora-baselines ...

Per report (the ``vcas`` method against ``exact``, means over seeds): training FLOPs saved by
sampling alone and in all, backward FLOPs saved by sampling, the time ratio to exact (lockstep
runs only), final training loss and the task's metric against exact's, the independent variance
checks (mean and largest of all checks, against tau) and the FLOPs checks (accounted / counted).
With ``--methods``: one row per method of each report (the baselines beside VCAS), with the
FLOPs saved, the final training loss and the task's metric.
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


def method_rows(report: dict) -> list[str]:
    metric = report["metric"]
    rows = []
    for name, method in report["methods"].items():
        saved = (f"**{method.get('sampling_train_flops_reduction', 0.0):.1%}** "
                 f"({method.get('train_flops_reduction', 0.0):.1%})")
        rows.append(f"| {report['task']} | {name} | {len({r['seed'] for r in report['runs'] if r['method'] == name})} "
                    f"| {report['settings']['steps']} | {saved} | {method['final_train_loss']:.4f} "
                    f"| {metric} {method['metric']:.4g} |")
    return rows


def methods_table(folders: list[str]) -> None:
    print("| task | method | seeds | steps | train FLOPs saved by sampling (in all) | final train loss | metric |")
    print("|---|---|---|---|---|---|---|")
    for folder in folders:
        for line in method_rows(json.loads((Path(folder) / "report.json").read_text())):
            print(line)


def main(folders: list[str]) -> None:
    print("| task | seeds | steps | train FLOPs saved by sampling (in all) | backward FLOPs saved by sampling "
          "| time / exact | final train loss (exact) | metric (exact) | checked V_act / V_sgd: mean (max) "
          "| checked V_w / V_sgd: mean (max) | FLOPs check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for folder in folders:
        print(row(json.loads((Path(folder) / "report.json").read_text())))


if __name__ == "__main__":
    arguments = sys.argv[1:]
    by_method = bool(arguments) and arguments[0] == "--methods"
    folders = arguments[1:] if by_method else arguments
    if not folders:
        sys.exit(__doc__)
    (methods_table if by_method else main)(folders)
