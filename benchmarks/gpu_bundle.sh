#!/usr/bin/env bash
# Builds the folder that benchmarks/queue_overhead_gpu.sh needs on a machine with no network (the
# GPU device machine): wheels of every package of the job path that its image lacks, PostgreSQL's
# server binaries, and the SmolLM2-135M tokenizer (no weights: the benchmark uses random weights).
#
#   bash benchmarks/gpu_bundle.sh .q21                # for the device image's Python 3.12
#   PYVER=3.11 bash benchmarks/gpu_bundle.sh /tmp/b   # for a local rehearsal under Python 3.11
#
# Wheels are pinned in benchmarks/gpu_wheels.txt (the versions the project is tested with). The
# image provides torch, triton, numpy, transformers, tokenizers, safetensors, jinja2, httpx, anyio,
# h11, pyyaml, psutil, uvloop and the rest of its list (see docs/benchmarks.md); what it lacks, or
# holds at versions our pins may not match (click, typer, rich, typing-extensions), is carried.
# PostgreSQL 16 comes from the `pgserver` wheel (built on manylinux2014: it needs only glibc and
# zlib), cut down to what initdb and the server need. About 30 MB in all.
set -euo pipefail
DEST=${1:?usage: gpu_bundle.sh DEST_DIR}
PYVER=${PYVER:-3.12}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL_DIR=${SMOLLM2_DIR:-$HOME/.cache/tokenmill/models/smollm2-135m-instruct}
PGSERVER=pgserver==0.1.4

platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${platforms[@]}" -d "$1" "${@:2}"
}

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)  # absolute: the steps below run from other folders
rm -rf "$DEST/whl" "$DEST/pg16.tar.xz" "$DEST/smollm2-135m"
mapfile -t pins < <(grep -v '^\s*#' "$HERE/gpu_wheels.txt" | grep -v '^\s*$')
download "$DEST/whl" "${pins[@]}"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
download "$tmp" "$PGSERVER"
(cd "$tmp" && "$PY" -m zipfile -e pgserver-*.whl x)
# initdb finds libpq through its rpath (../../../pgserver.libs): keep that layout.
(cd "$tmp/x" && tar cJf "$DEST/pg16.tar.xz" pgserver/pginstall/bin/initdb pgserver/pginstall/bin/postgres \
    pgserver/pginstall/lib/postgresql pgserver/pginstall/share pgserver.libs)
# zipfile -e drops the executable bits; the tarball must carry them.
(cd "$tmp" && mkdir y && tar xJf "$DEST/pg16.tar.xz" -C y && chmod 755 y/pgserver/pginstall/bin/* \
    && (cd y && tar cJf "$DEST/pg16.tar.xz" pgserver pgserver.libs))

if [ ! -f "$MODEL_DIR/tokenizer.json" ]; then
    echo "no SmolLM2 tokenizer in $MODEL_DIR: run 'tokenmill fetch' once (it converts the built-in model)" >&2
    exit 1
fi
mkdir -p "$DEST/smollm2-135m"
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    cp "$MODEL_DIR/$f" "$DEST/smollm2-135m/"
done
du -sh "$DEST"/*
du -sh "$DEST"
