"""Retention through the product: jobs run on the live worker, `tokenmill purge` removes those past
the tenant's retention, and `/v1/usage` answers exactly the same totals before and after."""

from __future__ import annotations

import uuid
from datetime import timedelta

from conftest import ADMIN_KEY, TINY, Server, wait_job
from sqlalchemy import update
from typer.testing import CliRunner

from store import Store
from store.models import Job
from store.sql import utcnow

GROUPINGS = [[], ["model"], ["api_key"], ["day"], ["hour"], ["model", "api_key", "hour"]]


def _usage(api, group_by: list[str]) -> list[dict]:  # type: ignore[no-untyped-def]
    r = api.get("/v1/usage", params=[("group_by", g) for g in group_by])
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_purge_keeps_usage_totals_identical(server: Server, store: Store, make_key, database_url: str,
                                            redis_url: str) -> None:
    name = f"ret-{uuid.uuid4().hex[:8]}"
    key = make_key(name)
    tenant_id = store.keys.tenant_by_name(name).id  # type: ignore[union-attr]
    with server.client(ADMIN_KEY) as admin:
        assert admin.patch(f"/v1/admin/tenants/{tenant_id}", json={"retention_days": 7}).status_code == 200
    with server.client(key) as api:
        ids = [api.post("/v1/jobs", json={"model": TINY, "prompt": f"Hello {i}", "params": {"max_tokens": 4}})
               .json()["id"] for i in range(3)]
        for job_id in ids:
            assert wait_job(api, job_id)["status"] == "succeeded"
        before = {tuple(g): _usage(api, g) for g in GROUPINGS}
        assert before[()][0]["requests"] == 3
        with store.db.write() as s:  # two of them finished 8 days ago: past the tenant's 7 days
            when = utcnow() - timedelta(days=8)
            s.execute(update(Job).where(Job.id.in_(ids[:2])).values(finished_at=when))
        env = {"TOKENMILL_DATABASE_URL": database_url, "TOKENMILL_REDIS_URL": redis_url}
        from tokenmill.cli import app

        result = CliRunner().invoke(app, ["purge", "--tenant", name], env=env)
        assert result.exit_code == 0, result.output
        assert "purged 2 jobs" in result.output and "2 usage rows kept" in result.output
        assert api.get(f"/v1/jobs/{ids[0]}").status_code == 404
        assert api.get(f"/v1/jobs/{ids[2]}").json()["status"] == "succeeded"
        after = {tuple(g): _usage(api, g) for g in GROUPINGS}
    assert after == before


def test_the_periodic_purge_runs_in_one_api_process_at_a_time(store: Store, redis_url: str) -> None:
    from api.purger import Purger
    from api.queue import Dispatcher

    one, two = Dispatcher(redis_url), Dispatcher(redis_url)
    try:
        first = Purger(store, one, default_days=30, interval_s=3600)
        second = Purger(store, two, default_days=30, interval_s=3600)
        assert first.run_once() is not None
        assert second.run_once() is None  # the first holds the lock for its interval
        assert first.run_once() is not None  # and keeps it
    finally:
        one.redis.delete("tokenmill:lock:retention-purge")
        one.close()
        two.close()
