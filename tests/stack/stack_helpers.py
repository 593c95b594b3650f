"""Helpers of the whole-stack tests: `tokenmill up` as a real subprocess with its own data
directory (embedded Redis, SQLite store) on free loopback ports, and the built-in model on the CPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
FINAL = {"succeeded", "failed", "cancelled", "expired"}


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UpStack:
    """One `tokenmill up --no-live` process and the files it keeps in its data directory."""

    def __init__(self, data_dir: Path, log_path: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.api_port = free_port()
        self.flower_port = free_port()
        self.args = args or []
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("TOKENMILL_REDIS_URL", "TOKENMILL_DATABASE_URL", "TOKENMILL_ADMIN_KEY",
                                 "TOKENMILL_API_KEY", "TOKENMILL_API_URL", "TOKENMILL_FLOWER_PASSWORD")}
        self.env.update({"TOKENMILL_DATA_DIR": str(data_dir), "TOKENMILL_API_PORT": str(self.api_port),
                         "TOKENMILL_FLOWER_PORT": str(self.flower_port), "PYTHONUNBUFFERED": "1",
                         "COLUMNS": "160", **(env or {})})
        self.proc: subprocess.Popen | None = None

    def start(self) -> "UpStack":
        """Starts `tokenmill up` (its output appended to the log file)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "up", "--no-live", *self.args],
                                         cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 240.0) -> dict:
        """Waits until this process wrote its ready state file; fails with its log if it exits."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tokenmill up exited with {self.proc.returncode}:\n{self.log()}")
            try:
                state = json.loads((self.data_dir / "up.json").read_text())
                if state.get("ready") and state.get("pid") == self.proc.pid:
                    return state
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        pytest.fail(f"tokenmill up not ready after {timeout_s}s:\n{self.log()}")

    def run_to_exit(self, timeout_s: float = 120.0) -> int:
        """For a start that must fail: waits for the exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def interrupt(self, timeout_s: float = 180.0) -> int:
        """Ctrl-C: SIGINT, as a terminal sends it; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """Teardown of a test that failed midway: SIGTERM (ordered stop), then SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        """What `tokenmill up` printed."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    def secret(self, name: str) -> str:
        """A key `tokenmill up` made on its first start (admin.key, local.key, flower.password)."""
        return (self.data_dir / "secrets" / name).read_text().strip()

    def client(self) -> httpx.Client:
        """An HTTP client of the API with the local tenant's key."""
        return httpx.Client(base_url=self.api_url, timeout=30,
                            headers={"Authorization": f"Bearer {self.secret('local.key')}"})


def submit(client: httpx.Client, content: str, max_tokens: int = 16, **params: object) -> str:
    """Submits a chat job; returns its id."""
    r = client.post("/v1/jobs", json={"model": MODEL, "messages": [{"role": "user", "content": content}],
                                      "params": {"max_tokens": max_tokens, "temperature": 0, **params}})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_final(client: httpx.Client, job_ids: list[str], timeout_s: float = 120.0) -> dict[str, dict]:
    """Polls the jobs until every one is final."""
    deadline = time.monotonic() + timeout_s
    done: dict[str, dict] = {}
    while time.monotonic() < deadline:
        for jid in [j for j in job_ids if j not in done]:
            job = client.get(f"/v1/jobs/{jid}").json()
            if job["status"] in FINAL:
                done[jid] = job
        if len(done) == len(job_ids):
            return done
        time.sleep(0.3)
    pytest.fail(f"jobs not final after {timeout_s}s: {[j for j in job_ids if j not in done]}")
