"""A real `tokenmill worker` subprocess on the CPU, for the worker and reliability tests."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import redis

from logged_process import LoggedProcess


class WorkerProcess(LoggedProcess):
    """A `tokenmill worker` subprocess whose output goes to ``log_path``."""

    def __init__(self, model_dir: Path, served: str, database_url: str, log_path: Path, *, redis_url: str,
                 concurrency: int = 64, visibility_timeout_s: int | None = None, extra_env: dict | None = None,
                 extra_args: list[str] | None = None, hostname: str | None = None) -> None:
        self.hostname = hostname or f"{served}-{uuid.uuid4().hex[:6]}@test"
        # The visibility timeout stays at its default unless a test says why it may not.
        env = {"TOKENMILL_DATABASE_URL": database_url, "TOKENMILL_REDIS_URL": redis_url, **(extra_env or {})}
        if visibility_timeout_s is not None:
            env["TOKENMILL_VISIBILITY_TIMEOUT_S"] = str(visibility_timeout_s)
        super().__init__(
            [sys.executable, "-m", "tokenmill.cli", "worker", "--model", str(model_dir), "--served-name", served,
             "--device", "cpu", "--dtype", "float32", "--concurrency", str(concurrency), "--hostname", self.hostname,
             "--loglevel", "INFO", *(extra_args or [])],
            env, log_path)

    @property
    def stats_key(self) -> str:
        """The Redis hash of this worker's live engine figures."""
        return f"tokenmill:worker:{self.hostname}"

    def wait_ready(self, r: redis.Redis, timeout: float = 120.0) -> "WorkerProcess":
        """Waits for the worker's engine figures to appear (published once the model is loaded)
        and for Celery to consume."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if r.exists(self.stats_key) and b"ready" in self.log_path.read_bytes():
                time.sleep(0.5)  # the consumer starts right after the ready line
                return self
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit code."""
        return self.stop(timeout)
