#!/usr/bin/env bash
# benchmarks/queue_overhead_gpu.py on a machine with no network (the GPU device machine): installs
# the carried wheels (benchmarks/gpu_bundle.sh) into a folder of their own, puts it and the
# repository on PYTHONPATH, then runs the benchmark; its log goes to $OUT (or --out) as well.
#
#   bash benchmarks/queue_overhead_gpu.sh .q21 --device cuda --out "$OUT"
set -euo pipefail
BUNDLE=${1:?usage: queue_overhead_gpu.sh BUNDLE_DIR [benchmark arguments]}
shift
PY=${PYTHON:-python3}
SITE=${QO_SITE:-/tmp/qo-site}
cd "$(dirname "$0")/.."
start=$(date +%s)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --root-user-action ignore \
    --target "$SITE" "$BUNDLE"/whl/*.whl
echo "wheels installed in $(( $(date +%s) - start )) s into $SITE"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/queue_overhead_gpu.py --bundle "$BUNDLE" "$@"
