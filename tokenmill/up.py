"""`tokenmill up`: the whole stack on one machine, supervised.

Order of things: check what can be checked before starting anything (ports, the database, the
model, Redis), then start Redis (or use TOKENMILL_REDIS_URL), the API, one worker per visible GPU
(or one CPU worker), and Flower, each a fresh interpreter watched by `tokenmill.supervisor`. While
it runs, a live summary reads the workers' Redis hashes, the queue lengths and the store's job
counts. On Ctrl-C (SIGINT) or SIGTERM it stops taking work first (the API), lets the workers
finish or requeue what they hold (Celery's warm shutdown), then stops Flower and Redis last, whose
append-only file keeps every task still queued for the next start.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.command import tokenmill_command
from tokenmill.data_lock import DataDirInUse, DataDirLock
from tokenmill.gpus import gpu_groups, visible_gpu_ids
from tokenmill.redis_embedded import RedisUnavailable, embedded_redis, port_is_free
from tokenmill.settings import Settings
from tokenmill.supervisor import ChildSpec, Supervisor
from tokenmill.up_state import LOCAL_TENANT, STATE_FILE, local_address, read_state, secrets_dir
from tokenmill.up_view import render_status, render_summary

class StartupError(Exception):
    """Something the user can fix stopped the stack from starting; the message says what."""


@dataclass(frozen=True)
class UpOptions:
    """What `tokenmill up` was asked to run (flags over settings)."""

    model: str
    served_name: str
    device: str | None = None  # "cpu": one CPU worker even where GPUs are; None: GPUs if any
    gpus: int | None = None  # GPUs to use (None: every visible one)
    tensor_parallel_size: int = 1  # GPUs (CPU: processes) per worker; one worker per group of GPUs
    dtype: str = "auto"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower: bool = True
    flower_host: str = "127.0.0.1"
    flower_port: int = 5555
    redis_url: str | None = None  # an external Redis; None: the embedded one
    drain_timeout_s: float = 120.0
    live: bool = True


@dataclass
class Secrets:
    """Keys `tokenmill up` shows and hands to its children."""

    admin_key: str
    local_key: str
    flower_password: str
    created: list[str] = field(default_factory=list)  # which were made on this start


# -- small helpers --------------------------------------------------------------------------------

def already_running_message(settings: Settings, refusal: DataDirInUse) -> str:
    """What a refused start says: who holds the data directory, and how to stop it."""
    running = read_state(settings)
    where = f"; its API is at {running.get('api_url')}" if running else ""
    return (f"tokenmill up is already running with this data directory: {refusal}{where}. Stop it with "
            f"`{tokenmill_command()} down` (or Ctrl-C in its terminal), or use another TOKENMILL_DATA_DIR.")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def _read_private(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL we built
            return 200 <= resp.status < 300
    except (OSError, urllib.error.URLError):
        return False


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}".rstrip(": ")


def shown_url(url: str) -> str:
    """A URL with any password hidden."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def gpu_ids(opts: UpOptions) -> list[str]:
    """The GPUs to run workers on (CUDA ids as the machine shows them); empty: one CPU worker."""
    if opts.device == "cpu":
        return []
    ids = visible_gpu_ids()
    if opts.gpus is not None:
        ids = ids[:opts.gpus]
    return ids


# -- the stack ------------------------------------------------------------------------------------

