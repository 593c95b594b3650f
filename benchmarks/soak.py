"""Soak: a `tokenmill up` stack on the CPU under a mixed load for a long time, then an account of
every job.

It starts `tokenmill up --no-live --device cpu` in a data directory of its own (embedded Redis,
SQLite store, API, one CPU worker, Flower) and, for ``--duration`` seconds, drives it with
interactive clients (synchronous chat completions and POST /v1/jobs polled to the end, each with an
idempotency key and one retry) and a bulk client (a Files + Batches upload every
``--batch-every`` seconds). Every few seconds it samples the resident memory of each process of
the stack. Afterwards it waits for the work to drain and counts, through the API:

- jobs done, p50/p99 latency of chat completions and of polled jobs;
- lost jobs (accepted but never final, or missing from the store or from a batch's output) and
  doubled ones (two jobs for one idempotency key, a batch line run twice, usage counted twice);
- RSS of each process at start, after warm-up and at the end, with growth flagged.

    .venv/bin/python benchmarks/soak.py --duration 600                 # SmolLM2-135M on the CPU
    .venv/bin/python benchmarks/soak.py --duration 45 --model DIR      # a tiny model (the CI test)

Exit code 0 when nothing was lost, doubled or failed; 1 otherwise. ``--report FILE`` writes the
figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenmill.redis_embedded import free_port  # noqa: E402

FINAL = ("succeeded", "failed", "cancelled", "expired")
QUESTIONS = ["Name a river in Europe.", "What is two plus three?", "Give a synonym for happy.",
             "Say hello in Spanish.", "What color is the sky?", "Name a prime number.",
             "Write one word that rhymes with cat.", "What is the capital of Italy?"]


# -- the stack ---------------------------------------------------------------------------------------

class Stack:
    """`tokenmill up` as a subprocess in its own data directory."""

    def __init__(self, data_dir: Path, model: str, database_url: str | None) -> None:
        self.data_dir = data_dir
        self.api_port, self.flower_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
        env.update(TOKENMILL_DATA_DIR=str(data_dir), TOKENMILL_API_PORT=str(self.api_port),
                   TOKENMILL_FLOWER_PORT=str(self.flower_port), PYTHONUNBUFFERED="1")
        if os.environ.get("TOKENMILL_CACHE_DIR"):
            env["TOKENMILL_CACHE_DIR"] = os.environ["TOKENMILL_CACHE_DIR"]
        if database_url:
            env["TOKENMILL_DATABASE_URL"] = database_url
        self.log_path = data_dir / "up.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "up", "--no-live", "--device", "cpu",
                                      "--model", model], cwd=REPO, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"tokenmill up exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                state = json.loads((self.data_dir / "up.json").read_text())
                if state.get("ready") and state.get("pid") == self.proc.pid:
                    return state
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        self.stop()
        raise SystemExit(f"tokenmill up not ready after {timeout_s:.0f}s:\n{self.log()[-3000:]}")

    def secret(self, name: str) -> str:
        return (self.data_dir / "secrets" / name).read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 180.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C: the ordered stop
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()
        return self.proc.returncode


# -- memory -----------------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def _label(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [a.decode(errors="replace") for a in argv if a]
    text = " ".join(words)
    if "redis-server" in text:
        return "redis"
    for name in ("api", "worker", "flower", "up"):
        if name in words[1:6]:
            return name
    return None


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def stack_processes(root: int) -> dict[str, list[int]]:
    """The stack's processes by role (Linux /proc), the `tokenmill up` supervisor included."""
    kids = _children()
    out: dict[str, list[int]] = {"up": [root]}
    todo = list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        name = _label(pid)
        if name and name != "up":
            out.setdefault(name, []).append(pid)
    return out


@dataclass
class MemorySample:
    t: float
    rss_mb: dict[str, float]
    pids: dict[str, list[int]]


# -- the load ---------------------------------------------------------------------------------------

