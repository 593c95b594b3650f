"""The worker's host time per job (issue 21): where a `tokenmill worker` process spends its CPU on
short jobs, thread by thread, against the engine alone on the same jobs. A benchmark, not a test.

With a small model the engine is host-bound (its per-step Python work sets the pace, as SmolLM2-135M
on an H200), so every millisecond of GIL-holding Python that the job path spends per job, in any
thread of the worker, slows the engine loop's thread. This measures that cost on a CPU:

- the engine alone: `LLM.generate` on the jobs, its CPU seconds and steps;
- the queue path: the same jobs stored, sent in pipelined rounds (as `benchmarks/queue_overhead_gpu.py`
  sends them), run by one worker process (`--concurrency` task threads, `--max-num-seqs` the same);
  the worker's CPU seconds per thread group, read from /proc (the worker runs under a shim that
  gives each Python thread its name at the OS level), and its own path timings (workers/path_timings.py).

Everything is local: a private redis-server, a private PostgreSQL cluster (tests/services.py; or
SQLite with ``--store sqlite``), a tiny random model with the SmolLM2 tokenizer (tests/tiny_models.py).

    python benchmarks/worker_job_cost.py --jobs 2000 --json /tmp/wjc.json
    python benchmarks/worker_job_cost.py --jobs 1000 --profile /tmp/prof   # cProfile per thread group
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path.append(str(REPO / "tests"))

SEND_CHUNK = 1000
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the shim the worker runs under -------------------------------------------------------------

def shim(argv: list[str], profile_dir: str | None, switch_interval: float | None) -> None:
    """Runs `tokenmill worker` with each Python thread named at the OS level (/proc/.../comm), and
    with ``profile_dir``, a cProfile per thread, summed per thread group at exit."""
    import atexit
    import ctypes
    import threading

    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)

    libc = ctypes.CDLL(None)
    profiles: list[tuple[str, Any]] = []
    orig_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        libc.prctl(15, group_of(self.name).encode()[:15], 0, 0, 0)  # PR_SET_NAME
        if profile_dir is None:
            orig_run(self)
            return
        import cProfile

        p = cProfile.Profile()
        profiles.append((group_of(self.name), p))
        p.enable()
        try:
            orig_run(self)
        finally:
            p.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    if profile_dir is not None:
        import cProfile
        import pstats

        main = cProfile.Profile()
        profiles.append(("main", main))

        def dump() -> None:
            main.disable()
            by_group: dict[str, pstats.Stats] = {}
            for group, p in profiles:
                p.snapshot_stats()
                if not p.stats:
                    continue
                if group in by_group:
                    by_group[group].add(p)
                else:
                    by_group[group] = pstats.Stats(p)
            for group, st in by_group.items():
                st.dump_stats(os.path.join(profile_dir, f"{group}.prof"))

        atexit.register(dump)
        main.enable()
    sys.argv = ["tokenmill", *argv]
    from tokenmill.cli import main as cli_main

    cli_main()


def group_of(name: str) -> str:
    """A thread's group: Celery's pool threads are ``tasks``; named threads keep their name."""
    if name.startswith("ThreadPoolExecutor"):
        return "tasks"
    if name.startswith("Thread-"):
        return "unnamed"
    return name.split("-")[0] if name.startswith("Dummy") else name


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process's threads, summed per thread name."""
    out: dict[str, float] = defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[comm or "?"] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return dict(out)


# -- the benchmark ------------------------------------------------------------------------------

def workload(n: int, seed: int, vocab: int, prompt: tuple[int, int], output: tuple[int, int]) -> tuple[list, list]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(*prompt))] for _ in range(n)]
    return prompts, [rng.randint(*output) for _ in range(n)]


