"""`vcas bench` end to end on a tiny shape: every number it reports is there and finite."""

import json
import math
import statistics

import pytest

from vcas.cli import main

pytest.importorskip("transformers")


def test_bench_reports_finite_ratios_for_every_variant(tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "--preset", "minilm", "--layers", "2", "--batch", "4", "--seq", "16",
                 "--ratios", "1,0.25", "--repeats", "2", "--warmup", "0", "--flop-draws", "1",
                 "--variants", "naive,vcas,vcas-no-recompute", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    rows = result["rows"]
    assert [(r["variant"], r["ratio"]) for r in rows] == [
        ("exact", 1.0), ("naive", 1.0), ("naive", 0.25), ("vcas", 1.0), ("vcas", 0.25),
        ("vcas-no-recompute", 1.0), ("vcas-no-recompute", 0.25)]
    for row in rows:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    exact = rows[0]
    assert exact["backward_flops_vs_exact"] == 1.0 and exact["efficiency"] == 1.0
    # Sampling at 0.25 skips backward work in both implementations, and recompute saves memory.
    by = {(r["variant"], r["ratio"]): r for r in rows}
    assert by["naive", 0.25]["backward_flops_vs_exact"] < 0.8
    assert by["vcas", 0.25]["backward_flops_vs_exact"] < 0.8
    assert by["vcas", 0.25]["memory_mb"] < by["vcas-no-recompute", 0.25]["memory_mb"]
    assert set(result["overhead_at_ratio_1"]) == {"backward", "forward"}
    assert (out / "bench.md").read_text().startswith(result["workload"])
    assert (out / "bench.png").stat().st_size > 0


def test_bench_refuses_bad_ratios_and_variants():
    with pytest.raises(SystemExit, match="ratios"):
        main(["bench", "--ratios", "0,1.5"])
    with pytest.raises(SystemExit, match="variants"):
        main(["bench", "--variants", "fastest"])


def test_bench_ratios_are_medians_of_the_ratios_within_each_round():
    from torch import nn

    from vcas_lab.bench.measure import Setting
    from vcas_lab.bench.report import paired_median, summarize

    # Round 2 ran on a slow machine for both; the medians of the times would pair round 3's
    # exact time (1.1) with round 1's vcas time (0.6): 0.545; the rounds' own ratios say 0.5.
    exact = Setting("exact", 1.0, nn.Identity(), forward_s=[1.0, 3.0, 1.1], backward_s=[1.0, 3.0, 1.1])
    exact.backward_flops = 10.0
    naive = Setting("naive", 0.5, nn.Identity(), forward_s=[1.0, 3.0, 1.1], backward_s=[0.9, 2.4, 1.0])
    fast = Setting("vcas", 0.5, nn.Identity(), forward_s=[1.0, 3.0, 1.1], backward_s=[0.6, 1.5, 0.5])
    naive.backward_flops = fast.backward_flops = 4.0
    rows = {(r["variant"], r["ratio"]): r for r in summarize([exact, naive, fast])["rows"]}
    vcas_row = rows["vcas", 0.5]
    assert vcas_row["backward_time_vs_exact"] == pytest.approx(0.5)
    assert vcas_row["backward_ms"] == pytest.approx(600.0)  # times stay medians
    assert vcas_row["efficiency"] == pytest.approx(0.4 / 0.5)
    assert vcas_row["speedup_vs_naive"] == pytest.approx(statistics.median([0.9 / 0.6, 2.4 / 1.5, 1.0 / 0.5]))
    assert rows["exact", 1.0]["backward_time_vs_exact"] == 1.0
    with pytest.raises(ValueError, match="one time per round"):
        paired_median([1.0, 2.0], [1.0])
    # An even count: the geometric middle, so inverse ratios give the inverse median.
    times, references = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]
    assert paired_median(times, references) == pytest.approx(math.sqrt(1.0 * 1.5))
    assert paired_median(references, times) * paired_median(times, references) == pytest.approx(1.0)