@dataclass
class Ledger:
    """What the clients did, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    submitted: dict[str, str] = field(default_factory=dict)  # idempotency key -> "chat" | "job"
    accepted: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: {"chat": [], "job": []})
    outcomes: Counter = field(default_factory=Counter)
    batches: dict[str, list[str]] = field(default_factory=dict)  # batch id -> custom ids
    retries: int = 0
    client_errors: list[str] = field(default_factory=list)


def _post_retrying(client: httpx.Client, url: str, ledger: Ledger, **kw: Any) -> httpx.Response | None:
    """POST, and once more (same idempotency key) after a connection error, 429 or 5xx."""
    for attempt in range(2):
        try:
            r = client.post(url, **kw)
        except httpx.HTTPError as exc:
            err = repr(exc)
            r = None
        else:
            err = f"{r.status_code} {r.text[:200]}"
            if r.status_code < 500 and r.status_code != 429:
                return r
        if attempt == 0:
            with ledger.lock:
                ledger.retries += 1
            time.sleep(1.0)
    with ledger.lock:
        ledger.client_errors.append(f"{url}: {err}")
    return r


def interactive_client(api: str, key: str, model: str, stop_at: float, ledger: Ledger, max_tokens: int,
                       seed: int) -> None:
    rnd = random.Random(seed)
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            idem = f"soak-{seed}-{n}-{uuid.uuid4().hex[:8]}"
            question = f"{rnd.choice(QUESTIONS)} ({seed}.{n})"
            tokens = rnd.randint(max(2, max_tokens // 4), max_tokens)
            kind = "chat" if n % 2 else "job"
            with ledger.lock:
                ledger.submitted[idem] = kind
            started = time.perf_counter()
            if kind == "chat":
                r = _post_retrying(c, "/v1/chat/completions", ledger, headers={"Idempotency-Key": idem},
                                   json={"model": model, "max_tokens": tokens, "temperature": 0.7, "seed": n,
                                         "messages": [{"role": "user", "content": question}]})
                if r is None or r.status_code != 200:
                    with ledger.lock:
                        ledger.outcomes[f"chat {r.status_code if r is not None else 'error'}"] += 1
                    continue
                with ledger.lock:
                    ledger.accepted[idem] = r.json()["id"]
                    ledger.latency_ms["chat"].append((time.perf_counter() - started) * 1000)
                    ledger.outcomes["chat ok"] += 1
            else:
                r = _post_retrying(c, "/v1/jobs", ledger, json={
                    "model": model, "prompt": question, "idempotency_key": idem,
                    "params": {"max_tokens": tokens, "temperature": 0.7, "seed": n}})
                if r is None or r.status_code not in (200, 202):
                    with ledger.lock:
                        ledger.outcomes[f"job {r.status_code if r is not None else 'error'}"] += 1
                    continue
                job_id = r.json()["id"]
                with ledger.lock:
                    ledger.accepted[idem] = job_id
                delay = 0.02
                while True:
                    try:
                        status = c.get(f"/v1/jobs/{job_id}").json().get("status")
                    except (httpx.HTTPError, ValueError):
                        status = None
                    if status in FINAL:
                        break
                    time.sleep(delay)
                    delay = min(delay * 1.5, 0.5)
                with ledger.lock:
                    ledger.latency_ms["job"].append((time.perf_counter() - started) * 1000)
                    ledger.outcomes[f"job {status}"] += 1


def bulk_client(api: str, key: str, model: str, stop_at: float, ledger: Ledger, every_s: float, lines: int,
                max_tokens: int) -> None:
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        n = 0
        next_at = time.monotonic()
        while time.monotonic() < stop_at:
            if time.monotonic() < next_at:
                time.sleep(min(0.5, next_at - time.monotonic()))
                continue
            next_at += every_s
            n += 1
            ids = [f"b{n}-{i}" for i in range(lines)]
            body = "".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                                       "body": {"model": model, "prompt": f"{QUESTIONS[i % len(QUESTIONS)]} [{cid}]",
                                                "max_tokens": max_tokens, "temperature": 0}}) + "\n"
                           for i, cid in enumerate(ids))
            try:
                f = c.post("/v1/files", files={"file": (f"soak-{n}.jsonl", body.encode())}, data={"purpose": "batch"})
                f.raise_for_status()
                b = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/completions"})
                b.raise_for_status()
            except httpx.HTTPError as exc:
                with ledger.lock:
                    ledger.client_errors.append(f"batch {n}: {exc!r}")
                continue
            with ledger.lock:
                ledger.batches[b.json()["id"]] = ids


# -- the account ------------------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def list_jobs(c: httpx.Client) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if cursor:
            params["cursor"] = cursor
        page = c.get("/v1/jobs", params=params).json()
        jobs.extend(page["data"])
        cursor = page.get("next_cursor")
        if not page.get("has_more") or not cursor:
            return jobs


def drain(c: httpx.Client, ledger: Ledger, timeout_s: float) -> None:
    """Waits until every batch is final and no job of the tenant is queued or running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        open_batches = [b for b in ledger.batches
                        if c.get(f"/v1/batches/{b}").json().get("status") not in ("completed", "failed", "cancelled",
                                                                                   "expired")]
        busy = any(c.get("/v1/jobs", params={"status": s, "limit": 1}).json()["data"] for s in ("queued", "running"))
        if not open_batches and not busy:
            return
        time.sleep(1.0)