def engine_alone(model_dir: Path, prompts: list, outs: list, max_num_seqs: int) -> dict[str, float]:
    from engine import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=max_num_seqs)
    llm.generate([p[:8] for p in prompts[:3]], SamplingParams(max_tokens=2, temperature=0))
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outs]
    steps0 = llm.engine.stats().steps
    cpu0, start = time.process_time(), time.perf_counter()
    res = llm.generate(prompts, params)
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu0
    steps = llm.engine.stats().steps - steps0
    return {"seconds": secs, "cpu_s": cpu, "tokens": sum(len(r.token_ids) for r in res), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--prompt", default="64,256", help="prompt tokens, min,max")
    ap.add_argument("--output", default="16,64", help="output tokens, min,max (forced)")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--store", choices=["postgres", "sqlite"], default="postgres")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-engine-alone", action="store_true")
    ap.add_argument("--profile", default=None, help="folder for cProfile files per thread group (slows the worker)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for the worker process (an experiment)")
    ap.add_argument("--worker-env", action="append", default=[], help="NAME=VALUE for the worker's environment")
    ap.add_argument("--json", default=None)
    ap.add_argument("--shim", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shim is not None:
        shim(args.shim, args.profile, args.switch_interval)
        return

    import redis

    from api.queue import Dispatcher
    from contract.payload import job_payload
    from engine.loader import load_hf_config
    from services import PrivatePostgres, PrivateRedis, require_postgres_bindir
    from store import Store
    from store.migrate import upgrade
    from store.types import JobSpec
    from tiny_models import make_tiny_model
    from tokenmill.builtin_model import fetch_builtin_model

    work = Path(tempfile.mkdtemp(prefix="wjc-"))
    smollm2 = fetch_builtin_model("smollm2-135m-instruct",
                                  Path(os.environ.get("TOKENMILL_CACHE_DIR") or "~/.cache/tokenmill/models").expanduser())
    model_dir = make_tiny_model("llama", work / "model", smollm2)
    vocab = load_hf_config(model_dir).vocab_size
    p_range = tuple(int(x) for x in args.prompt.split(","))
    o_range = tuple(int(x) for x in args.output.split(","))
    prompts, outs = workload(args.jobs, args.seed, vocab, p_range, o_range)  # type: ignore[arg-type]
    alone = None if args.no_engine_alone else engine_alone(model_dir, prompts, outs, args.max_num_seqs)

    rs = PrivateRedis(work).start()
    pg = None
    if args.store == "postgres":
        pg = PrivatePostgres(require_postgres_bindir())
        pg.start()
        db_url = pg.url()
    else:
        db_url = f"sqlite:///{work / 'store.db'}"
    worker = None
    served, host = "bench-model", f"wjc-{uuid.uuid4().hex[:6]}@local"
    try:
        upgrade(db_url)
        store = Store.open(db_url)
        r = redis.Redis.from_url(rs.url)
        dispatcher = Dispatcher(rs.url)
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        log = open(work / "worker.log", "wb")
        env = {**os.environ, "TOKENMILL_DATABASE_URL": db_url, "TOKENMILL_REDIS_URL": rs.url,
               **dict(e.split("=", 1) for e in args.worker_env)}
        cmd = [sys.executable, __file__, *(["--profile", args.profile] if args.profile else []),
               *(["--switch-interval", str(args.switch_interval)] if args.switch_interval else []), "--shim",
               "worker", "--model", str(model_dir), "--served-name", served, "--device", "cpu", "--dtype", "float32",
               "--concurrency", str(args.concurrency), "--max-num-seqs", str(args.max_num_seqs),
               "--hostname", host, "--loglevel", "WARNING"]
        worker = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        key = f"tokenmill:worker:{host}"
        while not r.exists(key):
            if worker.poll() is not None:
                raise SystemExit(f"worker exited with {worker.returncode}; see {log.name}")
            time.sleep(0.2)
        time.sleep(1.0)

        def run(ps: list, os_: list) -> tuple[float, int]:
            tenant = store.keys.create_tenant(f"bench-{uuid.uuid4().hex[:8]}").id
            specs = [JobSpec(model=served, request=job_payload(prompt=p, params={
                "max_tokens": o, "temperature": 0, "ignore_eos": True})) for p, o in zip(ps, os_)]
            ids = [c.id for i in range(0, len(specs), SEND_CHUNK)
                   for c in store.jobs.create_jobs(tenant, specs[i:i + SEND_CHUNK])]
            start = time.perf_counter()
            for i in range(0, len(ids), SEND_CHUNK):
                dispatcher.send_many([(j, served, False) for j in ids[i:i + SEND_CHUNK]])
            while store.jobs.count_jobs(tenant, status=["succeeded", "failed"]) < len(ids):
                time.sleep(0.1)
            secs = time.perf_counter() - start
            return secs, store.jobs.count_jobs(tenant, status=["succeeded"])

        warm, wouts = workload(64, args.seed + 1, vocab, p_range, (2, 4))  # type: ignore[arg-type]
        run(warm, wouts)
        time.sleep(2.5)  # the worker publishes its figures about every second
        before_fig, before_cpu = r.hgetall(key), thread_cpu(worker.pid)
        secs, ok = run(prompts, outs)
        time.sleep(2.5)
        after_fig, after_cpu = r.hgetall(key), thread_cpu(worker.pid)
        store.close()
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(120)
        rs.kill()
        if pg is not None:
            pg.destroy()

    from workers.path_timings import stage_deltas

    stages = stage_deltas({k.decode(): v.decode() for k, v in before_fig.items()},
                          {k.decode(): v.decode() for k, v in after_fig.items()})
    cpu = {g: round(after_cpu.get(g, 0.0) - before_cpu.get(g, 0.0), 2) for g in sorted(after_cpu)}
    cpu = {g: v for g, v in cpu.items() if v > 0}
    total_cpu = sum(cpu.values())
    loop_cpu = cpu.get("engine-loop", 0.0)
    steps = stages["loop_step"]["n"]
    import torch

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"load {os.getloadavg()[0]:.2f}",
        "jobs": args.jobs, "prompt": args.prompt, "output": args.output, "store": args.store,
        "concurrency": args.concurrency, "engine_alone": alone,
        "queue": {"seconds": secs, "succeeded": ok, "jobs_per_s": args.jobs / secs,
                  "tokens_per_s": sum(outs) / secs, "steps": steps,
                  "step_ms": 1000 * stages["loop_step"]["s"] / max(steps, 1)},
        "worker_cpu_s": cpu, "worker_cpu_ms_per_job": 1000 * total_cpu / args.jobs,
        "outside_loop_cpu_ms_per_job": 1000 * (total_cpu - loop_cpu) / args.jobs,
        "stages": stages,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}, indent=1))
    for stage, d in stages.items():
        if d["n"]:
            print(f"  {stage:10s} n={d['n']:7.0f}  mean {1000 * d['s'] / d['n']:8.2f} ms  total {d['s']:8.2f} s")
    if alone:
        print(f"queue / alone (tok/s): {100 * (sum(outs) / secs) / (alone['tokens'] / alone['seconds']):.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
