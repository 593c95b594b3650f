"""tokenmill against vLLM on one card: the same prompts, settings and sampling, side by side.

    python benchmarks/versus.py --json versus.json            # every group; vLLM too if installed
    python benchmarks/throughput.py --device cuda --peer vllm   # the same, through throughput.py
    python benchmarks/versus.py --groups qwen-c --engines tokenmill --profile
    python benchmarks/versus.py --merge a.json b.json          # one table from separate calls

Each (engine, group) runs in a child process of its own (clean GPU memory; a crash or a timeout
loses only that group): the child builds one engine for the group's model shape and batch limits,
warms it up, and times one `generate` over the whole workload for each sampling setting of the
group, with the prefix cache emptied before each (the workload's prompts are the same in every
setting). vLLM runs only if it imports from /tmp/peer-site (`--peer-site`); its child is started
with that directory first on PYTHONPATH.

Workloads: dummy (random) bf16 weights of real model shapes, forced output lengths (EOS ignored),
prompt ids from numpy.random.RandomState(0) as the peer bundle's README gives them:
  a: 1,000 prompts of 512 tokens, 256 output tokens each;
  c: 256 prompts, input and output lengths uniform in 100..1024.
Both engines: max_model_len 2048, block size 16, prefix caching on, gpu_memory_utilization 0.9,
CUDA graphs on, the group's max_num_seqs and max_num_batched_tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name: sampling fields (as both engines name them); "seeded": one seed per request (its index)
SAMPLINGS: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "top-p": {"temperature": 1.0, "top_p": 0.9},
    "top-k/p/min-p, seeded": {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "min_p": 0.05, "seeded": True},
}


@dataclass
class Group:
    """One engine build: a model shape, a workload, batch limits and the samplings timed in it."""

    name: str
    shape: str
    workload: str
    max_num_seqs: int
    max_num_batched_tokens: int
    samplings: list[str] = field(default_factory=list)


GROUPS = [
    Group("llama-a", "llama-3.1-8b", "a", 256, 8192, ["greedy", "top-p", "top-k/p/min-p, seeded"]),
    Group("llama-a-1024", "llama-3.1-8b", "a", 1024, 16384, ["greedy"]),
    Group("qwen-c", "qwen3-0.6b", "c", 256, 8192, ["greedy", "top-p", "top-k/p/min-p, seeded"]),
]
MODEL_NAMES = {"llama-3.1-8b": "Llama-3.1-8B", "qwen3-0.6b": "Qwen3-0.6B"}
MAX_MODEL_LEN = 2048
GPU_MEMORY_UTILIZATION = 0.9


def make_workload(workload: str, vocab: int) -> tuple[list[list[int]], list[int]]:
    """(prompt token ids, forced output lengths), from numpy.random.RandomState(0)."""
    import numpy as np

    rs = np.random.RandomState(0)
    if workload == "a":
        return [row.tolist() for row in rs.randint(10, vocab, size=(1000, 512))], [256] * 1000
    if workload == "c":
        in_lens = rs.randint(100, 1025, 256)
        out_lens = rs.randint(100, 1025, 256)
        return [rs.randint(10, vocab, size=int(n)).tolist() for n in in_lens], [int(n) for n in out_lens]
    raise ValueError(f"unknown workload {workload!r}")


def sampling_fields(name: str, index: int) -> dict:
    fields = dict(SAMPLINGS[name])
    seeded = fields.pop("seeded", False)
    if seeded:
        fields["seed"] = index
    return fields


# -- tokenmill -------------------------------------------------------------------------------------


def run_tokenmill(group: Group, args, emit) -> list[dict]:
    import torch

    from engine import LLM, SamplingParams
    from engine.loader import dummy_config
    from engine.readback import SampledStep

    vocab = dummy_config(group.shape).vocab_size
    prompts, outs = make_workload(group.workload, vocab)
    model, device = group.shape, "cuda"
    if args.smoke:  # a check of this script on any machine: 2 layers, a few short requests, CPU
        model, device = dummy_config(group.shape, num_hidden_layers=2), "cpu"
        prompts, outs = [p[:24] for p in prompts[:5]], [min(o, 6) for o in outs[:5]]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    llm = LLM(model, device=device, dtype="bfloat16", load_format="dummy",
              max_num_seqs=group.max_num_seqs, max_num_batched_tokens=group.max_num_batched_tokens,
              max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=GPU_MEMORY_UTILIZATION)
    init_s = time.perf_counter() - t0
    engine, runner = llm.engine, llm.engine.runner
    # Warm-up on the workload's own prompts at several batch sizes, greedy and sampled: Triton
    # compiles a kernel variant the first time it meets a new launch shape (prefill chunk lengths
    # among them), and that must not happen inside the timing. The cached blocks are dropped below.
    for n in (1, 3, 17, 64, 300) if not args.smoke else (2,):
        llm.generate(prompts[:n], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for name in group.samplings:
        for n in (3, 64) if not args.smoke else (2,):
            llm.generate(prompts[:n], [SamplingParams(max_tokens=8, ignore_eos=True, **sampling_fields(name, i))
                                       for i in range(n)])
    sync()

    execute, read = runner.execute, SampledStep.read
    clock = {"execute": 0.0, "wait": 0.0}

    def timed_execute(*a, **kw):
        t = time.perf_counter()
        try:
            return execute(*a, **kw)
        finally:
            clock["execute"] += time.perf_counter() - t

    def timed_read(step):
        t = time.perf_counter()
        try:
            return read(step)
        finally:
            clock["wait"] += time.perf_counter() - t

    results = []
    for name in group.samplings:
        engine.kv.reset_prefix_cache()  # the same prompts ran before: nothing may be served from cache
        params = [SamplingParams(max_tokens=o, ignore_eos=True, **sampling_fields(name, i))
                  for i, o in enumerate(outs)]
        clock.update(execute=0.0, wait=0.0)
        stats0 = engine.stats()
        replays0 = runner.graphs.replays if runner.graphs is not None else 0
        runner.execute, SampledStep.read = timed_execute, timed_read
        try:
            sync()
            start = time.perf_counter()
            done = llm.generate(prompts, params)
            sync()
            secs = time.perf_counter() - start
        finally:
            runner.execute, SampledStep.read = execute, read
        stats = engine.stats()
        produced = sum(len(r.outputs[0].token_ids) for r in done)
        results.append({
            "engine": "tokenmill", "sampling": name, "output_tokens": produced, "seconds": round(secs, 3),
            "tok_s": round(produced / secs, 1),
            "wrong_length_outputs": sum(len(r.outputs[0].token_ids) != o for r, o in zip(done, outs)),
            "steps": stats.steps - stats0.steps,
            "graph_replays": (runner.graphs.replays - replays0) if runner.graphs is not None else 0,
            "preemptions": stats.preemptions - stats0.preemptions, "peak_batch": stats.peak_batch_size,
            "host_seconds_in_execute": round(clock["execute"], 2),
            "host_seconds_waiting_for_tokens": round(clock["wait"], 2),
            "host_seconds_elsewhere": round(secs - clock["execute"] - clock["wait"], 2),
            "kv_blocks": engine.num_blocks, "init_seconds": round(init_s, 1),
            "graph_sizes": len(runner.graphs.sizes) if runner.graphs is not None else 0,
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        })
        print(json.dumps(results[-1]), flush=True)
        emit(results)
    if args.profile and device == "cuda":
        results.append(_profile_tokenmill(llm, group, prompts, vocab))
        emit(results)
    return results


def _profile_tokenmill(llm, group: Group, prompts, vocab: int) -> dict:
    """Kernel times of a decode-heavy run (a full batch of the workload's prompts, 48 tokens each),
    greedy and top-p, from the PyTorch profiler: where the GPU's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams

    out = {"engine": "tokenmill", "sampling": "profile", "tables": {}}
    batch = prompts[: group.max_num_seqs]
    for name in ("greedy", "top-p"):
        llm.engine.kv.reset_prefix_cache()
        params = SamplingParams(max_tokens=48, ignore_eos=True, **sampling_fields(name, 0))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(batch, params)
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if dev > 0:
                rows.append((e.key[:90], e.count, dev / 1e3))
        rows.sort(key=lambda r: -r[2])
        total = sum(r[2] for r in rows)
        out["tables"][name] = {"gpu_ms_total": round(total, 1),
                               "kernels": [{"name": k, "calls": c, "gpu_ms": round(ms, 2)} for k, c, ms in rows[:30]]}
        print(f"-- profile {group.name} {name}: {total:.0f} ms of GPU time; top kernels:", flush=True)
        for k, c, ms in rows[:14]:
            print(f"   {ms:9.1f} ms {100 * ms / total:5.1f}% {c:7d}x  {k}", flush=True)
    return out


# -- vLLM (our own runner of its public API) -------------------------------------------------------


def run_vllm(group: Group, args, emit) -> list[dict]:
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1"),
                       ("DO_NOT_TRACK", "1")):
        os.environ.setdefault(key, value)
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # tokenmill's packages go last on the path (only the model shapes are read from them), so that
    # none of their names can stand in for a package vLLM looks for.
    sys.path.append(ROOT)
    from engine.loader import DUMMY_SHAPES

    config = dict(DUMMY_SHAPES[group.shape])
    model_dir = os.path.join(tempfile.gettempdir(), "versus-models", group.shape)
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    vocab = config["vocab_size"]
    prompts, outs = make_workload(group.workload, vocab)
    if args.smoke:
        prompts, outs = [p[:24] for p in prompts[:5]], [min(o, 6) for o in outs[:5]]
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_num_seqs=group.max_num_seqs, max_num_batched_tokens=group.max_num_batched_tokens,
              max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
              enable_prefix_caching=True, seed=0)
    init_s = time.perf_counter() - t0

    def params(name: str, index: int, max_tokens: int):
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                              **sampling_fields(name, index))

    for name in group.samplings:  # warm-up: each sampling path once, outside the timing, as tokenmill's
        warm = [TokensPrompt(prompt_token_ids=p) for p in prompts[:64]]
        llm.generate(warm, [params(name, i, 8) for i in range(len(warm))], use_tqdm=False)
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    results = []
    for name in group.samplings:
        reset = bool(llm.reset_prefix_cache())
        sps = [params(name, i, o) for i, o in enumerate(outs)]
        start = time.perf_counter()
        done = llm.generate(requests, sps, use_tqdm=False)
        secs = time.perf_counter() - start
        produced = sum(len(o.outputs[0].token_ids) for o in done)
        results.append({
            "engine": "vllm", "sampling": name, "output_tokens": produced, "seconds": round(secs, 3),
            "tok_s": round(produced / secs, 1),
            "wrong_length_outputs": sum(len(o.outputs[0].token_ids) != n for o, n in zip(done, outs)),
            "prefix_cache_reset": reset, "init_seconds": round(init_s, 1), "vllm": vllm.__version__,
            "torch": torch.__version__,
        })
        print(json.dumps(results[-1]), flush=True)
        emit(results)
    return results


