"""Throughput benchmark: tokenmill's engine vs transformers' `generate`, same model, same prompts,
same machine, in one run. A benchmark, not a test.

Prompt and output lengths are drawn from a seeded range, output lengths are forced (EOS ignored),
and both sides count only useful output tokens: transformers in static batches (the way a plain
Python user runs it: left-padded batches, each run to its longest request) wastes the steps of
rows that are already done, and those are not counted.

    python benchmarks/throughput.py                         # CPU, SmolLM2-135M shape, float32
    python benchmarks/throughput.py --num-prompts 64 --hf-batch-size 16 --json out.json

On CUDA (`--device cuda`) the run is a suite of (model shape, workload) pairs in bf16 with dummy
weights, each against transformers `generate` (static batches, sdpa) on a subset of the same
prompts, and against the roofline of the card measured in the same run (benchmarks/roofline.py):

    python benchmarks/throughput.py --device cuda --suite gpu-small --json out.json
    python benchmarks/throughput.py --device cuda --suite gpu-llama --json out.json

Against vLLM on the same card (greedy and sampled; benchmarks/versus.py, which this delegates to):

    python benchmarks/throughput.py --device cuda --peer vllm --json versus.json
"""

from __future__ import annotations

import argparse
import gc
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


def run_transformers(model_dir: str, prompts, outs, args, batch_size: int) -> Result:
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.to(args.device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    n = min(len(prompts), args.hf_prompts or len(prompts))
    with torch.inference_mode():  # warm-up outside the timing, as for the engine
        warm = torch.tensor([prompts[0][:16]], device=args.device)
        model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=4,
                       min_new_tokens=4, do_sample=False)
    useful = 0
    start = time.perf_counter()
    for b in range(0, n, batch_size):
        batch, lens = prompts[b:b + batch_size], outs[b:b + batch_size]
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
    return Result(f"transformers generate (static batches of {batch_size})", n, useful, secs)


# -- CUDA: the suite of the GPU issue ------------------------------------------------------------

# name: (number of prompts, input length range, output length range), lengths uniform and inclusive
GPU_WORKLOADS: dict[str, tuple[int, tuple[int, int], tuple[int, int]]] = {
    "a": (1000, (512, 512), (256, 256)),
    "b": (1000, (1000, 1000), (1000, 1000)),
    "c": (256, (100, 1024), (100, 1024)),  # the nano-vllm bench workload
}
# Each suite fits one 10-minute call on an H100, model builds and Triton compiles included (gpu-llama
# took 6.6 minutes on 2026-11-28; gpu-small about 8, most of it the uncapped transformers runs).
GPU_SUITES: dict[str, list[tuple[str, str]]] = {
    "gpu-small": [("qwen3-0.6b", "c"), ("qwen3-0.6b", "a"), ("smollm2-135m", "c"), ("smollm2-135m", "a")],
    "gpu-llama": [("llama-3.1-8b", "a"), ("llama-3.1-8b", "c"), ("llama-3.1-8b", "b")],
    "gpu-a": [("llama-3.1-8b", "a")],
    "gpu-b": [("llama-3.1-8b", "b")],
    "gpu-c": [("qwen3-0.6b", "c")],
}
# Everything of the issue in one run (about 15 minutes on an H100, most of it transformers).
GPU_SUITES["gpu-all"] = GPU_SUITES["gpu-llama"] + GPU_SUITES["gpu-small"]
# transformers baseline per workload: (batch size, prompts, output cap), run as ceil(prompts / batch)
# batches. transformers generate measured about 80 ms a decode step on an H100 (overhead, not the
# GPU), so the long workloads on the 8B model get a per-token rate from a capped run (the first
# `cap` output tokens of each prompt) instead of minutes of device time.
HF_RUNS: dict[str, list[tuple[int, int, int | None]]] = {
    "a": [(32, 32, None), (128, 128, None)], "b": [(32, 32, 128)], "c": [(64, 64, None)]}
HF_RUNS_8B: dict[str, list[tuple[int, int, int | None]]] = {
    "a": [(32, 32, None), (128, 128, None)], "b": [(32, 32, 128)], "c": [(64, 64, 128)]}


