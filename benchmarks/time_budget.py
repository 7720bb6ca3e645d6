"""Where the time of a lockstep `vcas compare` run goes, from its per-step log.

    python3 benchmarks/time_budget.py results/demo results/compare-mnist-vit

For each report folder (trained in lockstep: exact and vcas on the same batches, so step i of
one is step i of the other) and each vcas method in it, summed over seeds, leaving out the steps
whose FLOPs were counted:

- the time per phase, vcas against exact *on the same steps*: the backward of ordinary (sampled)
  steps and the backward of calibration steps apart, so that each is compared with what exact
  training spent on those very steps;
- the ceiling: the time ratio if vcas's backward took exact's backward time scaled by the
  backward FLOPs vcas ran (against stock PyTorch, whose time exact's is) and every other phase
  took exact's time, the conversions that ceiling would give (of the FLOPs saved by sampling, and
  of those saved in all: the ceiling includes the free zero-row skipping), and how far each of
  vcas's phases lies above it;
- the run in quarters: the time ratio, the backward time ratio, the mean keep ratios and the mean
  training loss against exact's on the same batches in each, which shows how much of the run the
  variance bound keeps near exact training, and when a gap in the loss opens.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

PHASES = ("forward", "backward", "optimizer", "controller")


def _seconds(row: dict, phase: str) -> float:
    value = row.get(f"{phase}_seconds") or ""
    return float(value) if value else 0.0


def _runs(folder: Path) -> tuple[dict, dict[tuple[str, int], list[dict]]]:
    report = json.loads((folder / "report.json").read_text())
    by_run: dict[tuple[str, int], list[dict]] = {}
    with (folder / "steps.csv").open() as handle:
        for row in csv.DictReader(handle):
            by_run.setdefault((row["method"], int(row["seed"])), []).append(row)
    return report, by_run


def _pairs(report: dict, by_run: dict) -> list[tuple[dict, list[dict], list[dict]]]:
    """(vcas run summary, its steps, exact's steps on the same batches) for every vcas seed,
    leaving out the steps whose FLOPs were counted (they run extra work on both sides)."""
    pairs = []
    for run in report["runs"]:
        if not run["method"].startswith("vcas") or ("exact", run["seed"]) not in by_run:
            continue
        counted = {check["step"] for check in run.get("flop_checks", [])}
        steps = {int(r["step"]): r for r in by_run[(run["method"], run["seed"])]}
        exact = {int(r["step"]): r for r in by_run[("exact", run["seed"])]}
        shared = sorted(set(steps) & set(exact) - counted)
        pairs.append((run, [steps[s] for s in shared], [exact[s] for s in shared]))
    return pairs


def phase_table(pairs: list) -> list[str]:
    totals: dict[str, list[float]] = {}

    def add(name: str, exact: float, vcas: float) -> None:
        pair = totals.setdefault(name, [0.0, 0.0])
        pair[0] += exact
        pair[1] += vcas

    calibrations = steps = 0
    for _, vcas_steps, exact_steps in pairs:
        for v, e in zip(vcas_steps, exact_steps):
            calibrating = v["calibrating"] == "1"
            calibrations += calibrating
            steps += 1
            add("forward", _seconds(e, "forward"), _seconds(v, "forward"))
            add("backward, calibration steps" if calibrating else "backward, sampled steps",
                _seconds(e, "backward"), _seconds(v, "backward"))
            add("optimizer", _seconds(e, "optimizer"), _seconds(v, "optimizer"))
            add("controller", 0.0, _seconds(v, "controller"))
    order = ("forward", "backward, sampled steps", "backward, calibration steps", "optimizer", "controller")
    totals = {name: totals.get(name, [0.0, 0.0]) for name in order}
    totals["total"] = [sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values())]
    lines = [f"{steps} steps, {calibrations} of them calibration steps (seeds summed)", "",
             "| phase | exact | vcas | vcas / exact |", "|---|---|---|---|"]
    for name, (exact, vcas) in totals.items():
        lines.append(f"| {name} | {exact:.1f} s | {vcas:.1f} s | {_ratio(vcas, exact)} |")
    return lines


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.3f}" if denominator > 0 else "-"


def _conversion(time_ratio: float, saved: float) -> str:
    return f"{(1 - time_ratio) / saved:.2f}" if saved > 0 else "-"


def ceiling_lines(pairs: list) -> list[str]:
    """Per seed, the ceiling and its conversions; then, summed over seeds, how far each phase
    of vcas's run lies above the ceiling's time for it."""
    lines = []
    gap = dict.fromkeys(PHASES, 0.0)
    for run, vcas_steps, exact_steps in pairs:
        exact_total = sum(_seconds(e, p) for e in exact_steps for p in PHASES)
        exact_backward = sum(_seconds(e, "backward") for e in exact_steps)
        if exact_total <= 0:
            continue
        reduction = run["bp_flops_reduction"]
        ceiling = 1 - exact_backward * reduction / exact_total
        saved, in_all = run["sampling_train_flops_reduction"], run["train_flops_reduction"]
        lines.append(f"- {run['method']} seed {run['seed']}: backward {exact_backward / exact_total:.0%} of exact's "
                     f"time; backward FLOPs {reduction:.1%} fewer than stock PyTorch's; ceiling time ratio "
                     f"{ceiling:.3f} (conversion {_conversion(ceiling, saved)} of the FLOPs saved by sampling, "
                     f"{_conversion(ceiling, in_all)} of those saved in all); measured {run['time_ratio']:.3f} "
                     f"(conversion {_conversion(run['time_ratio'], saved)}, {_conversion(run['time_ratio'], in_all)})")
        for phase in PHASES:
            spent = sum(_seconds(v, phase) for v in vcas_steps)
            allowed = sum(_seconds(e, phase) for e in exact_steps)
            gap[phase] += spent - (allowed * (1 - reduction) if phase == "backward" else allowed)
    if lines:
        lines.append("- above the ceiling, seeds summed: " + ", ".join(f"{p} {gap[p]:+.1f} s" for p in PHASES)
                     + f" (total {sum(gap.values()):+.1f} s)")
    return lines


def _loss_ratio(vcas_steps: list[dict], exact_steps: list[dict]) -> str:
    """The mean training loss of the steps against exact's ("-" where the log has no losses)."""
    if not all(r.get("loss") for r in vcas_steps + exact_steps):
        return "-"
    return _ratio(sum(float(r["loss"]) for r in vcas_steps), sum(float(r["loss"]) for r in exact_steps))


def quarter_table(pairs: list) -> list[str]:
    lines = ["| run | steps | time ratio | backward time ratio | mean activation keep ratio "
             "| mean weight keep ratio | calibrations | train loss / exact's |", "|---|---|---|---|---|---|---|---|"]
    for run, vcas_steps, exact_steps in pairs:
        n = len(vcas_steps)
        for q in range(4):
            part = slice(q * n // 4, (q + 1) * n // 4)
            v, e = vcas_steps[part], exact_steps[part]
            if not v:
                continue
            time_v = sum(_seconds(r, p) for r in v for p in PHASES)
            time_e = sum(_seconds(r, p) for r in e for p in PHASES)
            back_v = sum(_seconds(r, "backward") for r in v)
            back_e = sum(_seconds(r, "backward") for r in e)
            act = sum(float(r["act_ratio"] or 1) for r in v) / len(v)
            weight = sum(float(r["weight_ratio"] or 1) for r in v) / len(v)
            calibrations = sum(r["calibrating"] == "1" for r in v)
            lines.append(f"| {run['method']} seed {run['seed']} | {v[0]['step']}-{v[-1]['step']} "
                         f"| {_ratio(time_v, time_e)} | {_ratio(back_v, back_e)} "
                         f"| {act:.3f} | {weight:.3f} | {calibrations} | {_loss_ratio(v, e)} |")
    return lines


def main(folders: list[str]) -> None:
    for folder in folders:
        report, by_run = _runs(Path(folder))
        if not report.get("lockstep"):
            print(f"{folder}: not a lockstep run; its steps are not paired", file=sys.stderr)
            continue
        pairs = _pairs(report, by_run)
        if not any(_seconds(row, "backward") for _, steps, _ in pairs for row in steps):
            print(f"{folder}: no vcas run with per-phase times paired with exact's", file=sys.stderr)
            continue
        for method in dict.fromkeys(run["method"] for run, _, _ in pairs):
            ours = [pair for pair in pairs if pair[0]["method"] == method]
            print(f"## {report['task']}, {method} ({folder})", "", *phase_table(ours), "",
                  "Ceiling (backward time in proportion to its FLOPs, every other phase as exact's):",
                  *ceiling_lines(ours), "", "The run in quarters:", "", *quarter_table(ours), "", sep="\n")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
