"""Helpers and fixtures for the Redis/API half of the reliability suite (`test_api_*.py`,
`test_redis_*.py`): a migrated PostgreSQL database, a database of the session's Redis for tests that
need no Redis of their own, private `redis-server` processes that a test may stop and restart at will, real `tokenmill worker` processes on a tiny random Llama, and live API
servers (uvicorn subprocesses). Nothing is mocked.

Test modules import the fixtures they use from here (`from api_fixtures import ...`), so this file
needs no conftest.py and shares nothing with the worker-fault tests of the same folder.
"""

from __future__ import annotations

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
from services import REDIS_DB, PrivateRedis
from store import Store
from tokenmill.redis_embedded import free_port

__all__ = ["PrivateRedis"]  # re-exported: the tests that stop Redis import it from here

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny"
FINAL = ("succeeded", "failed", "cancelled", "expired")


def rss_bytes(pid: int) -> int:
    """A process's resident memory (Linux: VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def clear_db(r: redis.Redis) -> None:
    """Empties one Redis database (FLUSHDB of that database only; never FLUSHALL)."""
    r.flushdb()


def start_worker(*, redis_url: str, database_url: str, model_dir: Path, log_dir: Path, served: str = TINY,
                 concurrency: int = 8, visibility_timeout_s: int | None = None, wait_s: float = 180) -> tuple[Proc, str]:
    """Starts a real `tokenmill worker` on the CPU and waits until it consumes; returns it and its
    Celery hostname (the name jobs record as their worker)."""
    hostname = f"{served}-{uuid.uuid4().hex[:6]}@relapi"
    env = {"TOKENMILL_DATABASE_URL": database_url, "TOKENMILL_REDIS_URL": redis_url}
    if visibility_timeout_s is not None:  # the default unless a test says why it may not
        env["TOKENMILL_VISIBILITY_TIMEOUT_S"] = str(visibility_timeout_s)
    p = Proc([sys.executable, "-m", "tokenmill.cli", "worker", "--model", str(model_dir), "--served-name", served,
              "--device", "cpu", "--dtype", "float32", "--concurrency", str(concurrency), "--hostname", hostname],
             env, log_dir / f"worker-{hostname.split('@')[0]}.log")
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + wait_s
    while True:
        if not p.alive():
            raise AssertionError(f"worker exited with {p.proc.returncode}:\n{p.log()}")
        if r.exists(f"tokenmill:worker:{hostname}") and b"ready" in p.log_path.read_bytes():
            time.sleep(0.5)  # the consumer starts a moment after the "ready" line
            return p, hostname
        if time.monotonic() > deadline:
            p.stop()
            raise AssertionError(f"worker not ready:\n{p.log()}")
        time.sleep(0.2)


@dataclass
class Server:
    """A live API server."""

    url: str
    proc: Proc

    def client(self, key: str | None = None, **kw: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, **{"timeout": 120, **kw})  # type: ignore[arg-type]


def start_api(*, redis_url: str, database_url: str, model_dir: Path, log_dir: Path, **settings: str) -> Server:
    """Starts `uvicorn tokenmill.cli_api:make_app` on a free port with these TOKENMILL_* settings."""
    port = free_port()
    env = {"TOKENMILL_DATABASE_URL": database_url, "TOKENMILL_REDIS_URL": redis_url,
           "TOKENMILL_SERVED_MODELS": f"{TINY}={model_dir}",
           **{f"TOKENMILL_{k.upper()}": v for k, v in settings.items()}}
    p = Proc([sys.executable, "-m", "uvicorn", "tokenmill.cli_api:make_app", "--factory", "--host", "127.0.0.1",
              "--port", str(port), "--log-level", "warning"], env, log_dir / f"api-{port}.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if not p.alive():
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


def wait_final(store: Store, tenant_id: str, job_ids: list[str], timeout: float) -> dict[str, str]:
    """Waits until every job is final (or the time is up); returns each job's status."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = job_statuses(store, tenant_id, job_ids)
        if all(s in FINAL for s in statuses.values()) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.25)


def job_statuses(store: Store, tenant_id: str, job_ids: list[str]) -> dict[str, str]:
    """Each job's status as the store has it ("missing" for a job that is not there)."""
    out = {}
    for job_id in job_ids:
        job = store.jobs.get_job(tenant_id, job_id)
        out[job_id] = job.status if job is not None else "missing"
    return out


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def relapi_database_url(postgres_admin_url: str) -> Iterator[str]:
    """A migrated PostgreSQL database for these tests, dropped afterwards."""
    with migrated_postgres(postgres_admin_url, "tokenmill_relapi") as url:
        yield url


@pytest.fixture(scope="session")
def relapi_store(relapi_database_url: str) -> Iterator[Store]:
    """The test database's store (to arrange and to check what the services did)."""
    s = Store.open(relapi_database_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def relapi_model_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (fast on a CPU)."""
    return tiny_model_dir("llama")


@pytest.fixture
def relapi_tenant(relapi_store: Store) -> tuple[str, str]:
    """A fresh tenant of one test and one of its keys: (tenant id, key)."""
    name = f"relapi-{uuid.uuid4().hex[:8]}"
    t = relapi_store.keys.create_tenant(name)
    return t.id, relapi_store.keys.create_key(t.id, name="relapi")[1]


@pytest.fixture(scope="session")
def relapi_redis_url(test_redis) -> str:  # type: ignore[no-untyped-def]
    """This suite's database of the session's Redis, for tests that need no Redis of their own."""
    return test_redis.db_url(REDIS_DB["relapi"])


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A Redis server of this test only, started; killed at the end."""
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    r.kill()
