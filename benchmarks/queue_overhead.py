"""Queue overhead: the same workload through Redis + Celery + a worker process vs the engine alone,
same model, same machine, one run. A benchmark, not a test.

Throughput: N prompts with forced output lengths, all submitted at once; the queue path's rate is
completion tokens over the wall time from the first send to the last result stored.
Latency: with the worker idle, single one-token jobs one after another; the added latency is the
time from the send to the engine receiving the request (the worker's `queue_ms`).

Needs Redis and PostgreSQL (defaults: 127.0.0.1:6379 db 12, 127.0.0.1:5432 user postgres).

    python benchmarks/queue_overhead.py                   # built-in SmolLM2-135M on CPU
    python benchmarks/queue_overhead.py --num-prompts 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def workload(n: int, seed: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(32, 128))] for _ in range(n)]
    return prompts, [rng.randint(32, 96) for _ in range(n)]


def engine_alone(model: str, prompts, outs, max_num_seqs: int) -> tuple[float, float]:
    from engine import LLM, SamplingParams

    llm = LLM(model, dtype="float32", max_num_seqs=max_num_seqs)
    llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outs]
    start = time.perf_counter()
    res = llm.generate(prompts, params)
    secs = time.perf_counter() - start
    return sum(len(r.token_ids) for r in res) / secs, secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--latency-jobs", type=int, default=40)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import redis
    from sqlalchemy import create_engine, text

    from contract.celery_app import QueueConfig, make_celery, send_job
    from contract.payload import job_payload
    from engine.loader import load_hf_config
    from store import Store
    from store.migrate import upgrade
    from store.types import JobSpec
    from tokenmill.builtin_model import prepare_model
    from tokenmill.settings import Settings

    model_dir = prepare_model(args.model, Settings.from_env().model_cache_dir)  # fetched once if built-in
    vocab = load_hf_config(model_dir).vocab_size
    prompts, outs = workload(args.num_prompts, args.seed, vocab)
    served = "bench-model"

    alone_tps, alone_secs = engine_alone(str(model_dir), prompts, outs, args.max_num_seqs)

    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    dbname = f"tokenmill_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{dbname}"'))
    db_url = args.postgres.rsplit("/", 1)[0] + "/" + dbname
    r = redis.Redis.from_url(args.redis_url)
    r.flushdb()
    worker = None
    try:
        upgrade(db_url)
        store = Store.open(db_url)
        app = make_celery(QueueConfig(redis_url=args.redis_url))
        host = f"bench-{uuid.uuid4().hex[:6]}@local"
        log = open(Path(tempfile.gettempdir()) / "queue_overhead_worker.log", "wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.cli", "worker", "--model", str(model_dir), "--served-name", served,
             "--device", "cpu", "--dtype", "float32", "--concurrency", str(args.max_num_seqs),
             "--max-num-seqs", str(args.max_num_seqs), "--hostname", host, "--loglevel", "WARNING"],
            env={**os.environ, "TOKENMILL_DATABASE_URL": db_url, "TOKENMILL_REDIS_URL": args.redis_url},
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while not r.exists(f"tokenmill:worker:{host}"):
            if worker.poll() is not None:
                raise SystemExit(f"worker exited with {worker.returncode}; see {log.name}")
            time.sleep(0.2)
        time.sleep(1.0)

        def run(payloads):
            # A tenant per run, so one cheap count tells when the run is over.
            tenant = store.keys.create_tenant(f"bench-{uuid.uuid4().hex[:8]}")
            ids = [c.id for c in store.jobs.create_jobs(tenant.id, [JobSpec(model=served, request=p) for p in payloads])]
            start = time.perf_counter()
            for i in ids:
                send_job(app, i, served)
            while store.jobs.count_jobs(tenant.id, status=["succeeded", "failed"]) < len(ids):
                time.sleep(0.1)  # coarse polling keeps the client off the CPU the worker needs
            return tenant, ids, time.perf_counter() - start

        run([job_payload(prompt=prompts[0][:8], params={"max_tokens": 2, "temperature": 0})])  # warm-up
        tenant, ids, queue_secs = run([job_payload(prompt=p, params={"max_tokens": o, "temperature": 0, "ignore_eos": True})
                               for p, o in zip(prompts, outs)])
        tokens = sum(store.jobs.get_usage(tenant.id, i).completion_tokens for i in ids)
        queue_tps = tokens / queue_secs

        lat = []
        for k in range(args.latency_jobs):
            tenant, [jid], _ = run([job_payload(prompt=prompts[k % len(prompts)][:16], params={"max_tokens": 1, "temperature": 0})])
            lat.append(store.jobs.get_usage(tenant.id, jid).queue_ms)
        store.close()
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(60)
        r.flushdb()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))

    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lat.sort()
    result = {
        "model": args.model, "prompts": args.num_prompts, "machine": machine,
        "engine_tokens_per_s": alone_tps, "engine_seconds": alone_secs,
        "queue_tokens_per_s": queue_tps, "queue_seconds": queue_secs, "ratio": queue_tps / alone_tps,
        "added_latency_ms_p50": statistics.median(lat), "added_latency_ms_p90": lat[int(0.9 * (len(lat) - 1))],
    }
    print(f"{args.model}, {args.num_prompts} prompts (in 32..128, out 32..96 forced); {machine}")
    print(f"  engine alone          {alone_tps:9.1f} tok/s ({alone_secs:.1f} s)")
    print(f"  Redis+Celery+worker   {queue_tps:9.1f} tok/s ({queue_secs:.1f} s)  = {100 * result['ratio']:.1f}% of the engine")
    print(f"  added latency (send -> engine), idle worker: p50 {result['added_latency_ms_p50']:.1f} ms, "
          f"p90 {result['added_latency_ms_p90']:.1f} ms over {len(lat)} jobs")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
