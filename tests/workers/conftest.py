"""Fixtures for worker tests: a fresh PostgreSQL database (migrated), a Redis database of their
own, and real `tokenmill worker` processes on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pg_helpers import migrated_postgres
from store import Store
from workers.app import QueueConfig, make_celery

REDIS_URL = os.environ.get("TOKENMILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A migrated PostgreSQL database for one test module, dropped afterwards."""
    with migrated_postgres("tokenmill_wtest") as url:
        yield url


@pytest.fixture(scope="module")
def store(database_url: str) -> Iterator[Store]:
    s = Store.open(database_url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def redis_client() -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture(scope="module")
def celery_app(redis_client):
    return make_celery(QueueConfig(redis_url=REDIS_URL, visibility_timeout_s=5))


class WorkerProcess:
    """A `tokenmill worker` subprocess."""

    def __init__(self, model_dir: Path, served: str, database_url: str, log_path: Path,
                 concurrency: int = 64, visibility_timeout_s: int = 5, extra_env: dict | None = None) -> None:
        self.hostname = f"{served}-{uuid.uuid4().hex[:6]}@test"
        env = {**os.environ, "TOKENMILL_DATABASE_URL": database_url, "TOKENMILL_REDIS_URL": REDIS_URL,
               "TOKENMILL_VISIBILITY_TIMEOUT_S": str(visibility_timeout_s), "PYTHONUNBUFFERED": "1",
               **(extra_env or {})}
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.cli", "worker", "--model", str(model_dir), "--served-name", served,
             "--device", "cpu", "--dtype", "float32", "--concurrency", str(concurrency), "--hostname", self.hostname,
             "--loglevel", "INFO"],
            env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, r: redis.Redis, timeout: float = 120.0) -> "WorkerProcess":
        """Waits for the worker's engine figures to appear (published once the model is loaded)
        and for Celery to consume."""
        deadline = time.monotonic() + timeout
        key = f"tokenmill:worker:{self.hostname}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if r.exists(key) and b"ready" in self.log_path.read_bytes():
                time.sleep(0.5)  # the consumer starts right after the ready line
                return self
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: no cleanup, no acknowledgements."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def start_worker(database_url, redis_client, tmp_path_factory):
    """Factory: start_worker(model_dir, served, **kw) -> a ready WorkerProcess (stopped at the end)."""
    procs: list[WorkerProcess] = []

    def start(model_dir: Path, served: str, **kw) -> WorkerProcess:
        log = tmp_path_factory.mktemp("worker") / "worker.log"
        w = WorkerProcess(model_dir, served, database_url, log, **kw)
        procs.append(w)
        return w.wait_ready(redis_client)

    yield start
    for w in procs:
        w.terminate(timeout=20)