# -- the parent ------------------------------------------------------------------------------------


def _peer_available(site: str) -> bool:
    return os.path.isdir(os.path.join(site, "vllm"))


_RUNNING: list[subprocess.Popen] = []  # the child now running, for the stop handler


def _stop(signum, frame) -> None:
    """On SIGTERM or SIGINT: end the running child's whole session (vLLM's helpers with it), which
    would otherwise outlive this process and hold the GPU."""
    for proc in _RUNNING:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


def _child(engine: str, group: Group, args) -> list[dict]:
    """Runs one (engine, group) in a child process; its results, or one error row."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", engine, "--groups", group.name, "--_out", out]
    for flag in ("profile", "smoke"):
        if getattr(args, flag):
            cmd.append(f"--{flag}")
    env = dict(os.environ)
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if engine == "vllm":  # the peer first, and not tokenmill's root (see run_vllm)
        paths = [args.peer_site] + [p for p in inherited if os.path.abspath(p) != ROOT]
    else:
        paths = [ROOT] + inherited
    env["PYTHONPATH"] = os.pathsep.join(paths)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # a timeout ends vLLM's helpers too
    _RUNNING.append(proc)
    try:
        code = proc.wait(timeout=args.timeout or None)
    except subprocess.TimeoutExpired:
        code = "timeout"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        _RUNNING.remove(proc)
    try:
        with open(out) as f:
            rows = json.load(f)  # every run the child finished, even if it was stopped later
    except (OSError, ValueError):
        rows = []
    finally:
        os.remove(out)
    if code != 0:
        rows.append({"engine": engine, "sampling": None, "error": f"child exit {code}",
                     "wall_s": round(time.perf_counter() - t, 1)})
    for r in rows:
        r.update(group=group.name, model=group.shape, workload=group.workload,
                 max_num_seqs=group.max_num_seqs, max_num_batched_tokens=group.max_num_batched_tokens,
                 child_wall_s=round(time.perf_counter() - t, 1))
    return rows


def _card() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _commit() -> str:
    path = os.path.join(ROOT, "COMMIT")
    if os.path.exists(path):
        return open(path).read().strip()
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def print_table(runs: list[dict]) -> None:
    """The issue's table: per workload and sampling, tokenmill and vLLM output tok/s and the ratio."""
    by_key: dict[tuple, dict] = {}
    for r in runs:
        if r.get("sampling") in (None, "profile"):
            continue
        key = (r["group"], r["sampling"])
        by_key.setdefault(key, {})[r["engine"]] = r
    print("\n| workload | tokenmill tok/s | vLLM tok/s | tokenmill / vLLM |")
    print("| --- | ---: | ---: | ---: |")
    order = {g.name: i for i, g in enumerate(GROUPS)}
    for (gname, sampling), engines in sorted(by_key.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1] != "greedy")):
        any_row = next(iter(engines.values()))
        label = (f"{MODEL_NAMES.get(any_row['model'], any_row['model'])} ({any_row['workload']}), {sampling}, "
                 f"{any_row['max_num_seqs']:,} seqs / {any_row['max_num_batched_tokens']:,} batched")
        tm, vl = engines.get("tokenmill"), engines.get("vllm")
        a = f"{tm['tok_s']:,.0f}" if tm and "tok_s" in tm else "-"
        b = f"{vl['tok_s']:,.0f}" if vl and "tok_s" in vl else "-"
        ratio = f"{tm['tok_s'] / vl['tok_s']:.2f}" if tm and vl and "tok_s" in tm and "tok_s" in vl else "-"
        print(f"| {label} | {a} | {b} | {ratio} |")
    errors = [r for r in runs if "error" in r]
    for r in errors:
        print(f"error: {r['engine']} {r['group']}: {r['error']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", default=",".join(g.name for g in GROUPS),
                    help="comma-separated, from: " + ", ".join(g.name for g in GROUPS))
    ap.add_argument("--engines", default=None,
                    help="tokenmill, vllm or both (default: both if vLLM is in --peer-site, else tokenmill)")
    ap.add_argument("--peer-site", default="/tmp/peer-site", help="where the carried vLLM is installed")
    ap.add_argument("--json", default=None, help="write every run here (rewritten after each child)")
    ap.add_argument("--profile", action="store_true", help="tokenmill: also profile a decode-heavy run")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per child (0: none)")
    ap.add_argument("--smoke", action="store_true",
                    help="check the script itself: tokenmill on the CPU with 2 layers and a few short requests")
    ap.add_argument("--merge", nargs="+", default=None, help="print one table from these JSON files and exit")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.merge:
        runs = [r for path in args.merge for r in json.load(open(path))["runs"]]
        print_table(runs)
        return 0
    known = {g.name: g for g in GROUPS}
    unknown = [n for n in args.groups.split(",") if n not in known]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; known: {', '.join(known)}")
    groups = [known[n] for n in args.groups.split(",")]
    if args._child:
        def emit(rows: list[dict]) -> None:  # after every run: a timeout later loses none of them
            with open(args._out + ".tmp", "w") as f:
                json.dump(rows, f)
            os.replace(args._out + ".tmp", args._out)

        emit((run_vllm if args._child == "vllm" else run_tokenmill)(groups[0], args, emit))
        return 0

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.engines:
        engines = args.engines.split(",")
    else:
        engines = ["tokenmill"] + (["vllm"] if _peer_available(args.peer_site) else [])
    if "vllm" in engines and not _peer_available(args.peer_site):
        print(f"vLLM is not installed in {args.peer_site}: tokenmill only", flush=True)
        engines = [e for e in engines if e != "vllm"]
    report = {"date": datetime.date.today().isoformat(), "card": _card(), "commit": _commit(),
              "settings": {"max_model_len": MAX_MODEL_LEN, "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
                           "block_size": 16, "prefix_caching": True, "dtype": "bfloat16", "weights": "dummy",
                           "samplings": SAMPLINGS},
              "runs": []}
    print(f"{report['date']} {report['card']} commit {report['commit'][:12]}; engines {engines}", flush=True)
    rc = 0
    for group in groups:
        for engine in engines:
            rows = _child(engine, group, args)
            rc |= any("error" in r for r in rows)
            report["runs"] += rows
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
    print_table(report["runs"])
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
