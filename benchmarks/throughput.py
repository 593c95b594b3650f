"""Throughput benchmark: tokenmill's engine vs transformers' `generate`, same model, same prompts,
same machine, in one run. A benchmark, not a test.

Prompt and output lengths are drawn from a seeded range, output lengths are forced (EOS ignored),
and both sides count only useful output tokens: transformers in static batches (the way a plain
Python user runs it: left-padded batches, each run to its longest request) wastes the steps of
rows that are already done, and those are not counted.

    python benchmarks/throughput.py                         # CPU, SmolLM2-135M shape, float32
    python benchmarks/throughput.py --num-prompts 64 --hf-batch-size 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Result:
    name: str
    prompts: int
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def make_workload(n: int, in_range: tuple[int, int], out_range: tuple[int, int], vocab: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(*in_range))] for _ in range(n)]
    outs = [rng.randint(*out_range) for _ in range(n)]
    return prompts, outs


def run_engine(model_dir: str, prompts, outs, args) -> Result:
    from engine import LLM, SamplingParams

    llm = LLM(model_dir, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    # Warm-up outside the timing (first-call allocations, lazy inits).
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outs]
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    secs = time.perf_counter() - start
    produced = sum(len(r.token_ids) for r in results)
    assert produced == sum(outs), (produced, sum(outs))
    return Result("tokenmill engine", len(prompts), produced, secs)


def run_transformers(model_dir: str, prompts, outs, args) -> Result:
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.to(args.device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    n = min(len(prompts), args.hf_prompts or len(prompts))
    useful = 0
    start = time.perf_counter()
    for b in range(0, n, args.hf_batch_size):
        batch, lens = prompts[b:b + args.hf_batch_size], outs[b:b + args.hf_batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, p in enumerate(batch):  # left padding, as decoder-only generation needs
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = max(lens)
        with torch.inference_mode():
            model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False)
        useful += sum(lens)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - start
    return Result(f"transformers generate (static batches of {args.hf_batch_size})", n, useful, secs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", help="dummy-weight model shape (engine.loader.DUMMY_SHAPES)")
    ap.add_argument("--num-layers", type=int, default=None, help="override the layer count (quick runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, nargs=2, default=(64, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(64, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--hf-prompts", type=int, default=None, help="run transformers on the first N prompts only")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from engine.loader import dummy_config

    overrides = {"num_hidden_layers": args.num_layers} if args.num_layers else {}
    config = dummy_config(args.shape, **overrides)
    torch.manual_seed(args.seed)
    prompts, outs = make_workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len),
                                  config.vocab_size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        # One set of random weights, saved once, loaded by both sides.
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        results = [run_transformers(tmp, prompts, outs, args), run_engine(tmp, prompts, outs, args)]
    hf, eng = results
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name()}"
    print(f"model shape {args.shape} ({config.num_hidden_layers} layers), {args.dtype}, {args.device}; {machine}")
    print(f"{args.num_prompts} prompts, input {args.input_len[0]}..{args.input_len[1]}, "
          f"output {args.output_len[0]}..{args.output_len[1]} (forced), seed {args.seed}")
    for r in results:
        print(f"  {r.name:<48} {r.prompts:>5} prompts {r.output_tokens:>7} tokens "
              f"{r.seconds:>8.2f} s {r.tokens_per_s:>9.1f} tok/s")
    ratio = eng.tokens_per_s / hf.tokens_per_s
    print(f"  engine / transformers: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine, "ratio": ratio,
                       "results": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