def _gpu_engine_run(llm, prompts, outs, roof) -> dict:
    """Times one generate over the whole workload; records every step for the roofline."""
    from engine import SamplingParams

    runner = llm.engine.runner
    execute = runner.execute

    clock = {"execute": 0.0, "wait": 0.0}

    def recorded(requests, num_tokens, sample_rows, *rest):
        t = time.perf_counter()
        out = execute(requests, num_tokens, sample_rows, *rest)
        clock["execute"] += time.perf_counter() - t
        q, ctx = runner.last_step
        roof.record(q, ctx, len(sample_rows))
        return out

    from engine.readback import SampledStep

    read = SampledStep.read

    def timed_read(step):
        # The step's one wait for the GPU is in here (reading the token ids back); overlapped,
        # it waits for the step before the one just launched. Time outside execute and this is
        # host work, which overlapped steps do while the GPU computes.
        t = time.perf_counter()
        out = read(step)
        clock["wait"] += time.perf_counter() - t
        return out

    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outs]
    replays0 = runner.graphs.replays if runner.graphs is not None else 0
    stats0 = llm.engine.stats()
    runner.execute = recorded
    SampledStep.read = timed_read
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        results = llm.generate(prompts, params)
        torch.cuda.synchronize()
        secs = time.perf_counter() - start
    finally:
        runner.execute = execute
        SampledStep.read = read
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    assert produced == sum(outs), (produced, sum(outs))
    stats = llm.engine.stats()
    roof.finish()
    return {
        "output_tokens": produced, "seconds": secs, "tokens_per_s": produced / secs,
        "steps": stats.steps - stats0.steps, "graph_replays": (runner.graphs.replays - replays0) if runner.graphs else 0,
        "preemptions": stats.preemptions - stats0.preemptions,
        "roofline_seconds": roof.seconds, "roofline_over_measured": roof.seconds / secs,
        "roofline_decode_steps": roof.decode_steps, "roofline_memory_bound_steps": roof.memory_bound_steps,
        "bytes_moved_floor": roof.bytes, "flops": roof.flops,
        "seconds_in_execute": clock["execute"], "seconds_waiting_for_tokens": clock["wait"],
        "seconds_elsewhere": secs - clock["execute"] - clock["wait"],
    }


def _gpu_warmup(llm, prompts) -> None:
    """Short generations at several batch sizes, so Triton compiles its launch variants (prefill
    and mixed steps; the decode graphs were compiled at capture) before the timing starts."""
    from engine import SamplingParams

    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for n in (1, 3, 17, 64, min(len(prompts), 300)):
        llm.generate(prompts[:n], p)
    # The timed run must compute every prompt: forget the blocks the warm-up cached.
    llm.engine.kv.reset_prefix_cache()


def _gpu_transformers(config, prompts, outs, batch: int, count: int, device: str) -> dict:
    """transformers generate in static batches (bf16, sdpa, left padding), useful tokens only."""
    from transformers import AutoModelForCausalLM

    # Random weights built on the GPU straight from the config: no 16 GB file is written for an
    # 8B model, and throughput does not depend on the values (they differ from the engine's).
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def generate(batch_prompts, new):
        width = max(map(len, batch_prompts))
        ids = torch.zeros(len(batch_prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch_prompts):  # left padding, as decoder-only generation needs
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False)

    generate(prompts[:2], 4)  # warm-up: cuBLAS handles, first-call allocations
    torch.cuda.synchronize()
    useful = 0
    start = time.perf_counter()
    for b in range(0, count, batch):
        lens = outs[b:b + batch]
        generate(prompts[b:b + batch], max(lens))
        useful += sum(lens)
    torch.cuda.synchronize()
    secs = time.perf_counter() - start
    model = None  # the GPU memory goes back before the engine sizes its KV pool
    gc.collect()
    torch.cuda.empty_cache()
    return {"batch_size": batch, "prompts": count, "output_tokens": useful, "seconds": secs,
            "tokens_per_s": useful / secs}