def account(c: httpx.Client, ledger: Ledger) -> dict[str, Any]:
    """Lost and doubled jobs, counted from the store through the API."""
    jobs = list_jobs(c)
    by_key: dict[str, list[dict[str, Any]]] = {}
    for j in jobs:
        if j["kind"] == "interactive":
            by_key.setdefault(j.get("idempotency_key") or f"no-key-{j['id']}", []).append(j)
    status = Counter(j["status"] for j in jobs)
    lost: list[str] = []
    doubled: list[str] = []
    for idem, job_id in ledger.accepted.items():
        found = by_key.get(idem, [])
        if not found:
            lost.append(f"{job_id} (key {idem}) is not in the store")
        elif found[0]["status"] not in FINAL:
            lost.append(f"{job_id} is still {found[0]['status']}")
        if len(found) > 1:
            doubled.append(f"key {idem} has {len(found)} jobs")
    extra = [k for k in by_key if k not in ledger.accepted and k not in ledger.submitted]
    doubled += [f"job {by_key[k][0]['id']} was never submitted" for k in extra]
    bulk_done = 0
    for batch_id, custom_ids in ledger.batches.items():
        b = c.get(f"/v1/batches/{batch_id}").json()
        if b["status"] != "completed":
            lost.append(f"batch {batch_id} is {b['status']}")
            continue
        counts = b["request_counts"]
        if counts["total"] != len(custom_ids):
            (lost if counts["total"] < len(custom_ids) else doubled).append(
                f"batch {batch_id}: {counts['total']} requests for {len(custom_ids)} lines")
        out = Counter()
        for fid in (b.get("output_file_id"), b.get("error_file_id")):
            if fid:
                for line in c.get(f"/v1/files/{fid}/content").text.splitlines():
                    if line.strip():
                        out[json.loads(line)["custom_id"]] += 1
        missing = set(custom_ids) - set(out)
        twice = [cid for cid, n in out.items() if n > 1]
        if missing:
            lost.append(f"batch {batch_id}: no output for {len(missing)} lines, e.g. {sorted(missing)[:3]}")
        if twice:
            doubled.append(f"batch {batch_id}: {len(twice)} lines answered twice, e.g. {twice[:3]}")
        bulk_done += counts["completed"]
    usage = c.get("/v1/usage", params={"group_by": ["model"]}).json()["data"]
    requests = sum(b["requests"] for b in usage)
    if requests != status.get("succeeded", 0):
        (doubled if requests > status.get("succeeded", 0) else lost).append(
            f"usage counts {requests} requests for {status.get('succeeded', 0)} succeeded jobs")
    return {"jobs_in_store": len(jobs), "by_status": dict(status), "bulk_done": bulk_done,
            "interactive_done": sum(1 for k in ledger.accepted if by_key.get(k) and by_key[k][0]["status"] == "succeeded"),
            "redelivered": sum(1 for j in jobs if j.get("attempts", 1) > 1),
            "lost": lost, "doubled": doubled, "usage_requests": requests}