class Stack:
    """One `tokenmill up`: preflight, start, watch, shut down."""

    def __init__(self, settings: Settings, opts: UpOptions, console: Any) -> None:
        self.settings = settings
        self.opts = opts
        self.console = console
        self.sup = Supervisor()
        self.redis_url = opts.redis_url or ""
        self.model_dir = ""
        self.secrets: Secrets | None = None
        # Held from the first check to the end of shutdown: one stack per data directory.
        self.lock = DataDirLock(settings.data_dir)
        self._wrote_state = False
        self.worker_hosts: dict[str, str] = {}  # child name -> Celery hostname
        self.logs = settings.data_dir / "logs"
        self._stop = False
        self._hurry = False
        self._store: Any = None
        self._redis: Any = None
        self.started_at = time.time()

    # preflight ------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Everything checked before any process starts; raises StartupError with the fix."""
        s, o = self.settings, self.opts
        try:
            self.lock.acquire()  # before anything touches the directory
        except DataDirInUse as exc:
            raise StartupError(already_running_message(s, exc)) from None
        taken = []
        if not port_is_free(o.api_host, o.api_port):
            taken.append(f"the API port {o.api_port} on {o.api_host} (--api-port, TOKENMILL_API_PORT)")
        if o.flower and not port_is_free(o.flower_host, o.flower_port):
            taken.append(f"the Flower port {o.flower_port} on {o.flower_host} (--flower-port, TOKENMILL_FLOWER_PORT)")
        if taken:
            raise StartupError("port taken: " + "; ".join(taken) + ". Another program listens there: stop it, "
                               "or choose a free port with the option or variable named.")
        ids = gpu_ids(o)
        if ids:
            try:
                gpu_groups(ids, o.tensor_parallel_size)
            except ValueError as exc:
                raise StartupError(f"{exc}: lower --tensor-parallel-size, or run on the CPU with --device cpu") from None
        self._check_database()
        self._check_redis()
        self.model_dir = self._prepare_model()
        self.secrets = self._secrets()

    def _check_database(self) -> None:
        from store.migrate import upgrade

        url = self.settings.database_url
        self.say(f"database: {shown_url(url)} (migrating to the newest schema)")
        try:
            upgrade(url)
        except ValueError as exc:
            raise StartupError(f"TOKENMILL_DATABASE_URL is not usable: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any driver error: say it plainly
            raise StartupError(f"the database at {shown_url(url)} is unreachable or refused the migration "
                               f"({_first_line(exc)}). Check TOKENMILL_DATABASE_URL and that the server runs.") from None
        from store import Store

        self._store = Store.open(url)

    def _check_redis(self) -> None:
        if not self.opts.redis_url:
            try:
                embedded_redis(self.settings.data_dir / "redis", port=1)  # finds the binary only
            except RedisUnavailable as exc:
                raise StartupError(str(exc)) from None
            return
        import redis

        try:
            redis.Redis.from_url(self.opts.redis_url, socket_connect_timeout=3, socket_timeout=3).ping()
        except Exception as exc:  # noqa: BLE001
            raise StartupError(f"Redis at {shown_url(self.opts.redis_url)} (TOKENMILL_REDIS_URL) does not answer "
                               f"({_first_line(exc)}). Start it, fix the URL, or unset the variable to let "
                               "tokenmill up run its own.") from None

    def _prepare_model(self) -> str:
        """The model's directory: an existing one, or the built-in model converted into the cache
        (in a child process, so this supervisor never imports torch)."""
        model = self.opts.model
        path = Path(model).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise StartupError(f"{path} is not a model directory (no config.json); give a Hugging Face "
                                   "model directory or a built-in name like smollm2-135m-instruct")
            return str(path.resolve())
        if "/" in model or model.startswith("."):
            raise StartupError(f"no model directory at {path}; give an existing directory or a built-in name "
                               "like smollm2-135m-instruct")
        self.say(f"model: preparing {model} (converted once into {self.settings.model_cache_dir})")
        code = ("import sys\nfrom pathlib import Path\nfrom tokenmill.builtin_model import fetch_builtin_model\n"
                "try:\n    print(fetch_builtin_model(sys.argv[1], Path(sys.argv[2])))\n"
                "except (ValueError, RuntimeError) as e:\n    print(f'error: {e}', file=sys.stderr); sys.exit(3)\n")
        try:
            proc = subprocess.run([sys.executable, "-c", code, model, str(self.settings.model_cache_dir)],
                                  capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            raise StartupError(f"preparing the model {model} took more than 30 minutes; gave up") from None
        if self._stop:  # Ctrl-C reached the converter too: not the model's fault
            raise KeyboardInterrupt
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit code {proc.returncode}"
            raise StartupError(f"the model {model!r} cannot be loaded: {reason.removeprefix('error: ')}")
        return proc.stdout.strip().splitlines()[-1]

    def _secrets(self) -> Secrets:
        s = self.settings
        d = secrets_dir(s)
        created: list[str] = []
        admin = s.admin_key or _read_private(d / "admin.key")
        if not admin:
            admin = "tm-admin-" + secrets.token_urlsafe(32)
            _write_private(d / "admin.key", admin)
            created.append("admin")
        local = s.api_key or _read_private(d / "local.key")
        if not local or self._store.keys.authenticate(local) is None:
            tenant = self._store.keys.tenant_by_name(LOCAL_TENANT) or self._store.keys.create_tenant(LOCAL_TENANT)
            _, local = self._store.keys.create_key(tenant.id, name="made by tokenmill up")
            _write_private(d / "local.key", local)
            created.append("local")
        flower = s.flower_password or _read_private(d / "flower.password")
        if not flower:
            flower = secrets.token_urlsafe(18)
            _write_private(d / "flower.password", flower)
            created.append("flower")
        return Secrets(admin, local, flower, created)

    # start ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts every child in order, each waited for before the next."""
        import redis

        s, o = self.settings, self.opts
        if not o.redis_url:
            emb = embedded_redis(s.data_dir / "redis")
            self.redis_url = emb.url
            client = redis.Redis.from_url(emb.url, socket_connect_timeout=1, socket_timeout=2)
            self.sup.add(ChildSpec("redis", emb.argv(), self.logs / "redis.log", ready=client.ping,
                                   start_timeout_s=60, stop_timeout_s=30))
            self._start_and_wait("redis", 60)
        self._redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1, socket_timeout=2)
        assert self.secrets is not None
        py = [sys.executable, "-m", "tokenmill.cli"]
        common = {"TOKENMILL_REDIS_URL": self.redis_url, "TOKENMILL_DATABASE_URL": s.database_url,
                  "TOKENMILL_DATA_DIR": str(s.data_dir), "TOKENMILL_CACHE_DIR": str(s.cache_dir),
                  "PYTHONUNBUFFERED": "1"}
        api_env = {**common, "TOKENMILL_ADMIN_KEY": self.secrets.admin_key,
                   "TOKENMILL_SERVED_MODELS": f"{o.served_name}={self.model_dir}"}
        api_url = f"http://{local_address(o.api_host)}:{o.api_port}"
        self.sup.add(ChildSpec("api", py + ["api", "--host", o.api_host, "--port", str(o.api_port)],
                               self.logs / "api.log", env=api_env, ready=lambda: _http_ok(api_url + "/healthz"),
                               start_timeout_s=120, stop_timeout_s=20))
        self._start_and_wait("api", 120)

        host = socket.gethostname()
        ids = gpu_ids(o)
        tp = ["--tensor-parallel-size", str(o.tensor_parallel_size)]
        # One worker per group of tensor_parallel_size GPUs, seeing its group as cuda:0..N-1.
        plans = ([(f"worker-gpu{'-'.join(g)}", f"{o.served_name}-gpu{'-'.join(g)}@{host}", ["--device", "cuda"] + tp,
                   {"CUDA_VISIBLE_DEVICES": ",".join(g)}) for g in gpu_groups(ids, o.tensor_parallel_size)]
                 if ids else
                 [("worker-cpu", f"{o.served_name}-cpu@{host}", ["--device", "cpu"] + tp, {"CUDA_VISIBLE_DEVICES": ""})])
        for name, hostname, flags, env in plans:
            argv = py + ["worker", "--model", self.model_dir, "--served-name", o.served_name, "--hostname", hostname,
                         "--dtype", o.dtype] + flags
            self.worker_hosts[name] = hostname
            key = f"tokenmill:worker:{hostname}"
            # A stopping worker hands back what it could not finish before `up` would stop it hard.
            grace = {"TOKENMILL_SHUTDOWN_GRACE_S": str(min(s.shutdown_grace_s, max(1.0, o.drain_timeout_s - 10)))}
            self.sup.add(ChildSpec(name, argv, self.logs / f"{name}.log", env={**common, **env, **grace},
                                   ready=lambda key=key: bool(self._redis.exists(key)),
                                   start_timeout_s=900, stop_timeout_s=o.drain_timeout_s))
            self.sup.start(name)
        if o.flower:
            flower_env = {**common, "TOKENMILL_FLOWER_USER": s.flower_user,
                          "TOKENMILL_FLOWER_PASSWORD": self.secrets.flower_password,
                          "TOKENMILL_SERVED_MODELS": f"{o.served_name}={self.model_dir}"}
            fh, fp = local_address(o.flower_host), o.flower_port
            self.sup.add(ChildSpec("flower", py + ["flower", "--host", o.flower_host, "--port", str(fp)],
                                   self.logs / "flower.log", env=flower_env, ready=lambda: _tcp_open(fh, fp),
                                   start_timeout_s=60, stop_timeout_s=10))
            self.sup.start("flower")
        for name in [n for n, *_ in plans] + (["flower"] if o.flower else []):
            self._wait_ready(name, 900)
        self._write_state(ready=True)

    def _start_and_wait(self, name: str, timeout_s: float) -> None:
        self.sup.start(name)
        self._wait_ready(name, timeout_s)

    def _wait_ready(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.sup.poll()
            child = self.sup.children[name]
            if child.state == "ready":
                self.say(f"{name}: ready")
                return
            if child.state == "failed":
                raise StartupError(self.failure_message(name))
            if self._stop:
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise StartupError(f"{name} was not ready after {timeout_s:.0f}s; see {child.spec.log_path}")
            time.sleep(0.2)

    def failure_message(self, name: str) -> str:
        """What to tell the user when a child could not start."""
        child = self.sup.children[name]
        tail = child.log_tail(40)
        reason = _reason(tail)
        if name.startswith("worker"):
            return (f"the worker could not load the model {self.opts.model!r} on "
                    f"{'the CPU' if name == 'worker-cpu' else name.removeprefix('worker-')}: {reason}. "
                    f"Full log: {child.spec.log_path}")
        return f"{name} could not start: {reason}. Full log: {child.spec.log_path}"

    def _write_state(self, ready: bool) -> None:
        o = self.opts
        state = {"pid": os.getpid(), "ready": ready, "started_at": self.started_at,
                 "api_url": f"http://{local_address(o.api_host)}:{o.api_port}",
                 "flower_url": f"http://{local_address(o.flower_host)}:{o.flower_port}" if o.flower else None,
                 "redis_url": self.redis_url, "model": o.served_name,
                 "first_start": list(self.secrets.created) if self.secrets else []}
        tmp = self.settings.data_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.settings.data_dir / STATE_FILE)
        self._wrote_state = True

    # run --------------------------------------------------------------------------------------
    def request_stop(self, signum: int, _frame: Any) -> None:
        """Signal handler: the first signal stops in order, the second hurries."""
        if self._stop:
            self._hurry = True
        self._stop = True

    def watch(self) -> int:
        """Supervises until asked to stop; returns 1 if a child had to be given up on."""
        live = None
        if self.opts.live and self.console.is_terminal:
            from rich.live import Live

            live = Live(console=self.console, refresh_per_second=2, transient=False)
            live.start()
        last_print = 0.0
        seen_events = len(self.sup.events)
        code = 0
        try:
            while not self._stop:
                self.sup.poll()
                for msg in self.sup.events[seen_events:]:
                    self.say(msg)
                seen_events = len(self.sup.events)
                if self.sup.failed():
                    name = self.sup.failed()[0].spec.name
                    self.say("error: " + self.failure_message(name))
                    code = 1
                    break
                status = self.status()
                if live is not None:
                    live.update(render_status(self, status))
                elif time.monotonic() - last_print > 15:
                    last_print = time.monotonic()
                    self.say(plain_status(status))
                time.sleep(0.5)
        finally:
            if live is not None:
                live.stop()
        return code

    def status(self) -> dict[str, Any]:
        """Live figures: children, workers' engine figures, queue depths, job counts."""
        from contract.prefix_routing import ROUTE_WORKERS_KEY, parse_route_worker
        from contract.queues import PRIORITY_BULK, priority_lists, queue_for, worker_queue
        from contract.redis_keys import WORKER_STATS_PATTERN, worker_of

        out: dict[str, Any] = {"children": [], "workers": [], "queue": None, "jobs": None}
        for c in self.sup.children.values():
            out["children"].append({"name": c.spec.name, "state": c.state, "pid": c.pid, "restarts": c.restarts})
        try:
            for key in self._redis.scan_iter(match=WORKER_STATS_PATTERN, count=100):
                fields = {k.decode(): v.decode() for k, v in self._redis.hgetall(key).items()}
                if fields:
                    fields["hostname"] = worker_of(key)
                    out["workers"].append(fields)
            q = queue_for(self.opts.served_name)
            # The routing workers' own queues (docs/routing.md) hold the model's tasks too.
            routed = [worker_queue(q, i.decode()) for i, raw in self._redis.hgetall(ROUTE_WORKERS_KEY).items()
                      if (entry := parse_route_worker(raw)) is not None and entry[0] == q]
            names = [pl for name in [q, *routed] for pl in priority_lists(name)]
            pipe = self._redis.pipeline(transaction=False)
            for _, n in names:
                pipe.llen(n)
            lengths = pipe.execute()
            out["queue"] = {"name": q, "interactive": sum(n for (p, _), n in zip(names, lengths) if p != PRIORITY_BULK),
                            "bulk": sum(n for (p, _), n in zip(names, lengths) if p == PRIORITY_BULK)}
        except Exception:  # noqa: BLE001 - Redis restarting: show what we have
            pass
        try:
            out["jobs"] = self._store.jobs.count_by_status()
        except Exception:  # noqa: BLE001
            pass
        out["tokens_per_s"] = sum(float(w.get("tokens_per_s", 0) or 0) for w in out["workers"])
        return out

    # shutdown ---------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stops taking work, drains the workers, then stops Flower and Redis. A start refused at
        the lock started nothing and leaves everything as it found it: the state file belongs to
        the stack that wrote it."""
        if not self.lock.held:
            return
        names = set(self.sup.children)
        workers = [n for n in self.sup.children if n.startswith("worker")]
        if "api" in names:
            self.say("stopping: the API (no new jobs from now on)")
            self.sup.stop(["api"], signal.SIGTERM, 20)
        if workers:
            self.say(f"stopping: {len(workers)} worker(s); each finishes or requeues the jobs it holds "
                     f"(up to {self.opts.drain_timeout_s:.0f}s; Ctrl-C again to hurry)")
            forced = self.sup.stop(workers, signal.SIGTERM, self.opts.drain_timeout_s, hurry=lambda: self._hurry)
            if forced:
                self.say(f"{', '.join(forced)} did not finish in time and was stopped hard; the jobs it held go back "
                         "to the queue and run at the next start")
        if "flower" in names:
            self.say("stopping: Flower")
            self.sup.stop(["flower"], signal.SIGTERM, 10)
        queued = self.status().get("queue") if self._redis is not None else None
        if "redis" in names:
            self.say("stopping: Redis (its append-only file keeps the queues)")
            self.sup.stop(["redis"], signal.SIGTERM, 30)
        if self._wrote_state:
            try:
                (self.settings.data_dir / STATE_FILE).unlink()
            except OSError:
                pass
        if self._store is not None:
            self._store.close()
        self.lock.release()
        waiting = (queued or {}).get("interactive", 0) + (queued or {}).get("bulk", 0)
        self.say("stopped." + (f" {waiting} queued task(s) wait for the next `tokenmill up`." if waiting else ""))

    def say(self, message: str) -> None:
        """One line for the person at the terminal (plain text when output goes to a file)."""
        stamp = time.strftime("%H:%M:%S")
        if self.console.is_terminal:
            from rich.markup import escape

            self.console.print(f"[dim]{stamp}[/dim] {escape(message)}", highlight=False, soft_wrap=True)
        else:
            print(f"{stamp} {message}", flush=True)


def _reason(tail: list[str]) -> str:
    """The most telling line of a log tail: the last error, else the last line."""
    for line in reversed(tail):
        low = line.lower()
        if "error" in low or "exception" in low or "cannot" in low or "refused" in low:
            return line.strip()[-400:]
    return tail[-1].strip()[-400:] if tail else "it exited without a message"


def plain_status(status: dict[str, Any]) -> str:
    """The live figures as one line (when the output is not a terminal)."""
    jobs = status.get("jobs") or {}
    q = status.get("queue") or {}
    return (f"workers {len(status['workers'])} · queued {q.get('interactive', '?')}+{q.get('bulk', '?')} bulk · "
            f"running {jobs.get('running', '?')} · succeeded {jobs.get('succeeded', '?')} · "
            f"failed {jobs.get('failed', '?')} · {status.get('tokens_per_s', 0):.1f} tokens/s")


def run_up(settings: Settings, opts: UpOptions, console: Any) -> int:
    """Runs the stack until Ctrl-C/SIGTERM; returns the exit code."""
    stack = Stack(settings, opts, console)
    signal.signal(signal.SIGINT, stack.request_stop)
    signal.signal(signal.SIGTERM, stack.request_stop)
    code = 0
    try:
        stack.preflight()
        stack.start()
        if console.is_terminal:
            console.print(render_summary(stack))
        else:
            print(render_summary_plain(stack), flush=True)
        code = stack.watch()
    except StartupError as exc:
        stack.say(f"error: {exc}")
        code = 2
    except KeyboardInterrupt:
        pass
    finally:
        stack.shutdown()
    return code


def render_summary_plain(stack: Stack) -> str:
    """The start summary for logs (no colours); keys only on the start that made them."""
    o, sec = stack.opts, stack.secrets
    assert sec is not None
    lines = [f"tokenmill is up: model {o.served_name}",
             f"  API     http://{local_address(o.api_host)}:{o.api_port}  (docs: /docs, metrics: /metrics)"]
    if o.flower:
        lines.append(f"  Flower  http://{local_address(o.flower_host)}:{o.flower_port}  (user {stack.settings.flower_user})")
    lines.append(f"  data    {stack.settings.data_dir}  (logs in {stack.logs})")
    # Key values go only to a terminal; a log file gets where they are kept.
    d = secrets_dir(stack.settings)
    if sec.created:
        lines.append(f"  keys made on this first start are in {d}: admin.key (admin), local.key "
                     f"(tenant '{LOCAL_TENANT}'), flower.password")
    return "\n".join(lines)