def run_gpu_suite(args) -> None:
    """Runs the chosen (model shape, workload) pairs on one CUDA card; prints a table, writes JSON."""
    from roofline import (
        ModelCost,
        Roofline,
        measure_copy_bandwidth,
        measure_matmul_rate,
    )

    from engine import LLM
    from engine.kv_sizing import kv_bytes_per_block
    from engine.loader import dummy_config

    if args.runs:
        pairs = [tuple(item.split(":")) for item in args.runs.split(",")]
    else:
        pairs = GPU_SUITES[args.suite]
    device = args.device
    card = torch.cuda.get_device_name(device)
    bandwidth = measure_copy_bandwidth(device)
    matmul = measure_matmul_rate(device)
    torch.cuda.empty_cache()  # the measurement buffers, before anything sizes itself on free memory
    print(f"{card}; torch {torch.__version__}; copy {bandwidth / 1e9:.0f} GB/s (read + write), "
          f"bf16 matmul {matmul / 1e12:.0f} TFLOP/s", flush=True)
    report = {"card": card, "torch": torch.__version__, "copy_bytes_per_s": bandwidth,
              "matmul_flops_per_s": matmul, "args": vars(args), "runs": []}
    models: dict[str, list[str]] = {}
    for shape, workload in pairs:
        models.setdefault(shape, []).append(workload)
    for shape, workloads in models.items():
        config = dummy_config(shape)
        data = {w: make_workload(GPU_WORKLOADS[w][0], GPU_WORKLOADS[w][1], GPU_WORKLOADS[w][2],
                                 config.vocab_size, args.seed) for w in workloads}
        hf: dict[str, list[dict]] = {}
        if not args.no_hf:  # first, so that its memory is back before the engine sizes its pool
            for w in workloads:
                prompts, outs = data[w]
                hf[w] = []
                for batch, count, cap in (HF_RUNS_8B if shape == "llama-3.1-8b" else HF_RUNS)[w]:
                    cap = args.hf_output_cap or cap
                    capped = [min(o, cap) for o in outs] if cap else outs
                    r = _gpu_transformers(config, prompts, capped, batch, min(count, len(prompts)), device)
                    r["output_cap"] = cap
                    hf[w].append(r)
                    print(f"  {shape} ({w}) transformers batch {batch}: {r['prompts']} prompts, "
                          f"output cap {cap}, {r['tokens_per_s']:.0f} tok/s", flush=True)
        t0 = time.perf_counter()
        llm = LLM(shape, device=device, dtype="bfloat16", load_format="dummy",
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                  overlap_steps=not args.no_overlap)
        engine = llm.engine
        kv_gib = engine.num_blocks * kv_bytes_per_block(engine.info, engine.block_size, engine.dtype) / 2**30
        print(f"  {shape}: engine ready in {time.perf_counter() - t0:.1f} s, KV pool {engine.num_blocks} blocks "
              f"({kv_gib:.1f} GiB), graphs {engine.runner.graphs.sizes if engine.runner.graphs else 'off'}",
              flush=True)
        cost = ModelCost.of(engine.model, engine.info)
        for w in workloads:
            prompts, outs = data[w]
            _gpu_warmup(llm, prompts)
            r = _gpu_engine_run(llm, prompts, outs, Roofline(cost, bandwidth, matmul))
            best = max((h["tokens_per_s"] for h in hf.get(w, [])), default=None)
            r.update(model=shape, workload=w, kv_blocks=engine.num_blocks, kv_gib=kv_gib,
                     max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                     cuda_graphs=not args.enforce_eager, overlap_steps=not args.no_overlap,
                     transformers=hf.get(w, []),
                     ratio_to_best_transformers=(r["tokens_per_s"] / best) if best else None)
            report["runs"].append(r)
            print(f"  {shape} ({w}): {r['output_tokens']} tokens in {r['seconds']:.1f} s = "
                  f"{r['tokens_per_s']:.0f} tok/s; roofline {r['roofline_seconds']:.1f} s "
                  f"({r['roofline_over_measured']:.2f} of measured); {r['steps']} steps, "
                  f"{r['graph_replays']} graph replays, {r['preemptions']} preemptions; host: "
                  f"{r['seconds_in_execute']:.1f} s launching, {r['seconds_waiting_for_tokens']:.1f} s waiting for tokens "
                  f"(waits for the GPU), {r['seconds_elsewhere']:.1f} s elsewhere", flush=True)
            if args.json:  # after every run: a later one may not finish inside the call's limit
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=2)
        del llm, engine
        gc.collect()
        torch.cuda.empty_cache()

    print(f"\n{card}, bf16, dummy weights; copy {bandwidth / 1e9:.0f} GB/s, matmul {matmul / 1e12:.0f} TFLOP/s")
    print(f"{'model':<14} {'wl':<3} {'engine tok/s':>12} {'hf tok/s (batch)':>22} {'x hf':>6} "
          f"{'roofline s':>10} {'measured s':>10} {'roof/meas':>9}")
    for r in report["runs"]:
        hfs = ", ".join(f"{h['tokens_per_s']:.0f} ({h['batch_size']})" for h in r["transformers"]) or "-"
        ratio = f"{r['ratio_to_best_transformers']:.2f}" if r["ratio_to_best_transformers"] else "-"
        print(f"{r['model']:<14} {r['workload']:<3} {r['tokens_per_s']:>12.0f} {hfs:>22} {ratio:>6} "
              f"{r['roofline_seconds']:>10.2f} {r['seconds']:>10.2f} {r['roofline_over_measured']:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", help="dummy-weight model shape (engine.loader.DUMMY_SHAPES)")
    ap.add_argument("--num-layers", type=int, default=None, help="override the layer count (quick runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, nargs=2, default=(64, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(64, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--hf-batch-size", type=int, nargs="+", default=[8, 32],
                    help="CPU: transformers static batch sizes to measure (each is one baseline)")
    ap.add_argument("--hf-prompts", type=int, default=None, help="run transformers on the first N prompts only")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default 2048 (CPU), 8192 (CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--suite", default="gpu-small", choices=sorted(GPU_SUITES),
                    help="CUDA only: which (model, workload) pairs to run")
    ap.add_argument("--runs", default=None,
                    help="CUDA only: explicit pairs instead of a suite, e.g. qwen3-0.6b:c,llama-3.1-8b:a")
    ap.add_argument("--max-model-len", type=int, default=2048, help="CUDA only")
    ap.add_argument("--enforce-eager", action="store_true", help="CUDA only: no CUDA graphs")
    ap.add_argument("--no-overlap", action="store_true",
                    help="CUDA only: read each step's tokens back before launching the next")
    ap.add_argument("--no-hf", action="store_true", help="CUDA only: skip the transformers baseline")
    ap.add_argument("--hf-output-cap", type=int, default=None,
                    help="CUDA only: cap every transformers run's outputs at this many tokens (per-token rate)")
    ap.add_argument("--peer", choices=["vllm"], default=None,
                    help="CUDA only: tokenmill and vLLM side by side (benchmarks/versus.py); --json passes on")
    args = ap.parse_args()
    if args.peer:
        from versus import main as versus_main

        raise SystemExit(versus_main(["--json", args.json] if args.json else []))
    if args.max_num_batched_tokens is None:
        args.max_num_batched_tokens = 8192 if args.device.startswith("cuda") else 2048
    if args.device.startswith("cuda"):
        run_gpu_suite(args)
        return

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
        results = [run_transformers(tmp, prompts, outs, args, b) for b in args.hf_batch_size]
        results.append(run_engine(tmp, prompts, outs, args))
    eng = results[-1]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name()}"
    print(f"model shape {args.shape} ({config.num_hidden_layers} layers), {args.dtype}, {args.device}; {machine}")
    print(f"{args.num_prompts} prompts, input {args.input_len[0]}..{args.input_len[1]}, "
          f"output {args.output_len[0]}..{args.output_len[1]} (forced), seed {args.seed}")
    for r in results:
        print(f"  {r.name:<48} {r.prompts:>5} prompts {r.output_tokens:>7} tokens "
              f"{r.seconds:>8.2f} s {r.tokens_per_s:>9.1f} tok/s")
    ratios = {r.name: eng.tokens_per_s / r.tokens_per_s for r in results[:-1]}
    for name, ratio in ratios.items():
        print(f"  engine / {name}: {ratio:.2f}x")
    ratio = min(ratios.values())
    print(f"  engine / best transformers: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine, "ratio": ratio, "ratios": ratios,
                       "results": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
