"""What each tensor-parallel rank holds: bytes of weights and of KV cache per rank, for each model
and each tensor_parallel_size, as a Markdown table (the one in docs/tensor-parallel.md).

Each engine is built on the CPU (gloo) with the same number of KV blocks, so the KV column compares
like with like; weights are the parameters each rank loaded (its slices of the checkpoint).

    .venv/bin/python benchmarks/tp_memory.py --model DIR [--model DIR ...] --tp 1 2 4
    .venv/bin/python benchmarks/tp_memory.py --model qwen3-0.6b --load-format dummy --dtype bfloat16

`--make-tiny` first writes the test suite's tiny models (llama3, qwen2, qwen3; tests/tiny_models.py)
into a temporary directory and measures those.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(model: str, tp: int, num_kv_blocks: int, load_format: str, dtype: str) -> list[dict[str, int]]:
    from engine import LLM

    with LLM(model, dtype=dtype, tensor_parallel_size=tp, num_kv_blocks=num_kv_blocks,
             load_format=load_format) as llm:
        return llm.engine.memory_by_rank()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="a model directory (repeatable)")
    parser.add_argument("--make-tiny", action="store_true", help="measure the test suite's tiny models")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--num-kv-blocks", type=int, default=256)
    parser.add_argument("--load-format", default="auto", help="dummy: random weights (MODEL may be a shape preset)")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    models = list(args.model)
    if args.make_tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import make_tiny_model

        from tokenmill.builtin_model import fetch_builtin_model
        from tokenmill.settings import Settings

        tokenizer_dir = fetch_builtin_model("smollm2-135m-instruct", Settings.from_env().model_cache_dir)
        root = Path(tempfile.mkdtemp(prefix="tp-memory-"))
        models += [str(make_tiny_model(a, root / f"tiny-{a}", tokenizer_dir)) for a in ("llama3", "qwen2", "qwen3")]
    print("| model | TP | weights per rank (MiB) | of TP=1 | KV cache per rank (MiB) | of TP=1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model in models:
        base = None
        for tp in args.tp:
            ranks = measure(model, tp, args.num_kv_blocks, args.load_format, args.dtype)
            w, kv = max(r["weights"] for r in ranks), max(r["kv_cache"] for r in ranks)
            base = base or (w, kv)
            print(f"| {Path(model).name} | {tp} | {w / 2**20:.2f} | {w / base[0]:.3f} | {kv / 2**20:.3f} | "
                  f"{kv / base[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
