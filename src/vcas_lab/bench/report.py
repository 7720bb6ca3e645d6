"""Summary numbers, table and plot of a ``vcas bench`` run."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .measure import EXACT, FAST, FULL, NAIVE, Setting


def summarize(settings: list[Setting]) -> dict[str, Any]:
    """Medians of the times, and each ratio as the median over rounds of the ratio within a
    round: the settings of a round run back to back, so a drift of the machine that slows one
    round slows both sides of its ratios."""
    exact = next(s for s in settings if s.variant == EXACT)
    rows = []
    for s in settings:
        flops = s.backward_flops / exact.backward_flops
        backward_ratio = paired_median(s.backward_s, exact.backward_s)
        rows.append({"variant": s.variant, "ratio": s.ratio,
                     "forward_ms": 1e3 * statistics.median(s.forward_s),
                     "backward_ms": 1e3 * statistics.median(s.backward_s),
                     "backward_flops": s.backward_flops, "forward_flops": s.forward_flops,
                     "backward_flops_vs_exact": flops, "backward_time_vs_exact": backward_ratio,
                     "forward_time_vs_exact": paired_median(s.forward_s, exact.forward_s),
                     "efficiency": flops / backward_ratio,
                     "memory_mb": s.memory_bytes / 2**20})
    by_setting = {(s.variant, s.ratio): s for s in settings}
    for row in rows:
        naive = by_setting.get((NAIVE, row["ratio"]))
        if row["variant"] in (FAST, FULL) and naive is not None:
            mine = by_setting[row["variant"], row["ratio"]]
            row["speedup_vs_naive"] = paired_median(naive.backward_s, mine.backward_s)
    at_one = next((r for r in rows if r["variant"] == FAST and r["ratio"] == 1.0), None)
    overhead = None if at_one is None else {
        "backward": at_one["backward_time_vs_exact"] - 1, "forward": at_one["forward_time_vs_exact"] - 1}
    return {"rows": rows, "overhead_at_ratio_1": overhead}


def paired_median(times: list[float], references: list[float]) -> float:
    """The median over rounds of ``times[i] / references[i]`` (both timed in round ``i``); with
    an even count, the geometric mean of the middle two, so that the median of the inverse
    ratios is the inverse of this one."""
    if len(times) != len(references) or not times:
        raise ValueError(f"paired_median needs one time per round on both sides, got "
                         f"{len(times)} and {len(references)}")
    ratios = sorted(t / r for t, r in zip(times, references))
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else math.sqrt(ratios[middle - 1] * ratios[middle])


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['workload']} ({result['device']}, {result['dtype']}, "
             f"{result['threads']} threads, {result['repeats']} rounds: times are medians, ratios "
             "medians of the ratios within a round)", "",
             "| variant | act = weight | bwd FLOPs / exact | bwd time / exact | efficiency "
             "| vs naive | fwd ms | bwd ms | fwd / exact | activation MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = "-" if r["variant"] == EXACT else f"{r['ratio']:g}"
        speed = f"{r['speedup_vs_naive']:.2f}x" if "speedup_vs_naive" in r else "-"
        lines.append(f"| {r['variant']} | {ratio} | {r['backward_flops_vs_exact']:.3f} "
                     f"| {r['backward_time_vs_exact']:.3f} | {r['efficiency']:.2f} | {speed} "
                     f"| {r['forward_ms']:.0f} | {r['backward_ms']:.0f} | {r['forward_time_vs_exact']:.3f} "
                     f"| {r['memory_mb']:.0f} |")
    overhead = result.get("overhead_at_ratio_1")
    if overhead:
        lines += ["", f"overhead at ratio 1: backward {100 * overhead['backward']:+.1f} %, "
                      f"forward {100 * overhead['forward']:+.1f} % (against plain PyTorch)"]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """Backward time against keep ratio: exact, ideal, naive and vcas. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    exact = next(r for r in rows if r["variant"] == EXACT)
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, style in ((NAIVE, "s--"), (FULL, "^-."), (FAST, "o-")):
        points = sorted((r["ratio"], r["backward_ms"], r["backward_flops_vs_exact"]) for r in rows
                        if r["variant"] == variant)
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=f"{variant} (measured)")
        if variant == FAST:
            ax.plot([p[0] for p in points], [p[2] * exact["backward_ms"] for p in points], "k:",
                    label="vcas ideal (FLOPs ratio x exact)")
    ax.axhline(exact["backward_ms"], color="grey", label="exact")
    ax.set_xlabel("keep ratio (act = weight)")
    ax.set_ylabel("backward time per step (ms, median)")
    ax.set_title(result["workload"], fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
