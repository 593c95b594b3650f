"""Fixtures for the API tests: a migrated PostgreSQL database, a Redis database of their own on the
session's Redis (flushed), a real CPU worker process on a tiny model, and live API servers (uvicorn subprocesses
on free ports). Everything is session-scoped: starting a worker costs seconds."""

from __future__ import annotations

import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from logged_process import LoggedProcess as Proc
from pg_helpers import migrated_postgres
from services import REDIS_DB
from store import Store

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "tm-admin-test-key"
TINY = "tiny"


@pytest.fixture(scope="session")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A migrated PostgreSQL database for the session, dropped afterwards."""
    with migrated_postgres(postgres_admin_url, "tokenmill_apitest") as url:
        yield url


@pytest.fixture(scope="session")
def store(database_url: str) -> Iterator[Store]:
    """The test database's store (to arrange and check what the API did)."""
    s = Store.open(database_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def redis_url(test_redis) -> str:  # type: ignore[no-untyped-def]
    """The API tests' database of the session's Redis."""
    return test_redis.db_url(REDIS_DB["api"])


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """The tests' Redis database, flushed before and after."""
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture(scope="session")
def tiny_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (fast on a CPU)."""
    return tiny_model_dir("llama")


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def worker(database_url: str, redis_url: str, redis_client: redis.Redis, tiny_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A real `tokenmill worker` on the CPU serving the tiny model as "tiny"."""
    hostname = f"tiny-{uuid.uuid4().hex[:6]}@apitest"
    env = {"TOKENMILL_DATABASE_URL": database_url, "TOKENMILL_REDIS_URL": redis_url,
           "TOKENMILL_VISIBILITY_TIMEOUT_S": "30"}
    p = Proc([sys.executable, "-m", "tokenmill.cli", "worker", "--model", str(tiny_dir), "--served-name", TINY,
              "--device", "cpu", "--dtype", "float32", "--concurrency", "8", "--hostname", hostname],
             env, tmp_path_factory.mktemp("worker") / "worker.log")
    deadline = time.monotonic() + 180
    while True:
        if p.proc.poll() is not None:
            raise AssertionError(f"worker exited with {p.proc.returncode}:\n{p.log()}")
        if redis_client.exists(f"tokenmill:worker:{hostname}") and b"ready" in p.log_path.read_bytes():
            time.sleep(0.5)
            break
        if time.monotonic() > deadline:
            p.stop()
            raise AssertionError(f"worker not ready:\n{p.log()}")
        time.sleep(0.2)
    yield p
    p.stop()


@dataclass
class Server:
    """A live API server."""

    url: str
    proc: Proc

    def client(self, key: str | None = None, **kw: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)  # type: ignore[arg-type]


def start_server(database_url: str, redis_url: str, tiny_dir: Path, log_dir: Path, **settings: str) -> Server:
    """Starts `uvicorn tokenmill.cli_api:make_app` on a free port with these TOKENMILL_* settings."""
    port = free_port()
    env = {"TOKENMILL_DATABASE_URL": database_url, "TOKENMILL_REDIS_URL": redis_url,
           "TOKENMILL_SERVED_MODELS": f"{TINY}={tiny_dir}", "TOKENMILL_ADMIN_KEY": ADMIN_KEY,
           **{f"TOKENMILL_{k.upper()}": v for k, v in settings.items()}}
    p = Proc([sys.executable, "-m", "uvicorn", "tokenmill.cli_api:make_app", "--factory", "--host", "127.0.0.1",
              "--port", str(port), "--log-level", "warning"], env, log_dir / f"api-{port}.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if p.proc.poll() is not None:
            raise AssertionError(f"API exited with {p.proc.returncode}:\n{p.log()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return Server(url, p)
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            p.stop()
            raise AssertionError(f"API not up:\n{p.log()}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def server(database_url: str, redis_url: str, tiny_dir: Path, worker: Proc,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The live API (with a live worker behind it)."""
    # webhook_interval_s=0: this process sends no webhooks. At the default (a pass every second) it
    # could take the one sending lock (one API process at a time sends, per Redis) and then refuse
    # test_api_webhooks.py's loopback receiver, which only that test's own process is allowed to
    # reach: API processes sharing a Redis are meant to share their settings, these two do not.
    s = start_server(database_url, redis_url, tiny_dir, tmp_path_factory.mktemp("api"), batch_max_lines="5000",
                     webhook_interval_s="0")
    yield s
    s.proc.stop()


@pytest.fixture(scope="session")
def make_key(store: Store) -> Callable[[str], str]:
    """Factory: make_key(tenant name) -> a live key of that tenant (created on first use)."""

    def make(tenant: str) -> str:
        t = store.keys.tenant_by_name(tenant) or store.keys.create_tenant(tenant)
        return store.keys.create_key(t.id, name="test")[1]

    return make


@pytest.fixture(scope="session")
def key(make_key: Callable[[str], str]) -> str:
    """A key of tenant "acme"."""
    return make_key("acme")


@pytest.fixture(scope="session")
def other_key(make_key: Callable[[str], str]) -> str:
    """A key of tenant "globex", who must never see acme's objects."""
    return make_key("globex")


@pytest.fixture
def api(server: Server, key: str) -> Iterator[httpx.Client]:
    """An HTTP client of tenant "acme"."""
    with server.client(key) as c:
        yield c


def wait_job(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    """Polls a job until it is final."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not final after {timeout}s: {job}")
