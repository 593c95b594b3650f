"""Fixtures for worker tests: a fresh PostgreSQL database (migrated), a Redis database of their
own, and real `tokenmill worker` processes on the CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from contract.celery_app import QueueConfig, make_celery
from pg_helpers import migrated_postgres
from store import Store
from worker_process import WorkerProcess

REDIS_URL = os.environ.get("TOKENMILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


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


@pytest.fixture(scope="module")
def start_worker(database_url, redis_client, tmp_path_factory):
    """Factory: start_worker(model_dir, served, **kw) -> a ready WorkerProcess (stopped at the end)."""
    procs: list[WorkerProcess] = []

    def start(model_dir: Path, served: str, **kw) -> WorkerProcess:
        log = tmp_path_factory.mktemp("worker") / "worker.log"
        w = WorkerProcess(model_dir, served, database_url, log, redis_url=REDIS_URL, **kw)
        procs.append(w)
        return w.wait_ready(redis_client)

    yield start
    for w in procs:
        w.terminate(timeout=20)
