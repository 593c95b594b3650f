"""Prefix-aware routing, measured (docs/routing.md): two CPU workers, jobs that share a handful of
long system prompts, sent with routing on and off; for each run, the prompt tokens the workers'
prefix caches served, tokens per second, and job latency.

Everything runs here: an embedded Redis, a SQLite store (or ``--database-url``), and for each run
two fresh `tokenmill worker` processes on the CPU (cold caches). The jobs are sent as the API's
submitter sends them, by `api.queue.Dispatcher.send_many` in groups of ``--group``, with prefix
routing on (``routed``) or off (``shared``): HTTP is left out, it is the same for both.

Workload: ``--prompts`` system prompts of about ``--prefix-tokens`` tokens each, ``--jobs-per-prompt``
jobs each with a short question after it, interleaved (prompt 0, 1, ..., 7, 0, 1, ...), all sent at
once, ``--max-tokens`` output tokens each (greedy).

    .venv/bin/python benchmarks/prefix_routing.py                            # 8 x 60 jobs, SmolLM2-135M
    .venv/bin/python benchmarks/prefix_routing.py --jobs-per-prompt 20 --num-kv-blocks 256

``--num-kv-blocks`` sizes each worker's KV cache (0: from memory, about 1,450 blocks of SmolLM2 on
the CPU, enough for every prompt on both workers); a smaller cache shows what routing saves once
one worker cannot hold every prefix. Hit rate: cached prompt tokens over the ideal, each prefix's
full KV blocks prefilled once per worker at most (the issue's ideal).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from api.queue import Dispatcher  # noqa: E402
from contract.payload import job_payload  # noqa: E402
from store import Store  # noqa: E402
from store.migrate import upgrade  # noqa: E402
from store.models import Job, Usage  # noqa: E402
from store.types import JobSpec  # noqa: E402
from tokenmill.builtin_model import fetch_builtin_model  # noqa: E402
from tokenmill.redis_embedded import embedded_redis  # noqa: E402

SERVED = "bench-routing"
BLOCK = 16  # the engine's KV block (tokens)
WORDS = ("system assistant answer careful question policy user context detail example response format "
         "clear brief polite accurate source number table summary reason step final check value name "
         "order list item document section rule style tone language reply customer product support").split()


def system_prompts(n: int, tokens: int, tokenizer: Any) -> list[str]:
    """``n`` distinct system prompts of about ``tokens`` tokens (seeded: the same on every run)."""
    out = []
    for i in range(n):
        rng = random.Random(1000 + i)
        words = [f"Instructions set {i}."]
        while len(tokenizer.encode(" ".join(words))) < tokens:
            words.extend(rng.choice(WORDS) for _ in range(20))
        out.append(" ".join(words))
    return out


class Worker:
    def __init__(self, model_dir: Path, name: str, env: dict[str, str], log: Path, kv_blocks: int) -> None:
        self.hostname = f"{name}@bench"
        self.log_path = log
        args = [sys.executable, "-m", "tokenmill.cli", "worker", "--model", str(model_dir), "--served-name", SERVED,
                "--device", "cpu", "--dtype", "float32", "--hostname", self.hostname]
        if kv_blocks:
            args += ["--num-kv-blocks", str(kv_blocks)]
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)

    def wait_ready(self, r: redis.Redis, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"worker exited:\n{self.log_path.read_text()[-3000:]}")
            if r.exists(f"tokenmill:worker:{self.hostname}") and b"ready" in self.log_path.read_bytes():
                time.sleep(1.0)
                return
            time.sleep(0.3)
        raise SystemExit(f"worker not ready:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def one_run(mode: str, args: argparse.Namespace, model_dir: Path, prompts: list[str], db_url: str, redis_url: str,
            root: Path, ideal_per_job: int) -> dict[str, Any]:
    r = redis.Redis.from_url(redis_url)
    r.flushdb()  # no index, no queue left from the run before
    env = {**os.environ, "TOKENMILL_DATABASE_URL": db_url, "TOKENMILL_REDIS_URL": redis_url,
           "PYTHONPATH": str(REPO)}
    workers = [Worker(model_dir, f"{mode}-{k}", env, root / f"{mode}-{k}.log", args.num_kv_blocks) for k in range(2)]
    store = Store.open(db_url)
    dispatcher = Dispatcher(redis_url, prefix_routing=(mode == "routed"))
    try:
        for w in workers:
            w.wait_ready(r)
        tenant = store.keys.create_tenant(f"bench-{mode}-{time.time_ns()}").id
        params = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
        order = [(j, p) for j in range(args.jobs_per_prompt) for p in range(len(prompts))]  # interleaved
        requests = [job_payload(prompt=f"{prompts[p]}\n\nQuestion {j}: what is {j} times {p + 3}?", params=params)
                    for j, p in order]
        ids: list[str] = []
        started = time.time()
        for i in range(0, len(requests), args.group):
            part = requests[i:i + args.group]
            rows = store.jobs.create_jobs(tenant, [JobSpec(model=SERVED, request=q) for q in part])
            got = [row.id for row in rows]
            sent = dispatcher.send_many([(j, SERVED, False) for j in got], requests=part)
            assert sent == len(got), "Redis refused tasks"
            ids += got
        deadline = time.monotonic() + args.timeout
        while True:
            with store.db.read() as s:
                statuses = s.execute(select(Job.status).where(Job.id.in_(ids))).scalars().all()
            done = sum(st in ("succeeded", "failed", "cancelled", "expired") for st in statuses)
            if done == len(ids):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode}: {len(ids) - done} jobs unfinished after {args.timeout}s")
            time.sleep(0.5)
        with store.db.read() as s:
            jobs = s.execute(select(Job).where(Job.id.in_(ids))).scalars().all()
            usage = s.execute(select(Usage).where(Usage.job_id.in_(ids))).scalars().all()
            lat = sorted((j.finished_at - j.created_at).total_seconds() for j in jobs)
            statuses = [j.status for j in jobs]
            by_worker: dict[str, int] = {}
            for j in jobs:
                by_worker[j.worker or "?"] = by_worker.get(j.worker or "?", 0) + 1
            wall = max(j.finished_at for j in jobs).timestamp() - started
            prompt_tokens = sum(u.prompt_tokens for u in usage)
            cached = sum(u.cached_prompt_tokens for u in usage)
            completion = sum(u.completion_tokens for u in usage)
        ideal = (len(ids) - 2 * len(prompts)) * ideal_per_job
        return {
            "mode": mode, "jobs": len(ids), "succeeded": statuses.count("succeeded"), "wall_s": round(wall, 2),
            "prompt_tokens": prompt_tokens, "cached_prompt_tokens": cached,
            "cached_share": round(cached / max(1, prompt_tokens), 4),
            "hit_rate_of_ideal": round(cached / max(1, ideal), 4),
            "prefilled_tokens": prompt_tokens - cached, "completion_tokens": completion,
            "tokens_per_s": round((prompt_tokens + completion) / wall, 1),
            "completion_tokens_per_s": round(completion / wall, 2), "jobs_per_s": round(len(ids) / wall, 2),
            "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
            "jobs_by_worker": by_worker,
        }
    finally:
        for w in workers:
            w.stop()
        dispatcher.close()
        store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prefix-tokens", type=int, default=600)
    ap.add_argument("--jobs-per-prompt", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--group", type=int, default=32, help="jobs per send_many (the API's write group)")
    ap.add_argument("--num-kv-blocks", type=int, default=0, help="KV blocks per worker (0: from memory)")
    ap.add_argument("--modes", default="shared,routed", help="runs, in order: routed and/or shared")
    ap.add_argument("--database-url", default="")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--report", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    cache = Path(os.environ.get("TOKENMILL_CACHE_DIR") or Path.home() / ".cache" / "tokenmill") / "models"
    model_dir = fetch_builtin_model("smollm2-135m-instruct", cache)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = system_prompts(args.prompts, args.prefix_tokens, tokenizer)
    prefix_tokens = [len(tokenizer.encode(p)) for p in prompts]
    ideal_per_job = (min(prefix_tokens) // BLOCK) * BLOCK
    with tempfile.TemporaryDirectory(prefix="tm-routing-") as tmp:
        root = Path(tmp)
        emb = embedded_redis(root / "redis")
        redis_proc = subprocess.Popen(emb.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            r = redis.Redis.from_url(emb.url)
            for _ in range(100):
                try:
                    r.ping()
                    break
                except redis.RedisError:
                    time.sleep(0.1)
            db_url = args.database_url or f"sqlite:///{root / 'tokenmill.db'}"
            upgrade(db_url)
            results = []
            for mode in args.modes.split(","):
                res = one_run(mode, args, model_dir, prompts, db_url, emb.url, root, ideal_per_job)
                print(json.dumps(res), flush=True)
                results.append(res)
        finally:
            redis_proc.terminate()
            redis_proc.wait(10)
    report = {"workload": {"prompts": args.prompts, "prefix_tokens": prefix_tokens,
                           "jobs_per_prompt": args.jobs_per_prompt, "max_tokens": args.max_tokens,
                           "num_kv_blocks": args.num_kv_blocks, "group": args.group},
              "results": results}
    print(json.dumps(report["workload"]))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    return 0 if all(r["succeeded"] == r["jobs"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
