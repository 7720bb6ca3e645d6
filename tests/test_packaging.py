"""Packaging: `import vcas` pulls in nothing optional, and the version is the same everywhere."""

import json
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

import vcas

# Optional dependencies (extras), the lab, and what they drag in: none may load with `import vcas`.
OPTIONAL = ("vcas_lab", "transformers", "accelerate", "lightning", "pytorch_lightning", "lightning_fabric",
            "peft", "matplotlib", "tqdm", "tensorboard", "huggingface_hub", "tokenizers", "safetensors",
            "numpy", "scipy", "sklearn", "pandas", "datasets")


def _top_level_modules(code: str) -> set[str]:
    """The top-level names in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.partition('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_import_vcas_imports_only_torch_and_the_standard_library():
    with_torch = _top_level_modules("import torch")
    with_vcas = _top_level_modules("import vcas")
    # torch itself imports some optional packages when they are installed (torch.hub imports tqdm,
    # torch imports numpy): those are not vcas's doing.
    loaded_by_vcas = with_vcas - with_torch
    optional = sorted(name for name in OPTIONAL if name in loaded_by_vcas)
    assert not optional, f"import vcas imports optional packages: {optional}"
    third_party = sorted(name for name in loaded_by_vcas
                         if name not in sys.stdlib_module_names and not name.startswith("_") and name != "vcas")
    assert not third_party, f"import vcas imports packages beyond torch: {third_party}"


def test_version_is_the_same_everywhere():
    try:
        installed = metadata.version("vcas")
    except metadata.PackageNotFoundError:
        pytest.skip("vcas is not installed (only on the path): no package metadata to compare")
    assert installed == vcas.__version__, (
        f"the installed metadata says {installed}, vcas.__version__ is {vcas.__version__}: "
        "reinstall (bash scripts/setup.sh)")
    printed = subprocess.run([sys.executable, "-m", "vcas.cli", "--version"], capture_output=True, text=True,
                             timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert printed.stdout.strip() == f"vcas {vcas.__version__}"


def test_the_vcas_command_prints_the_version():
    """The console script installed with the package (beside this interpreter) agrees."""
    script = Path(sysconfig.get_path("scripts")) / "vcas"
    if not script.exists():
        pytest.skip(f"no vcas console script in {script.parent}")
    printed = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert printed.stdout.strip() == f"vcas {vcas.__version__}"


def test_the_package_is_marked_typed():
    assert (Path(vcas.__file__).parent / "py.typed").is_file()
