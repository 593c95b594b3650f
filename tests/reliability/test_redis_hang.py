"""Redis that hangs rather than refuses (SIGSTOP for 10 s, then SIGCONT: connections stay open and
nothing answers, as with a stalled server or a link that drops packets), under a live API and a
worker running jobs, every setting at its default.

While it hangs, every API call answers within a bounded time: a submission is 202 or 503 with
Retry-After (the job stored, sent later by the reconciler), a read of a job answers from the store.
Afterwards every job succeeds exactly once, and no job was started twice: the heartbeats that
expired while Redis was paused are renewed before any worker takes the others for dead.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from api_fixtures import (  # noqa: F401 - fixtures
    TINY,
    PrivateRedis,
    relapi_database_url,
    relapi_model_dir,
    relapi_store,
    relapi_tenant,
    start_api,
    start_worker,
    wait_final,
)
from store import Store
from store.models import Result, Usage

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

HANG_S = 10.0
BOUND_S = 5.0  # the longest an API call may take while Redis hangs
RUNNING = {"max_tokens": 300, "min_tokens": 300, "ignore_eos": True}
SHORT = {"max_tokens": 4, "min_tokens": 4, "ignore_eos": True}


def test_api_answers_in_bounded_time_while_redis_hangs_and_nothing_is_lost_or_doubled(
        relapi_store: Store, relapi_tenant: tuple[str, str], relapi_database_url: str,  # noqa: F811
        relapi_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    tenant_id, key = relapi_tenant
    redis = PrivateRedis(tmp_path)
    redis.start()
    worker = api = None
    try:
        worker, hostname = start_worker(redis_url=redis.url, database_url=relapi_database_url,
                                        model_dir=relapi_model_dir, log_dir=tmp_path, concurrency=16,
                                        visibility_timeout_s=3600)  # the default
        api = start_api(redis_url=redis.url, database_url=relapi_database_url, model_dir=relapi_model_dir,
                        log_dir=tmp_path)
        statuses: Counter = Counter()
        slowest = 0.0
        with api.client(key, timeout=30) as c:
            jobs = [c.post("/v1/jobs", json={"model": TINY, "prompt": "hi", "params": RUNNING}).json()["id"]
                    for _ in range(4)]
            deadline = time.monotonic() + 30
            while any(relapi_store.jobs.get_job(tenant_id, j).status != "running" for j in jobs):  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the jobs never ran"
                time.sleep(0.05)
            assert redis.proc is not None
            redis.proc.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                while time.monotonic() - stopped < HANG_S:
                    t0 = time.monotonic()
                    r = c.post("/v1/jobs", json={"model": TINY, "prompt": "hi", "params": SHORT})
                    took = time.monotonic() - t0
                    slowest = max(slowest, took)
                    statuses[r.status_code] += 1
                    assert took < BOUND_S, f"a submission took {took:.1f}s while Redis hung"
                    assert r.status_code in (202, 503), r.text
                    if r.status_code == 503:
                        assert int(r.headers["retry-after"]) > 0 and r.json()["error"]["code"] == "queue_unavailable"
                        jobs.append(r.headers["x-tokenmill-job-id"])
                    else:
                        jobs.append(r.json()["id"])
                    t0 = time.monotonic()
                    read = c.get(f"/v1/jobs/{jobs[0]}")
                    assert read.status_code == 200 and time.monotonic() - t0 < BOUND_S
                    t0 = time.monotonic()
                    ready = httpx.get(api.url + "/readyz", timeout=30)
                    slowest = max(slowest, time.monotonic() - t0)
                    assert time.monotonic() - t0 < BOUND_S and ready.status_code == 503
            finally:
                redis.proc.send_signal(signal.SIGCONT)
        assert statuses[503] >= 3, statuses
        final = wait_final(relapi_store, tenant_id, jobs, timeout=150)
        assert Counter(final.values()) == {"succeeded": len(jobs)}, Counter(final.values())
        with relapi_store.db.read() as s:
            for table in (Result, Usage):
                per_job = dict(s.execute(select(table.job_id, func.count()).where(table.job_id.in_(jobs))
                                         .group_by(table.job_id)).all())
                assert set(per_job.values()) == {1} and len(per_job) == len(jobs), table.__name__
        started = {relapi_store.jobs.get_job(tenant_id, j).attempts for j in jobs}  # type: ignore[union-attr]
        assert started == {1}, f"jobs started more than once: {started}"
        assert worker.alive()
        print(f"\nREDIS-HANG {HANG_S:.0f}s: answers {dict(statuses)}, slowest {slowest:.2f}s; "
              f"{len(jobs)} jobs all succeeded once")
    finally:
        if api is not None:
            api.proc.stop()
        if worker is not None:
            worker.stop()
        redis.kill()
