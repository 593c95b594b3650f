"""Time of one sampling call on the device: the argmax of a greedy batch against the sampling
kernel with top-p, and with top-k/top-p/min-p, over bf16 logits of a real vocabulary size.

    python benchmarks/sampling_bench.py            # CUDA; prints microseconds per call
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

from kernels.sampling import sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256, 1024])
    ap.add_argument("--scale", type=float, nargs="+", default=[0.5, 3.0],
                    help="logit standard deviations: flat rows keep most of the vocabulary under top-p")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for scale in args.scale:
        for n in args.rows:
            x = (torch.randn(n, args.vocab, generator=gen, device="cuda") * scale).to(torch.bfloat16)
            ones = torch.ones(n, device="cuda")
            ids = torch.arange(n, device="cuda")
            no_k, k50 = torch.zeros(n, dtype=torch.int32, device="cuda"), torch.full((n,), 50, dtype=torch.int32, device="cuda")
            p90, p95, mp0, mp5, t8 = ones * 0.9, ones * 0.95, ones * 0, ones * 0.05, ones * 0.8
            cases = {
                "argmax": lambda: x.argmax(dim=-1),
                "top-p 0.9": lambda: sample(x, ones, no_k, p90, mp0, ids, ids),
                "top-k 50, top-p 0.95, min-p 0.05": lambda: sample(x, t8, k50, p95, mp5, ids, ids),
            }
            for name, fn in cases.items():
                us = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
                out.append({"rows": n, "vocab": args.vocab, "scale": scale, "case": name, "us": round(us, 1)})
                print(f"rows {n:5d} scale {scale:4.1f} {name:<34} {us:9.1f} us", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
