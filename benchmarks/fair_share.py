"""Fair share between tenants on one CPU worker (issue 18): tenant A submits a 2,000-request batch;
10 s later tenant B submits 50 interactive jobs and a 500-request batch. Reported: B's interactive
latency (p50/p99, submission to finish, from the store) against the same 50 jobs on an idle
worker, and both tenants' shares of the tokens processed, per 5 s, while both have bulk work.

Everything runs here: an embedded Redis, a SQLite store, one `tokenmill worker` on the CPU and one
`tokenmill api` (uvicorn), as subprocesses in a temporary directory. The model is a tiny random
Llama with SmolLM2's tokenizer (tests/tiny_models.py; scheduling is what is measured, not the
model), or --model DIR.

    .venv/bin/python benchmarks/fair_share.py [--weight-b 1] [--bulk-a 2000] [--bulk-b 500] \\
        [--interactive-b 50] [--max-tokens 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from sqlalchemy import select  # noqa: E402

from store import Store  # noqa: E402
from store.migrate import upgrade  # noqa: E402
from store.models import Job, Usage  # noqa: E402
from tokenmill.redis_embedded import embedded_redis, free_port  # noqa: E402

ADMIN = "tm-admin-bench"
MODEL = "bench"
BUCKET_S = 5.0


def _wait_for(what: str, check, timeout: float = 300.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def _tiny_model(out: Path) -> Path:
    from tiny_models import make_tiny_model

    from tokenmill.builtin_model import fetch_builtin_model

    cache = Path(os.environ.get("TOKENMILL_CACHE_DIR") or "~/.cache/tokenmill/models").expanduser()
    return make_tiny_model("llama", out, fetch_builtin_model("smollm2-135m-instruct", cache))


def _batch(api: httpx.Client, n: int, tag: str, max_tokens: int) -> str:
    lines = b"".join(json.dumps({"custom_id": f"{tag}{i}", "method": "POST", "url": "/v1/completions",
                                 "body": {"model": MODEL, "prompt": f"Bulk request {tag} {i}: tell me a story",
                                          "max_tokens": max_tokens, "min_tokens": max_tokens,
                                          "ignore_eos": True}}).encode() + b"\n" for i in range(n))
    f = api.post("/v1/files", files={"file": (f"{tag}.jsonl", lines)}, data={"purpose": "batch"}).json()
    b = api.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                      "completion_window": "24h"}).json()
    _wait_for(f"batch {tag} to start", lambda: api.get(f"/v1/batches/{b['id']}").json()["status"] != "validating")
    return str(b["id"])


def _interactive(api: httpx.Client, n: int, max_tokens: int) -> list[str]:
    body = {"model": MODEL, "prompt": "An interactive question: what is two plus two?",
            "params": {"max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True}}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: api.post("/v1/jobs", json=body), range(n)))
    bad = [a.text for a in answers if a.status_code != 202]
    if bad:
        raise SystemExit(f"interactive submissions refused: {bad[:2]}")
    return [a.json()["id"] for a in answers]


def _latencies(store: Store, ids: list[str]) -> list[float]:
    with store.db.read() as s:
        rows = s.execute(select(Job.created_at, Job.finished_at, Job.status).where(Job.id.in_(ids))).all()
    assert all(r[2] == "succeeded" for r in rows), {r[2] for r in rows}
    return sorted((r[1] - r[0]).total_seconds() for r in rows)


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weight-b", type=float, default=1.0, help="tenant B's weight (A's is 1)")
    p.add_argument("--bulk-a", type=int, default=2000)
    p.add_argument("--bulk-b", type=int, default=500)
    p.add_argument("--interactive-b", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=16, help="tokens each request writes")
    p.add_argument("--delay", type=float, default=10.0, help="seconds between A's batch and B's work")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: a tiny random Llama)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, store)")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tm-fair-"))
    procs: list[subprocess.Popen] = []
    try:
        model_dir = args.model or _tiny_model(tmp / "model")
        redis = embedded_redis(tmp / "redis")
        procs.append(subprocess.Popen(redis.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        db_url = f"sqlite:///{tmp / 'tm.db'}"
        upgrade(db_url)
        store = Store.open(db_url)
        env = {**os.environ, "TOKENMILL_DATABASE_URL": db_url, "TOKENMILL_REDIS_URL": redis.url,
               "TOKENMILL_SERVED_MODELS": f"{MODEL}={model_dir}", "TOKENMILL_ADMIN_KEY": ADMIN,
               "PYTHONPATH": str(REPO)}
        worker_log = open(tmp / "worker.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "worker", "--model", str(model_dir),
                                       "--served-name", MODEL, "--device", "cpu", "--dtype", "float32",
                                       "--hostname", "bench@fair"], env=env, stdout=worker_log,
                                      stderr=subprocess.STDOUT))
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "tokenmill.cli_api:make_app", "--factory",
                                       "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "api.log", "wb")))
        url = f"http://127.0.0.1:{port}"

        def api_up() -> bool:
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for("the API", api_up, 60)
        _wait_for("the worker", lambda: b"ready" in (tmp / "worker.log").read_bytes(), 300)
        a_tenant, b_tenant = store.keys.create_tenant("A"), store.keys.create_tenant("B")
        store.limits.set_weight(b_tenant.id, args.weight_b)
        key_a = store.keys.create_key(a_tenant.id)[1]
        key_b = store.keys.create_key(b_tenant.id)[1]
        a = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key_a}"}, timeout=120)
        b = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key_b}"}, timeout=120)

        # 1. B's interactive jobs on an idle worker (twice: the first warms the engine up).
        _latencies_wait = lambda ids: _wait_for("jobs", lambda: all(  # noqa: E731
            b.get(f"/v1/jobs/{i}").json()["status"] in ("succeeded", "failed") for i in ids), 600)
        warm = _interactive(b, args.interactive_b, args.max_tokens)
        _latencies_wait(warm)
        idle_ids = _interactive(b, args.interactive_b, args.max_tokens)
        _latencies_wait(idle_ids)
        idle = _latencies(store, idle_ids)

        # 2. A's batch, then B's work args.delay seconds later.
        t0 = time.time()
        batch_a = _batch(a, args.bulk_a, "a", args.max_tokens)
        time.sleep(max(0.0, args.delay - (time.time() - t0)))
        t_b = time.time()
        batch_b = _batch(b, args.bulk_b, "b", args.max_tokens)
        busy_ids = _interactive(b, args.interactive_b, args.max_tokens)
        _latencies_wait(busy_ids)
        busy = _latencies(store, busy_ids)
        for client, batch in ((a, batch_a), (b, batch_b)):
            _wait_for("the batches", lambda c=client, bid=batch: c.get(f"/v1/batches/{bid}").json()["status"]
                      in ("completed", "failed"), 1800)

        # 3. Token shares over time, from the usage rows (when each job finished).
        with store.db.read() as s:
            rows = s.execute(select(Usage.tenant_id, Usage.created_at, Usage.prompt_tokens + Usage.completion_tokens,
                                    Job.batch_id).join(Job, Job.id == Usage.job_id)
                             .where(Job.batch_id.in_([batch_a, batch_b]))).all()
        b_end = max(r[1].timestamp() for r in rows if r[3] == batch_b)
        a_end = max(r[1].timestamp() for r in rows if r[3] == batch_a)
        both_until = min(a_end, b_end)
        buckets: list[dict[str, float]] = []
        start = t_b
        while start < both_until:
            end = min(start + BUCKET_S, both_until)
            tok = {"A": 0, "B": 0}
            for tenant_id, at, tokens, _ in rows:
                if start <= at.timestamp() < end:
                    tok["A" if tenant_id == a_tenant.id else "B"] += tokens
            total = tok["A"] + tok["B"]
            if total:
                buckets.append({"t_s": round(start - t_b, 1), "a_tokens": tok["A"], "b_tokens": tok["B"],
                                "b_share": round(tok["B"] / total, 3)})
            start = end
        a_sum, b_sum = sum(bk["a_tokens"] for bk in buckets), sum(bk["b_tokens"] for bk in buckets)
        running = buckets[next((i for i, bk in enumerate(buckets) if bk["b_tokens"]), len(buckets)):]
        a_run, b_run = sum(bk["a_tokens"] for bk in running), sum(bk["b_tokens"] for bk in running)
        target = args.weight_b / (1 + args.weight_b)
        figures = {
            "machine": os.environ.get("BENCH_MACHINE", ""),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "b_interactive_idle_p50_s": round(statistics.median(idle), 3),
            "b_interactive_idle_p99_s": round(_pct(idle, 0.99), 3),
            "b_interactive_busy_p50_s": round(statistics.median(busy), 3),
            "b_interactive_busy_p99_s": round(_pct(busy, 0.99), 3),
            "p99_ratio_busy_over_idle": round(_pct(busy, 0.99) / max(1e-9, _pct(idle, 0.99)), 2),
            "both_busy_s": round(both_until - t_b, 1),
            "b_token_share_while_both_busy": round(b_sum / max(1, a_sum + b_sum), 3),
            # from B's first finished batch tokens on (before that, A's requests admitted earlier run out)
            "b_token_share_once_b_served": round(b_run / max(1, a_run + b_run), 3),
            "b_target_share": round(target, 3),
            "b_share_by_5s": buckets,
        }
        print(json.dumps({k: v for k, v in figures.items() if k != "b_share_by_5s"}, indent=2))
        print("B's share per 5 s while both have bulk work:")
        for bk in buckets:
            print(f"  t+{bk['t_s']:6.1f}s  A {bk['a_tokens']:6d}  B {bk['b_tokens']:6d}  B share {bk['b_share']:.2f}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        store.close()
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
