"""The headline of crash recovery (issue 13): `tokenmill up` with every setting at its default and
the store on PostgreSQL, the worker SIGKILLed three times while jobs run (as the OOM killer or a
crashed host would). Every job succeeds, none is counted twice, and after each kill the jobs the
dead worker held are running again within 30 s of its replacement being ready (which `up`
restarts under the same hostname), not after the visibility timeout (an hour)."""

from __future__ import annotations

import json
import time

import pytest
import redis
from sqlalchemy import func, select

from pg_helpers import migrated_postgres
from stack_helpers import submit, wait_final
from store import Store
from store.models import Job, Result, Usage

KILLS = 3
WAVE = 10  # jobs submitted before each kill
MAX_TOKENS = 32
RUNNING_AGAIN_WITHIN_S = 30.0


def _worker(up):  # type: ignore[no-untyped-def]
    return next(c for c in up.children() if "worker" in c.cmdline())


def _instances(r: redis.Redis) -> set[bytes]:
    return set(r.scan_iter(match="tokenmill:instance:*", count=100))


def test_up_at_defaults_recovers_a_sigkilled_workers_jobs_within_seconds_three_times(
        up_factory, postgres_admin_url):
    psutil = pytest.importorskip("psutil")
    with migrated_postgres(postgres_admin_url, "tokenmill_up") as url:
        stack = up_factory(env={"TOKENMILL_DATABASE_URL": url}, args=["--no-flower"]).start()
        state = stack.wait_ready()
        r = redis.Redis.from_url(state["redis_url"])
        store = Store.open(url)
        try:
            up = psutil.Process(stack.proc.pid)
            ids: list[str] = []
            recoveries: list[tuple[float, float, int]] = []  # (after the kill, after ready, jobs held)
            with stack.client() as api:
                for k in range(KILLS):
                    ids += [submit(api, f"Count from {k * WAVE + i} upwards, in words.", max_tokens=MAX_TOKENS,
                                   ignore_eos=True) for i in range(WAVE)]
                    deadline = time.monotonic() + 120
                    while True:  # mid-run: the worker holds several jobs
                        with store.db.read() as s:
                            held = dict(s.execute(select(Job.id, Job.attempts).where(
                                Job.id.in_(ids), Job.status == "running")).all())
                        if len(held) >= 3:
                            break
                        assert time.monotonic() < deadline, "the worker never held 3 jobs"
                        time.sleep(0.1)
                    before = _instances(r)
                    _worker(up).kill()
                    killed = time.monotonic()
                    while not (_instances(r) - before):  # the replacement's heartbeat: engine loaded
                        assert time.monotonic() - killed < 180, stack.log()
                        time.sleep(0.1)
                    ready = time.monotonic()
                    while True:
                        with store.db.read() as s:
                            rows = s.execute(select(Job.id, Job.attempts, Job.status).where(Job.id.in_(held))).all()
                        if all(a > held[i] or st == "succeeded" for i, a, st in rows):
                            break
                        assert time.monotonic() - ready < RUNNING_AGAIN_WITHIN_S, (
                            f"held jobs not running again {RUNNING_AGAIN_WITHIN_S:.0f}s after the new worker was "
                            f"ready: {rows}")
                        time.sleep(0.2)
                    again = time.monotonic()
                    recoveries.append((again - killed, again - ready, len(held)))
                done = wait_final(api, ids, timeout_s=300)
            assert {j["status"] for j in done.values()} == {"succeeded"}, {j["status"] for j in done.values()}
            with store.db.read() as s:
                for table in (Result, Usage):
                    per_job = dict(s.execute(select(table.job_id, func.count()).where(table.job_id.in_(ids))
                                             .group_by(table.job_id)).all())
                    assert set(per_job) == set(ids) and set(per_job.values()) == {1}, table.__name__
                tokens = s.scalar(select(func.sum(Usage.completion_tokens)).where(Usage.job_id.in_(ids)))
                starts = dict(s.execute(select(Job.id, Job.attempts).where(Job.id.in_(ids))).all())
            assert tokens == MAX_TOKENS * len(ids)
            assert sum(a > 1 for a in starts.values()) >= KILLS  # the kills hit running jobs
            print("recoveries (s after the kill, s after the replacement was ready, jobs held): "
                  + json.dumps([[round(a, 1), round(b, 1), n] for a, b, n in recoveries]))
        finally:
            store.close()
            stack.kill()
