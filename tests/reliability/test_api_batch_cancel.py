"""A batch cancelled while it is `validating` (its input file still being turned into jobs) never
has a task sent and never runs a request.

The bug this pins down: the ingestion inserted jobs in chunks without looking at the batch again,
so jobs inserted after the cancel stayed `queued` in a cancelled batch, and the batch runner then
enqueued them. Now every chunk insert locks the batch row and stops if it left `validating`, and
the runner reads the jobs to send through the store only while the batch is `in_progress`.

Two levels: the store alone, with the cancel placed deterministically between two chunks; and the
live API (PostgreSQL, the suite's Redis database), cancelling through HTTP while the real ingestion runs, with a
model no worker serves, so that any task sent would still be sitting in Redis to be counted.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from api.batch_ingest import ingest_batch
from api.config import ApiConfig
from api_fixtures import (  # noqa: F401 - fixtures
    TINY,
    clear_db,
    relapi_database_url,
    relapi_model_dir,
    relapi_redis_url,
    relapi_store,
    relapi_tenant,
    start_api,
)
from store import Store

pytestmark = [pytest.mark.postgres]

ENDPOINT = "/v1/completions"


def _file(store: Store, tenant_id: str, lines: int, model: str) -> str:
    body = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": ENDPOINT,
                                "body": {"model": model, "prompt": f"line {i}", "max_tokens": 2}}).encode() + b"\n"
                    for i in range(lines))
    return store.files.create(tenant_id, io.BytesIO(body), purpose="batch", filename="in.jsonl").id


def test_store_cancel_between_ingest_chunks_leaves_nothing_to_send(relapi_store: Store,  # noqa: F811
                                                                   relapi_tenant: tuple[str, str]) -> None:  # noqa: F811
    tenant_id, _ = relapi_tenant
    batch = relapi_store.batches.create(tenant_id, input_file_id=_file(relapi_store, tenant_id, 1500, TINY),
                                        endpoint=ENDPOINT)
    seen = 0

    def prepare(body: dict[str, Any]) -> dict[str, Any]:
        nonlocal seen
        seen += 1
        if seen == 700:  # the first chunk of 500 is committed, the second is being read
            cancelled = relapi_store.batches.cancel(tenant_id, batch.id)
            assert cancelled.status == "cancelled"
        return {"prompt": body["prompt"], "params": {"max_tokens": 2}, "stream": False}

    report = ingest_batch(relapi_store, tenant_id, batch.id, prepare=prepare, max_lines=ApiConfig.batch_max_lines,
                          jobs_per_insert=500)
    assert report.stopped == "cancelled" and not report.ok
    assert relapi_store.batches.get(tenant_id, batch.id).status == "cancelled"  # type: ignore[union-attr]
    statuses = Counter(j.status for j in relapi_store.jobs.list_jobs(tenant_id, batch_id=batch.id, limit=1000).jobs)
    assert statuses == {"cancelled": 500}, statuses  # the first chunk, cancelled; nothing after it
    assert list(relapi_store.batches.queued_job_ids(tenant_id, batch.id)) == []


def test_store_hands_out_no_job_of_a_batch_cancelled_while_it_is_sent(relapi_store: Store,  # noqa: F811
                                                                       relapi_tenant: tuple[str, str]) -> None:  # noqa: F811
    tenant_id, _ = relapi_tenant
    batch = relapi_store.batches.create(tenant_id, input_file_id=_file(relapi_store, tenant_id, 30, TINY),
                                        endpoint=ENDPOINT)
    assert ingest_batch(relapi_store, tenant_id, batch.id, prepare=None, max_lines=ApiConfig.batch_max_lines).ok
    pages = relapi_store.batches.queued_job_ids(tenant_id, batch.id, page_size=10)
    first = [next(pages) for _ in range(10)]
    relapi_store.batches.cancel(tenant_id, batch.id)
    assert len(first) == 10 and list(pages) == []


@pytest.fixture
def relapi_db(relapi_redis_url: str) -> Iterator[redis.Redis]:  # noqa: F811
    r = redis.Redis.from_url(relapi_redis_url)
    clear_db(r)
    yield r
    clear_db(r)


def test_api_cancel_while_validating_sends_and_runs_nothing(relapi_db: redis.Redis, relapi_redis_url: str,  # noqa: F811
                                                           relapi_database_url: str,  # noqa: F811
                                                           relapi_model_dir: Path, relapi_store: Store,  # noqa: F811
                                                           relapi_tenant: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    tenant_id, key = relapi_tenant
    # The reconciler far more often than its default (every 10 s, jobs older than 30 s) on purpose:
    # the test shows that its passes send none of a cancelled batch's jobs, so it needs many passes
    # over the jobs during the few seconds of the ingestion.
    api = start_api(redis_url=relapi_redis_url, database_url=relapi_database_url, model_dir=relapi_model_dir,
                    log_dir=tmp_path, served_models=f"idle={relapi_model_dir}", reconcile_interval_s="0.5",
                    reconcile_min_age_s="1")
    try:
        with api.client(key) as c:
            lines = 6000
            data = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": ENDPOINT,
                                        "body": {"model": "idle", "prompt": f"line {i}", "max_tokens": 2}}).encode()
                            + b"\n" for i in range(lines))
            f = c.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})
            assert f.status_code == 200, f.text
            b = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": ENDPOINT,
                                            "completion_window": "24h"})
            assert b.status_code == 200 and b.json()["status"] == "validating", b.text
            batch_id = b.json()["id"]
            # Cancel once the ingestion has committed its first jobs, and before it has finished.
            deadline = time.monotonic() + 60
            while relapi_store.jobs.count_jobs(tenant_id, batch_id=batch_id) == 0:
                assert time.monotonic() < deadline, "the ingestion never started"
                time.sleep(0.005)
            cancel = c.post(f"/v1/batches/{batch_id}/cancel")
            assert cancel.status_code == 200 and cancel.json()["status"] in ("cancelling", "cancelled"), cancel.text
            # Let the ingestion run to its end (and the reconciler make a few passes).
            deadline = time.monotonic() + 60
            while True:
                batch = relapi_store.batches.get(tenant_id, batch_id)
                counts = relapi_store.batches.counts(tenant_id, batch_id)
                if batch.status == "cancelled" and batch.output_file_id and counts.pending == 0:  # type: ignore[union-attr]
                    break
                assert time.monotonic() < deadline, (batch, counts)
                time.sleep(0.2)
            time.sleep(2.0)
            final = c.get(f"/v1/batches/{batch_id}").json()
        jobs = {s: n for s in ("queued", "running", "succeeded", "failed", "cancelled", "expired")
                if (n := relapi_store.jobs.count_jobs(tenant_id, batch_id=batch_id, status=s))}
        tasks = {name.decode(): relapi_db.llen(name) for name in relapi_db.keys("tokenmill.idle*")}
        assert final["status"] == "cancelled" and final["in_progress_at"] is None, final
        assert sum(tasks.values()) == 0, f"tasks of a batch cancelled while validating were sent: {tasks} {jobs}"
        assert set(jobs) == {"cancelled"}, jobs
        # The cancel landed in the middle of the ingestion, which stopped there.
        assert 0 < sum(jobs.values()) < lines, jobs
        print(f"\nBATCH-CANCEL lines={lines} jobs_when_cancelled_and_after={dict(jobs)} tasks_sent=0")
    finally:
        api.proc.stop()
