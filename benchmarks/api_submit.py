"""How fast the API accepts work: jobs per second through POST /v1/jobs (stored and enqueued, not
run: no worker is started), and a 50,000-line batch file from upload to ``in_progress``.

It makes a fresh PostgreSQL database and uses its own Redis database (flushed), starts
`tokenmill api` (uvicorn) as subprocesses, and drives them with a small asyncio HTTP/1.1 client
(keep-alive connections, no client library in the way, so the client costs little CPU on a
machine it shares with the server).

    .venv/bin/python benchmarks/api_submit.py --jobs 20000 --connections 64 --api-workers 2 \\
        --batch-lines 50000

With several API processes they share a prometheus_client multiprocess directory, as under
`tokenmill api` (`--batch-lines 0` leaves the batch out; benchmarks/metrics_overhead.py uses that).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from contract.queues import queue_for
from store import Store
from store.migrate import upgrade

MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _one_connection(host: str, port: int, key: str, bodies: list[bytes], statuses: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: ").encode()
    for body in bodies:
        writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        status_line = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        status = int(status_line.split()[1])
        statuses[status] = statuses.get(status, 0) + 1
    writer.close()


async def submit_jobs(url: str, key: str, n: int, connections: int) -> tuple[float, dict[int, int]]:
    """Sends n jobs over `connections` keep-alive connections; returns (seconds, status counts)."""
    host, port = url.removeprefix("http://").split(":")
    bodies = [json.dumps({"model": MODEL, "prompt": f"Tell me about the number {i}.",
                          "params": {"max_tokens": 32, "temperature": 0.7}}).encode() for i in range(n)]
    per = [bodies[i::connections] for i in range(connections)]
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    await asyncio.gather(*(_one_connection(host, int(port), key, b, statuses) for b in per if b))
    return time.perf_counter() - started, statuses


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its descendants (Linux /proc), in seconds."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def batch_file(lines: int) -> bytes:
    """A JSONL batch input of short chat requests."""
    out = io.BytesIO()
    for i in range(lines):
        out.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                              "body": {"model": MODEL, "max_tokens": 64, "messages": [
                                  {"role": "system", "content": "You are a terse assistant."},
                                  {"role": "user", "content": f"Summarise item {i} of the catalogue in one line."}]}}
                             ).encode() + b"\n")
    return out.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--api-workers", type=int, default=2)
    p.add_argument("--batch-lines", type=int, default=50_000)
    p.add_argument("--postgres", default=os.environ.get("TOKENMILL_TEST_POSTGRES_URL",
                                                        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    p.add_argument("--model-dir", default=str(Path("~/.cache/tokenmill/models").expanduser() / MODEL))
    args = p.parse_args()

    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    name = f"tokenmill_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db_url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
    r = redis.Redis.from_url(args.redis)
    r.flushdb()
    proc = None
    try:
        upgrade(db_url)
        store = Store.open(db_url)
        tenant = store.keys.create_tenant("bench")
        _, key = store.keys.create_key(tenant.id)
        port = free_port()
        env = {**os.environ, "TOKENMILL_DATABASE_URL": db_url, "TOKENMILL_REDIS_URL": args.redis,
               "TOKENMILL_SERVED_MODELS": f"{MODEL}={args.model_dir}", "TOKENMILL_QUEUE_LIMIT": str(10**9),
               "TOKENMILL_BATCH_MAX_LINES": str(max(args.batch_lines, 50_000))}
        if args.api_workers > 1:  # what `tokenmill api --workers N` gives its processes
            metrics_dir = tempfile.mkdtemp(prefix="tokenmill-bench-metrics-")
            env["TOKENMILL_METRICS_DIR"] = env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "tokenmill.cli_api:make_app", "--factory",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.api_workers),
                                 "--log-level", "warning", "--no-access-log"], env=env, cwd=REPO)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the API did not start")
            time.sleep(0.2)
        # warm up (tokenizer load, connection pools) in every process
        asyncio.run(submit_jobs(url, key, 200, 8))

        cpu_before = cpu_seconds(proc.pid)
        seconds, statuses = asyncio.run(submit_jobs(url, key, args.jobs, args.connections))
        api_cpu = cpu_seconds(proc.pid) - cpu_before
        accepted = statuses.get(202, 0)
        stored = store.jobs.count_jobs(tenant.id)
        queued_tasks = r.llen(queue_for(MODEL))
        print(f"POST /v1/jobs: {args.jobs} jobs over {args.connections} connections, {args.api_workers} API "
              f"processes: {seconds:.2f} s, {accepted / seconds:,.0f} jobs/s accepted; statuses {statuses}; "
              f"{stored} rows stored (incl. 200 warm-up), {queued_tasks} tasks in Redis; API CPU "
              f"{1000 * api_cpu / max(accepted, 1):.3f} ms per job")
        t0 = time.perf_counter()
        scrape = httpx.get(url + "/metrics", timeout=30)
        print(f"GET /metrics: {scrape.status_code}, {len(scrape.content):,} bytes in {time.perf_counter() - t0:.3f} s")
        if args.batch_lines <= 0:
            store.close()
            return

        data = batch_file(args.batch_lines)
        t0 = time.perf_counter()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as c:
            f = c.post("/v1/files", files={"file": ("batch.jsonl", data)}, data={"purpose": "batch"})
            f.raise_for_status()
            t_upload = time.perf_counter() - t0
            b = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions"})
            b.raise_for_status()
            batch_id = b.json()["id"]
            while True:
                status = c.get(f"/v1/batches/{batch_id}").json()
                if status["status"] != "validating":
                    break
                time.sleep(0.1)
            t_ready = time.perf_counter() - t0
        # the tasks are sent right after the batch turns in_progress
        bulk_list = f"{queue_for(MODEL)}:9"
        deadline = time.monotonic() + 60
        want = -(-args.batch_lines // 64)
        while r.llen(bulk_list) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        t_enqueued = time.perf_counter() - t0
        print(f"batch of {args.batch_lines} lines ({len(data) / 1e6:.1f} MB): upload {t_upload:.2f} s, "
              f"upload to {status['status']} {t_ready:.2f} s (total {status['request_counts']['total']}), "
              f"all {r.llen(bulk_list)} bulk tasks in Redis at {t_enqueued:.2f} s")
        store.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        r.flushdb()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
