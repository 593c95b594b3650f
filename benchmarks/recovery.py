"""Crash recovery, measured: a `tokenmill up` stack on the CPU with every setting at its default, its
worker SIGKILLed again and again while jobs run; for each kill, how long until the jobs the dead
worker held are running again, and until they have all finished.

It starts `tokenmill up --no-live --device cpu` in a data directory of its own (embedded Redis,
the SQLite store unless ``--database-url`` names another, API, one CPU worker, Flower), then
``--kills`` times: submits a wave of chat jobs through POST /v1/jobs, waits until the worker holds
at least ``--min-held`` of them (``running`` in the store), SIGKILLs the worker process, and
measures, from the kill:

- ``ready``: the replacement that `tokenmill up` starts (same hostname) has loaded its engine (its
  heartbeat key appears in Redis);
- ``running_again``: every held job has started again (its attempt count went up) or finished;
- ``finished``: every held job has finished.

    .venv/bin/python benchmarks/recovery.py                       # 5 kills, SmolLM2-135M on the CPU
    .venv/bin/python benchmarks/recovery.py --kills 8 --report recovery.json
    .venv/bin/python benchmarks/recovery.py --standby              # a second worker stays up

With ``--standby`` a second `tokenmill worker` (outside `up`, same Redis and store) runs the whole
time, so the held jobs need not wait for the replacement: ``held`` counts only the jobs of the
killed worker (its deliveries, from ``tokenmill:unacked_owner``).

At the end every job submitted must be ``succeeded`` (exit code 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import subprocess

import httpx
import redis

from soak import REPO, Stack, stack_processes

FINAL = ("succeeded", "failed", "cancelled", "expired")


def _instances(r: redis.Redis) -> set[bytes]:
    return set(r.scan_iter(match="tokenmill:instance:*", count=100))


def _running(c: httpx.Client) -> dict[str, int]:
    page = c.get("/v1/jobs", params={"status": "running", "limit": 1000}).json()
    return {j["id"]: j["attempts"] for j in page["data"]}


def _held_by(r: redis.Redis, pid: int) -> set[str]:
    """The job ids of the deliveries that the worker process ``pid`` holds (its instance's)."""
    instance = None
    for key in _instances(r):
        value = r.get(key)
        if value and json.loads(value).get("pid") == pid:
            instance = key.decode().rsplit(":", 1)[-1]
    owners = {tag: inst.decode() for tag, inst in r.hgetall("tokenmill:unacked_owner").items()}
    tags = [tag for tag, inst in owners.items() if inst == instance]
    ids = set()
    for raw in r.hmget("unacked", tags) if tags else []:
        if raw:
            ids.add(json.loads(raw)[0]["headers"]["id"])
    return ids


def _jobs(c: httpx.Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    return {i: c.get(f"/v1/jobs/{i}").json() for i in ids}


def _submit_wave(c: httpx.Client, model: str, wave: int, max_tokens: int, n: int) -> list[str]:
    ids = []
    for i in range(wave):
        resp = c.post("/v1/jobs", json={"model": model, "messages": [{"role": "user", "content": f"Story {n}.{i}:"}],
                                        "params": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}})
        resp.raise_for_status()
        ids.append(resp.json()["id"])
    return ids


def one_kill(c: httpx.Client, r: redis.Redis, up_pid: int, model: str, wave: int, max_tokens: int,
             min_held: int, n: int, standby: bool) -> tuple[dict[str, float], list[str]]:
    """Submits a wave, kills the worker mid-run, measures the recovery of what it held. With a
    standby worker, waits for up's worker to be back first, and sends another wave whenever one
    finishes before up's worker held enough of it (the standby may take most of a wave)."""
    deadline = time.monotonic() + 300
    if standby:
        while len(_instances(r)) < 2:  # up's worker (restarted after the last kill) is ready
            if time.monotonic() > deadline:
                raise SystemExit("up's worker did not come back")
            time.sleep(0.1)
        time.sleep(1.0)  # its consumer starts right after the heartbeat
    ids = _submit_wave(c, model, wave, max_tokens, n)
    while True:
        workers = stack_processes(up_pid).get("worker", [])
        if len(workers) != 1:
            raise SystemExit(f"expected one worker process under up, found {workers}")
        held = _running(c)
        if standby:
            mine = _held_by(r, workers[0])
            held = {i: a for i, a in held.items() if i in mine}
        if len(held) >= min_held:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"the worker never held {min_held} jobs")
        if all(j["status"] in FINAL for j in _jobs(c, ids[-wave:]).values()):
            ids += _submit_wave(c, model, wave, max_tokens, n)
        time.sleep(0.05)
    before = _instances(r)
    os.kill(workers[0], signal.SIGKILL)
    killed = time.monotonic()
    marks: dict[str, float] = {"held": float(len(held))}
    while "finished" not in marks or "ready" not in marks:  # with a standby, either may come first
        now = time.monotonic()
        if "ready" not in marks and _instances(r) - before:
            marks["ready"] = now - killed
        if now - killed > 600:
            raise SystemExit(f"kill {n}: the held jobs did not finish, or no replacement came, in 600 s: {marks}")
        if "finished" in marks:
            time.sleep(0.1)
            continue
        jobs = _jobs(c, list(held))
        if "running_again" not in marks and all(j["attempts"] > held[i] or j["status"] in FINAL
                                                for i, j in jobs.items()):
            marks["running_again"] = now - killed
        if all(j["status"] in FINAL for j in jobs.values()):
            marks["finished"] = now - killed
            marks.setdefault("running_again", now - killed)
        time.sleep(0.1)
    return marks, ids


