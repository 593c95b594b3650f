"""Fixtures for worker tests: a fresh PostgreSQL database (migrated), a Redis database of their
own on the session's Redis, and real `tokenmill worker` processes on the CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from contract.celery_app import QueueConfig, make_celery
from pg_helpers import migrated_postgres
from services import REDIS_DB
from store import Store
from worker_process import WorkerProcess

@pytest.fixture(scope="session")
def redis_url(test_redis) -> str:  # type: ignore[no-untyped-def]
    """The worker tests' database of the session's Redis."""
    return test_redis.db_url(REDIS_DB["workers"])


@pytest.fixture(scope="module")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A migrated PostgreSQL database for one test module, dropped afterwards."""
    with migrated_postgres(postgres_admin_url, "tokenmill_wtest") as url:
        yield url


@pytest.fixture(scope="module")
def store(database_url: str) -> Iterator[Store]:
    s = Store.open(database_url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """The worker tests' Redis database, flushed before and after each module."""
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture(scope="module")
def celery_app(redis_client, redis_url):
    return make_celery(QueueConfig(redis_url=redis_url))


@pytest.fixture(scope="module")
def start_worker(database_url, redis_client, redis_url, tmp_path_factory):
    """Factory: start_worker(model_dir, served, **kw) -> a ready WorkerProcess (stopped at the end)."""
    procs: list[WorkerProcess] = []

    def start(model_dir: Path, served: str, **kw) -> WorkerProcess:
        log = tmp_path_factory.mktemp("worker") / "worker.log"
        w = WorkerProcess(model_dir, served, database_url, log, redis_url=redis_url, **kw)
        procs.append(w)
        return w.wait_ready(redis_client)

    yield start
    for w in procs:
        w.terminate(timeout=20)
