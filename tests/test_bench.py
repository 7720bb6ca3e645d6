"""`vcas bench` end to end on a tiny shape: every number it reports is there and finite."""

import json
import math

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
