#!/usr/bin/env bash
# The GPU calls of issue 15, one mode per call (see docs/gpu-notes.md), from the repository root:
#   bash benchmarks/gpu_suite.sh explore   # CUDA tests, sampling kernel timings, tokenmill Qwen3 (c) + profile
#   bash benchmarks/gpu_suite.sh a         # carried .peer/c1 stored; tokenmill, every group, Llama profile
#   bash benchmarks/gpu_suite.sh b         # carried .peer/c2: vLLM installed; vLLM Llama-3.1-8B groups
#   bash benchmarks/gpu_suite.sh c         # vLLM Qwen3-0.6B group; the side-by-side table of a+b+c
# Results (JSON, logs) go to $OUT (the device tool brings them back), else ./.out.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
mode=${1:?mode: explore, a, b or c}
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
  bash .peer/install.sh; echo "install.sh exit $? (3 expected: one part of two)"
  timeout $(( $(left) - 5 )) $PY benchmarks/versus.py --engines tokenmill --groups qwen-c,llama-a,llama-a-1024 \
      --profile --timeout 300 --json "$OUT/tokenmill.json" 2>&1 | grep -v Warning | tail -80 | tee "$OUT/tokenmill.log"
  ;;
b)
  bash .peer/install.sh; echo "install.sh exit $?"
  timeout $(( $(left) - 5 )) $PY benchmarks/versus.py --engines vllm --groups llama-a,llama-a-1024 \
      --timeout 330 --json "$OUT/vllm_llama.json" 2>&1 | grep -v -i "warning" | tail -60 | tee "$OUT/vllm_llama.log"
  ;;
c)
  timeout $(( $(left) - 5 )) $PY benchmarks/versus.py --engines vllm --groups qwen-c --timeout 300 \
      --json "$OUT/vllm_qwen.json" 2>&1 | grep -v -i "warning" | tail -40 | tee "$OUT/vllm_qwen.log"
  ;;
*) echo "unknown mode $mode"; exit 2 ;;
esac
echo "mode $mode took $(( $(date +%s) - T0 )) s"