def _start_standby(stack: Stack, state: dict[str, Any], args: argparse.Namespace) -> subprocess.Popen:
    """A second worker on the same Redis and store (defaults otherwise), ready when its heartbeat is."""
    r = redis.Redis.from_url(state["redis_url"])
    before = _instances(r)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
    env.update(TOKENMILL_DATA_DIR=str(stack.data_dir), TOKENMILL_REDIS_URL=state["redis_url"],
               TOKENMILL_DATABASE_URL=args.database_url or f"sqlite:///{stack.data_dir / 'tokenmill.db'}",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    if os.environ.get("TOKENMILL_CACHE_DIR"):
        env["TOKENMILL_CACHE_DIR"] = os.environ["TOKENMILL_CACHE_DIR"]
    log = open(stack.data_dir / "standby.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "worker", "--model", args.model,
                             "--served-name", state["model"], "--device", "cpu", "--hostname", "standby@bench"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not (_instances(r) - before):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the standby worker did not start (log: {stack.data_dir / 'standby.log'})")
        time.sleep(0.2)
    time.sleep(1.0)  # its consumer starts right after the heartbeat
    return proc


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--wave", type=int, default=12, help="jobs submitted before each kill")
    ap.add_argument("--max-tokens", type=int, default=64, help="forced output tokens of each job")
    ap.add_argument("--min-held", type=int, default=4, help="jobs the worker must hold when it is killed")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--database-url", default=None, help="the store (default: SQLite in the data directory)")
    ap.add_argument("--report", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--standby", action="store_true", help="run a second worker that is never killed")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="tokenmill-recovery-") as tmp:
        stack = Stack(Path(tmp) / "data", args.model, args.database_url)
        standby: subprocess.Popen | None = None
        try:
            state = stack.wait_ready(600)
            r = redis.Redis.from_url(state["redis_url"])
            if args.standby:
                standby = _start_standby(stack, state, args)
            headers = {"Authorization": f"Bearer {stack.secret('local.key')}"}
            rows: list[dict[str, float]] = []
            all_ids: list[str] = []
            with httpx.Client(base_url=state["api_url"], headers=headers, timeout=60) as c:
                for n in range(args.kills):
                    marks, ids = one_kill(c, r, stack.proc.pid, state["model"], args.wave, args.max_tokens,
                                          args.min_held, n, standby is not None)
                    rows.append(marks)
                    all_ids += ids
                    print(f"kill {n + 1}: {json.dumps({k: round(v, 1) for k, v in marks.items()})}", flush=True)
                deadline = time.monotonic() + 600
                while True:
                    jobs = _jobs(c, all_ids)
                    if all(j["status"] in FINAL for j in jobs.values()) or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
            statuses: dict[str, int] = {}
            for j in jobs.values():
                statuses[j["status"]] = statuses.get(j["status"], 0) + 1
        finally:
            if standby is not None:
                standby.send_signal(signal.SIGTERM)
                try:
                    standby.wait(120)
                except subprocess.TimeoutExpired:
                    standby.kill()
            stack.stop()
    report = {
        "kills": args.kills, "jobs": len(all_ids), "statuses": statuses,
        "settings": "defaults (tokenmill up --device cpu)" + (", store " + args.database_url.split(":")[0]
                                                              if args.database_url else ", SQLite store")
                    + (", a standby worker" if args.standby else ""),
        "per_kill": [{k: round(v, 2) for k, v in m.items()} for m in rows],
        "ready_s": _summary([m["ready"] for m in rows]),
        "running_again_s": _summary([m["running_again"] for m in rows]),
        "running_again_after_ready_s": _summary([m["running_again"] - m["ready"] for m in rows]),
        "finished_s": _summary([m["finished"] for m in rows]),
    }
    print(json.dumps(report, indent=2))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    return 0 if statuses == {"succeeded": len(all_ids)} else 1


if __name__ == "__main__":
    sys.exit(main())