def memory_report(samples: list[MemorySample], warm_at: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not samples:
        return out
    warm = next((s for s in samples if s.t >= warm_at), samples[-1])
    for name in sorted({n for s in samples for n in s.rss_mb}):
        series = [s.rss_mb[name] for s in samples if name in s.rss_mb]
        pids = {tuple(s.pids.get(name, [])) for s in samples if s.pids.get(name)}
        start, end = series[0], series[-1]
        base = warm.rss_mb.get(name, start)
        growth = (end - base) / base * 100 if base else 0.0
        out[name] = {"start_mb": round(start, 1), "warm_mb": round(base, 1), "end_mb": round(end, 1),
                     "max_mb": round(max(series), 1), "growth_after_warmup_pct": round(growth, 1),
                     "flag": growth > 20 and end - base > 20, "restarted": len(pids) > 1}
    return out


# -- main -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3600.0, help="seconds of load (default 3600)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in model name or model directory")
    p.add_argument("--interactive-clients", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=24, help="most tokens an interactive request asks for")
    p.add_argument("--batch-every", type=float, default=30.0, help="seconds between batch uploads")
    p.add_argument("--batch-lines", type=int, default=24)
    p.add_argument("--batch-max-tokens", type=int, default=12)
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--drain-timeout", type=float, default=900.0)
    p.add_argument("--data-dir", type=Path, default=None, help="the stack's data directory (default: a temporary one)")
    p.add_argument("--database-url", default=None, help="TOKENMILL_DATABASE_URL for the stack (default: SQLite)")
    p.add_argument("--report", type=Path, default=None, help="write the figures here as JSON")
    args = p.parse_args(argv)

    tmp = None if args.data_dir else tempfile.TemporaryDirectory(prefix="tokenmill-soak-")
    data_dir = args.data_dir or Path(tmp.name)  # type: ignore[union-attr]
    tty = sys.stdout.isatty()
    t0 = time.monotonic()
    print(f"soak: starting tokenmill up ({args.model}, CPU) in {data_dir}", flush=True)
    stack = Stack(data_dir, args.model, args.database_url)
    report: dict[str, Any] = {}
    try:
        state = stack.wait_ready(timeout_s=900)
        startup_s = time.monotonic() - t0
        api, model, key = state["api_url"], state["model"], stack.secret("local.key")
        print(f"soak: up in {startup_s:.1f}s; API {api}, model {model}; load for {args.duration:.0f}s", flush=True)
        ledger = Ledger()
        samples: list[MemorySample] = []
        start = time.monotonic()
        stop_at = start + args.duration
        threads = [threading.Thread(target=interactive_client, daemon=True, name=f"interactive-{i}",
                                    args=(api, key, model, stop_at, ledger, args.max_tokens, i + 1))
                   for i in range(args.interactive_clients)]
        threads.append(threading.Thread(target=bulk_client, daemon=True, name="bulk",
                                        args=(api, key, model, stop_at, ledger, args.batch_every, args.batch_lines,
                                              args.batch_max_tokens)))
        for t in threads:
            t.start()
        last_line = 0.0
        while any(t.is_alive() for t in threads):
            now = time.monotonic()
            if not samples or now - samples[-1].t - start >= args.sample_every:
                procs = stack_processes(stack.proc.pid)
                rss = {name: sum(_rss_mb(pid) or 0.0 for pid in pids) for name, pids in procs.items()}
                samples.append(MemorySample(now - start, rss, procs))
            if tty or now - last_line >= 10:
                last_line = now
                with ledger.lock:
                    done = len(ledger.latency_ms["chat"]) + len(ledger.latency_ms["job"])
                    lat = ledger.latency_ms["chat"] + ledger.latency_ms["job"]
                    n_batches = len(ledger.batches)
                rss_text = " ".join(f"{k} {v:.0f}M" for k, v in sorted(samples[-1].rss_mb.items()))
                p50 = _percentile(lat, 0.5)
                line = (f"[{now - start:6.0f}/{args.duration:.0f}s] interactive done {done} "
                        f"(p50 {p50:.0f} ms) | batches {n_batches} | RSS {rss_text}" if p50 is not None else
                        f"[{now - start:6.0f}/{args.duration:.0f}s] interactive done {done} | batches {n_batches} | "
                        f"RSS {rss_text}")
                print(("\r" + line.ljust(150)) if tty else line, end="" if tty else "\n", flush=True)
            time.sleep(0.5)
        load_s = time.monotonic() - start
        if tty:
            print()
        print(f"soak: load over after {load_s:.0f}s; draining", flush=True)
        with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            drain(c, ledger, args.drain_timeout)
            drained_s = time.monotonic() - start - load_s
            procs = stack_processes(stack.proc.pid)
            samples.append(MemorySample(time.monotonic() - start,
                                        {n: sum(_rss_mb(pid) or 0.0 for pid in pids) for n, pids in procs.items()},
                                        procs))
            acct = account(c, ledger)
        lat = {k: v for k, v in ledger.latency_ms.items()}
        everything = lat["chat"] + lat["job"]
        report = {
            "machine": os.environ.get("SOAK_MACHINE", ""), "model": args.model, "duration_s": args.duration,
            "startup_s": round(startup_s, 1), "load_s": round(load_s, 1), "drain_s": round(drained_s, 1),
            "interactive_clients": args.interactive_clients,
            "jobs_done": {"interactive": acct["interactive_done"], "bulk": acct["bulk_done"],
                          "total": acct["interactive_done"] + acct["bulk_done"]},
            "batches": len(ledger.batches), "jobs_in_store": acct["jobs_in_store"], "by_status": acct["by_status"],
            "latency_ms": {name: {"n": len(v), "p50": _r(_percentile(v, 0.5)), "p99": _r(_percentile(v, 0.99))}
                           for name, v in {"chat": lat["chat"], "job": lat["job"], "all": everything}.items()},
            "lost": len(acct["lost"]), "doubled": len(acct["doubled"]), "lost_detail": acct["lost"][:20],
            "doubled_detail": acct["doubled"][:20], "redelivered_jobs": acct["redelivered"],
            "failed": acct["by_status"].get("failed", 0), "client_retries": ledger.retries,
            "client_errors": ledger.client_errors[:20], "usage_requests": acct["usage_requests"],
            "rss_mb": memory_report(samples, warm_at=min(60.0, args.duration * 0.2)),
            "rss_samples": [{"t": round(s.t, 1), **{k: round(v, 1) for k, v in s.rss_mb.items()}} for s in samples],
        }
    finally:
        code = stack.stop()
        report["stack_exit_code"] = code
    _print_report(report)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()
    bad = report.get("lost", 1) or report.get("doubled", 1) or report.get("failed", 1)
    return 1 if bad else 0


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _print_report(r: dict[str, Any]) -> None:
    if "jobs_done" not in r:
        print("soak: no report (the stack did not come up or the run was interrupted)")
        return
    print(f"\nsoak report: {r['model']}, {r['load_s']:.0f}s of load (+{r['drain_s']:.0f}s drain), "
          f"start-up {r['startup_s']:.0f}s")
    print(f"  jobs done      {r['jobs_done']['total']} ({r['jobs_done']['interactive']} interactive, "
          f"{r['jobs_done']['bulk']} bulk in {r['batches']} batches); in store {r['jobs_in_store']} {r['by_status']}")
    for name, v in r["latency_ms"].items():
        print(f"  latency {name:5s}  n {v['n']:5d}  p50 {v['p50']} ms  p99 {v['p99']} ms")
    print(f"  lost {r['lost']}  doubled {r['doubled']}  failed {r['failed']}  redelivered {r['redelivered_jobs']}  "
          f"client retries {r['client_retries']}")
    for line in r["lost_detail"] + r["doubled_detail"] + r["client_errors"]:
        print(f"    {line}")
    print("  RSS (MB)       start    warm     end     max  growth")
    for name, m in r["rss_mb"].items():
        flag = "  <- grew" if m["flag"] else ""
        flag += "  (restarted)" if m["restarted"] else ""
        print(f"  {name:12s} {m['start_mb']:7.1f} {m['warm_mb']:7.1f} {m['end_mb']:7.1f} {m['max_mb']:7.1f} "
              f"{m['growth_after_warmup_pct']:+6.1f}%{flag}")


if __name__ == "__main__":
    sys.exit(main())
