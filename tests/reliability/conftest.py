"""Fixtures of the worker half of the reliability suite (`test_worker_*.py`): a migrated PostgreSQL
database per module (prefix ``tokenmill_rel``), a Redis database of the session's Redis (flushed at
the start and end of each module: that database is this suite's alone), a tiny random Llama, and a factory of real
`tokenmill worker` processes, all stopped at the end of the module, and the reconciler that API
processes run. The API half of the suite imports its own fixtures (`api_fixtures.py`) and uses none
of these."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from contract.celery_app import QueueConfig, make_celery
from pg_helpers import migrated_postgres
from services import REDIS_DB
from store import Store
from worker_process import WorkerProcess


@pytest.fixture(scope="module")
def rel_database_url(postgres_admin_url: str) -> Iterator[str]:
    with migrated_postgres(postgres_admin_url, "tokenmill_rel") as url:
        yield url


@pytest.fixture(scope="module")
def rel_store(rel_database_url: str) -> Iterator[Store]:
    s = Store.open(rel_database_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def rel_redis_url(test_redis) -> str:  # type: ignore[no-untyped-def]
    """This suite's database of the session's Redis."""
    return test_redis.db_url(REDIS_DB["relworker"])


@pytest.fixture(scope="module")
def rel_redis(rel_redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(rel_redis_url)
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture(scope="module")
def rel_celery(rel_redis: redis.Redis, rel_redis_url: str):
    """The sending side (what the API uses), on the suite's Redis database."""
    return make_celery(QueueConfig(redis_url=rel_redis_url))


@pytest.fixture(scope="module")
def rel_model_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture()
def rel_tenant(rel_store: Store) -> str:
    """A fresh tenant per test, so that counting its jobs counts the test's jobs."""
    return rel_store.keys.create_tenant(f"rel-{random.randrange(10**9)}").id


@pytest.fixture(scope="module")
def spawn_worker(rel_database_url: str, rel_redis: redis.Redis, rel_redis_url: str, rel_model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``spawn_worker(wait=True, database_url=None, redis_url=None, **kw)`` starts a worker
    for the tiny model (``kw``: `WorkerProcess` options) and, with ``wait``, returns once it
    consumes."""
    procs: list[WorkerProcess] = []

    def spawn(*, wait: bool = True, database_url: str | None = None, redis_url: str | None = None,
              **kw) -> WorkerProcess:
        log = tmp_path_factory.mktemp("worker") / "worker.log"
        w = WorkerProcess(rel_model_dir, "tiny", database_url or rel_database_url, log,
                          redis_url=redis_url or rel_redis_url, **kw)
        procs.append(w)
        return w.wait_ready(rel_redis) if wait else w

    yield spawn
    for w in procs:
        w.terminate(timeout=20)


@pytest.fixture()
def rel_reconciler(rel_store: Store, rel_redis_url: str):
    """The reconciler (`api.reconciler`) as every API process runs it, at its defaults (a pass every
    10 s over jobs open for 30 s). The worker tests assert that it sent nothing again: a task taken
    by a worker that died, even while Redis was handing it over, is recorded against that worker
    in the same step (`contract.redis_delivery`) and comes back through the workers' recovery, so
    the reconciler only covers what Redis itself loses (tests/reliability/test_redis_restart.py)."""
    from api.queue import Dispatcher
    from api.reconciler import Reconciler

    dispatcher = Dispatcher(rel_redis_url)
    reconciler = Reconciler(rel_store, dispatcher)
    reconciler.start()
    yield reconciler
    reconciler.stop()
    dispatcher.close()
