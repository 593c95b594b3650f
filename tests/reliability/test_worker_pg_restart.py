"""PostgreSQL restarted (stopped as if it crashed, down for seconds, started again) while a worker
records results and claims new jobs: the writes are retried until the database is back, and every
job is stored exactly once. The cluster is the test's own, on a port of its own."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from relworker import assert_each_stored_once, create, payloads, send, status_counts, submit, unacked, wait_final
from services import PrivatePostgres, require_postgres_bindir
from store import Store
from store.migrate import upgrade

DOWN_S = 4.0


@pytest.fixture()
def private_pg() -> Iterator[tuple[PrivatePostgres, str]]:
    """A private cluster with a migrated database; its URL."""
    pg = PrivatePostgres(require_postgres_bindir())
    try:
        pg.start()
        admin = create_engine(pg.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE tokenmill_rel"))
        admin.dispose()
        url = pg.url("tokenmill_rel")
        upgrade(url)
        yield pg, url
    finally:
        pg.destroy()


def test_postgres_restart_while_recording_loses_and_doubles_nothing(
        private_pg, rel_celery, rel_redis, spawn_worker):
    pg, url = private_pg
    store = Store.open(url)
    try:
        tenant = store.keys.create_tenant("pg-restart").id
        rng = random.Random(13)
        # The first wave runs when the database stops (its results wait to be recorded); the second
        # is sent while it is down, to a worker with free slots: it claims them at once.
        first_wave = payloads(rng, 48, (4, 16), (8, 160))
        second_wave = payloads(rng, 48, (4, 16), (4, 8))
        worker = spawn_worker(database_url=url, concurrency=64)
        ids = submit(store, rel_celery, tenant, first_wave)
        later = create(store, tenant, second_wave)  # stored now, their tasks sent while the database is down
        deadline = time.monotonic() + 60
        while True:
            counts = status_counts(store, tenant)
            if counts["succeeded"] >= 8 and int(rel_redis.hget(worker.stats_key, "running") or 0) >= 8:
                break
            assert time.monotonic() < deadline, f"no stop point: {dict(counts)}"
            time.sleep(0.05)

        pg.stop("immediate")  # as if it crashed: every connection cut, no checkpoint
        down_at = time.monotonic()
        send(rel_celery, later)  # the worker claims these while it cannot reach the store
        time.sleep(DOWN_S)
        pg.start()
        print(f"PostgreSQL down {time.monotonic() - down_at:.1f}s with {dict(counts)} of {len(ids)} "
              f"(+{len(later)} sent meanwhile)")

        everything = ids + later
        final = wait_final(store, tenant, len(everything), timeout=120)
        assert final == {"succeeded": len(everything)}, dict(final)
        assert_each_stored_once(store, everything, first_wave + second_wave)
        log = worker.log_path.read_text(errors="replace")
        claims, writes = log.count("store call failed"), log.count("results failed")
        assert claims and writes, f"the outage was not felt by claims ({claims}) and writes ({writes})"
        assert worker.alive(), worker.log()
        time.sleep(1.0)
        assert unacked(rel_redis) == 0
        print(f"retried: {claims} claims, {writes} result writes; all {len(everything)} jobs stored once")
        worker.terminate(timeout=30)
    finally:
        store.close()
