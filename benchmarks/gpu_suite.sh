#!/usr/bin/env bash
# The GPU calls of issue 15, one mode per call (see docs/gpu-notes.md), from the repository root:
#   bash benchmarks/gpu_suite.sh explore   # CUDA tests, sampling kernel timings, tokenmill Qwen3 (c) + profile
#   bash benchmarks/gpu_suite.sh a         # carried .peer/c1 stored; sampling tests on CUDA; tokenmill
#                                          # Qwen3-0.6B (c) and Llama-3.1-8B (a) at 256 seqs, with profiles
#   bash benchmarks/gpu_suite.sh b         # carried .peer/c2: vLLM installed; vLLM Llama (a) and Qwen3 (c)
#   bash benchmarks/gpu_suite.sh c         # both engines' Llama-3.1-8B (a) at 1,024 seqs / 16,384 tokens
# (python benchmarks/versus.py --merge <the three JSON files> prints the side-by-side table.)
# Results (JSON, logs) go to $OUT (the device tool brings them back), else ./.out.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
mode=${1:?mode: explore, a, b or c}
# The peer bundle's folder: .peer beside this checkout's root, or above it (a copy run from a subfolder).
PEER=.peer; [ -f "$PEER/install.sh" ] || PEER=../.peer
T0=$(date +%s)
left() { echo $(( ${LIMIT:-560} - ($(date +%s) - T0) )); }  # seconds left of this call's budget

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee -a "$OUT/card.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/card.txt"

case "$mode" in
explore)
  timeout 210 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_sampling_kernels.py \
      tests/engine/test_sampling_statistics.py tests/engine/test_cuda.py 2>&1 | tail -40 | tee "$OUT/tests.log"
  timeout 60 $PY benchmarks/sampling_bench.py --json "$OUT/sampling_bench.json" 2>&1 | tail -30
  timeout $(( $(left) - 5 )) $PY benchmarks/versus.py --groups qwen-c --engines tokenmill --profile \
      --json "$OUT/explore_qwen.json" 2>&1 | grep -v Warning | tail -60 | tee "$OUT/explore_qwen.log"
  ;;
a)
  bash "$PEER/install.sh"; echo "install.sh exit $? (3 expected: one part of two)"
  timeout 45 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_sampling_kernels.py \
      tests/engine/test_sampling_statistics.py -k "not cpu" 2>&1 | tail -15 | tee "$OUT/tests.log"
  timeout $(( $(left) - 5 )) $PY benchmarks/versus.py --engines tokenmill --groups qwen-c,llama-a \
      --profile --timeout 230 --json "$OUT/tokenmill.json" 2>&1 | grep -v Warning | tail -60 | tee "$OUT/tokenmill.log"
  ;;
b)
  bash "$PEER/install.sh"; echo "install.sh exit $?"
  timeout $(( $(left) - 5 )) $PY benchmarks/versus.py --engines vllm --groups llama-a,qwen-c \
      --timeout 420 --json "$OUT/vllm.json" 2>&1 | grep -v -i "warning" | tail -50 | tee "$OUT/vllm.log"
  ;;
c)
  timeout $(( $(left) - 5 )) $PY benchmarks/versus.py --engines tokenmill,vllm --groups llama-a-1024 \
      --timeout 250 --json "$OUT/llama_1024.json" 2>&1 | grep -v -i "warning" | tail -30 | tee "$OUT/llama_1024.log"
  ;;
*) echo "unknown mode $mode"; exit 2 ;;
esac
echo "mode $mode took $(( $(date +%s) - T0 )) s"
