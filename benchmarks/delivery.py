"""Task delivery through Redis: tokenmill's transport (`contract.redis_transport`: the pop script that
records each delivery as it takes it, bells for idle consumers) against kombu's own Redis transport
(BRPOP), same machine, one run each. A benchmark, not a test.

- send: microseconds per `send_task` (one at a time, as one API request sends one job);
- idle wake-up: a consumer process waiting on an empty queue; the time from a send to the
  consumer's callback (median and p99 of ``--wakes`` sends, each after the consumer idled);
- drain: a backlog of ``--backlog`` tasks taken and acknowledged by one consumer (prefetch 64),
  tasks per second.

It starts its own `redis-server` (the embedded one's binary, a free loopback port, no persistence).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/delivery.py --json delivery.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from contract.celery_app import QueueConfig, declare_queues, make_celery  # noqa: E402
from contract.liveness import new_instance_id  # noqa: E402
from contract.queues import queue_for  # noqa: E402
from tokenmill.redis_embedded import free_port, redis_server_binary  # noqa: E402

MODEL = "delivery-bench"
TRANSPORTS = ("tokenmill", "kombu")


def app_for(transport: str, url: str, instance: str = ""):  # type: ignore[no-untyped-def]
    app = make_celery(QueueConfig(redis_url=url, worker_instance=instance))
    if transport == "kombu":
        app.conf.broker_transport = "redis"  # kombu's own, BRPOP
    declare_queues(app, [MODEL])
    return app


def consume(transport: str, url: str, prefetch: int) -> None:
    """The consumer process: acknowledges every task and records when it arrived (key ``seen``)."""
    from kombu import Consumer

    app = app_for(transport, url, new_instance_id())
    r = redis.Redis.from_url(url)
    conn = app.connection_for_read()
    channel = conn.channel()
    channel.basic_qos(0, prefetch, False)

    def on_message(message) -> None:  # type: ignore[no-untyped-def]
        r.rpush("seen", json.dumps([message.headers["id"], time.time()]))
        message.ack()

    Consumer(channel, queues=[app.amqp.queues[queue_for(MODEL)]], accept=["json"], on_message=on_message).consume()
    r.set("consumer-ready", 1)
    while True:
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            pass


def run(transport: str, url: str, args: argparse.Namespace) -> dict[str, float]:
    r = redis.Redis.from_url(url)
    r.flushdb()
    sender = app_for(transport, url)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for i in range(args.sends):
        sender.send_task("tokenmill.generate", args=[f"s{i}", 0.0], task_id=f"s{i}", queue=queue_for(MODEL))
    out["send_us"] = (time.perf_counter() - t0) / args.sends * 1e6
    r.flushdb()

    proc = subprocess.Popen([sys.executable, __file__, "--consume", transport, url],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        while not r.get("consumer-ready"):
            time.sleep(0.05)
        lat = []
        for i in range(args.wakes):
            time.sleep(0.2)  # the consumer is idle, waiting
            sent = time.time()
            sender.send_task("tokenmill.generate", args=[f"w{i}", sent], task_id=f"w{i}", queue=queue_for(MODEL))
            item = r.blpop("seen", timeout=10)
            assert item is not None, "the consumer never got a task"
            lat.append((json.loads(item[1])[1] - sent) * 1000)
        lat.sort()
        out["wake_p50_ms"] = statistics.median(lat)
        out["wake_p99_ms"] = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        out["wake_max_ms"] = lat[-1]
        proc.kill()
        proc.wait()
        r.delete("seen", "consumer-ready")
        for i in range(args.backlog):  # the backlog, waiting before the consumer starts
            sender.send_task("tokenmill.generate", args=[f"b{i}", 0.0], task_id=f"b{i}", queue=queue_for(MODEL))
        proc = subprocess.Popen([sys.executable, __file__, "--consume", transport, url, "--prefetch", "64"],
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        while not r.get("consumer-ready"):
            time.sleep(0.01)
        t0 = time.perf_counter()
        while r.llen("seen") < args.backlog:
            time.sleep(0.01)
        out["drain_tasks_per_s"] = args.backlog / (time.perf_counter() - t0)
    finally:
        proc.kill()
        proc.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sends", type=int, default=2000)
    ap.add_argument("--wakes", type=int, default=100)
    ap.add_argument("--backlog", type=int, default=5000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--consume", nargs=2, metavar=("TRANSPORT", "URL"), help=argparse.SUPPRESS)
    ap.add_argument("--prefetch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.consume:
        return consume(args.consume[0], args.consume[1], args.prefetch)
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        server = subprocess.Popen([redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                   "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.05)
            results = {t: run(t, url, args) for t in TRANSPORTS}
        finally:
            server.terminate()
            server.wait()
    report = {"machine": platform.node(), "cpus": os.cpu_count(), "load": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d"), "args": vars(args), "results": results}
    for t, res in results.items():
        print(f"{t:10s} " + "  ".join(f"{k} {v:.2f}" for k, v in res.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
