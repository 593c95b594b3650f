"""Batches: the store's side of ingestion (start, add jobs, finish), lifecycle, counts,
cancellation, expiry. The batch-line rules are the API's (tests/api/test_batch_ingest.py)."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from store import FinishedJob, InvalidTransition, JobFailure, JobSpec, NotFound, Store
from store.models import Batch


def line(custom_id: str, url: str = "/v1/chat/completions", **body) -> bytes:  # type: ignore[no-untyped-def]
    body = {"model": "smollm2", "messages": [{"role": "user", "content": custom_id}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode() + b"\n"


def upload(store: Store, tenant_id: str, lines: list[bytes], purpose: str = "batch") -> str:
    return store.files.create(tenant_id, io.BytesIO(b"".join(lines)), purpose=purpose, filename="in.jsonl").id


def new_batch(store: Store, tenant_id: str, n: int = 5, **kw):  # type: ignore[no-untyped-def]
    file_id = upload(store, tenant_id, [line(f"req-{i}") for i in range(n)])
    return store.batches.create(tenant_id, input_file_id=file_id, endpoint="/v1/chat/completions", **kw)


def ingest(store: Store, tenant_id: str, batch_id: str, *, jobs_per_insert: int = 500) -> int:
    """What the API's ingestion (api/batch_ingest.py) does with a good file, in the store's three
    steps: one bulk job per line, then the batch is in_progress. Returns the number of jobs."""
    batch = store.batches.start_ingest(tenant_id, batch_id)
    assert batch.input_file_id is not None
    specs = []
    for _, raw in store.files.open_lines(tenant_id, batch.input_file_id):
        item = json.loads(raw)
        specs.append(JobSpec(model=item["body"]["model"], request=item["body"], kind="bulk",
                             api_key_id=batch.api_key_id, batch_id=batch_id, custom_id=item["custom_id"],
                             expires_at=batch.expires_at))
    for start in range(0, len(specs), jobs_per_insert):
        assert store.batches.add_jobs(tenant_id, batch_id, specs[start:start + jobs_per_insert]) is None
    assert store.batches.finish_ingest(tenant_id, batch_id, total=len(specs), errors=[]) is None
    return len(specs)


def test_an_ingested_batch_runs_its_bulk_jobs(store: Store, tenant_id: str) -> None:
    key, _ = store.keys.create_key(tenant_id)
    batch = new_batch(store, tenant_id, n=7, metadata={"team": "search"}, api_key_id=key.id)
    assert batch.status == "validating" and batch.expires_at - batch.created_at == timedelta(hours=24)
    assert ingest(store, tenant_id, batch.id, jobs_per_insert=3) == 7
    got = store.batches.get(tenant_id, batch.id)
    assert got.status == "in_progress" and got.total == 7 and got.in_progress_at is not None  # type: ignore[union-attr]
    assert got.metadata_ == {"team": "search"}  # type: ignore[union-attr]
    job = store.batches.job_by_custom_id(tenant_id, batch.id, "req-3")
    assert job is not None and (job.kind, job.model, job.api_key_id, job.status) == (
        "bulk",
        "smollm2",
        key.id,
        "queued",
    )
    assert job.request["messages"][0]["content"] == "req-3" and job.expires_at == batch.expires_at
    assert store.batches.counts(tenant_id, batch.id).pending == 7  # type: ignore[union-attr]
    assert len(list(store.jobs.iter_job_ids(tenant_id, batch_id=batch.id))) == 7


def test_full_lifecycle_counts_and_outcomes(store: Store, tenant_id: str) -> None:
    batch = new_batch(store, tenant_id, n=4)
    ingest(store, tenant_id, batch.id)
    ids = list(store.jobs.iter_job_ids(tenant_id, batch_id=batch.id))
    store.jobs.mark_running(ids, "w")
    store.jobs.record_results([FinishedJob(i, "ok", "stop", 3, 4) for i in ids[:3]])
    assert store.batches.advance(tenant_id, batch.id).status == "in_progress"
    counts = store.batches.counts(tenant_id, batch.id)
    assert (counts.total, counts.completed, counts.failed, counts.pending) == (4, 3, 0, 1)  # type: ignore[union-attr]
    store.jobs.mark_failed([JobFailure(ids[3], "context_length_exceeded", "prompt too long")])
    assert store.batches.advance(tenant_id, batch.id).status == "finalizing"

    outcomes = list(store.batches.iter_outcomes(tenant_id, batch.id, page_size=3))
    assert [j.id for j, _, _ in outcomes] == sorted(ids)
    assert sum(1 for _, r, u in outcomes if r is not None and u is not None) == 3
    out = store.files.create(tenant_id, [b'{"ok": 1}\n'], purpose="batch_output", filename="out.jsonl")
    done = store.batches.transition(tenant_id, batch.id, "completed", output_file_id=out.id)
    assert done.status == "completed" and done.completed_at is not None and done.output_file_id == out.id
    assert (done.completed, done.failed) == (3, 1)
    assert store.batches.counts(tenant_id, batch.id).failed == 1  # type: ignore[union-attr]


def test_finishing_with_errors_keeps_no_job_and_fails_the_batch(store: Store, tenant_id: str) -> None:
    batch = new_batch(store, tenant_id, n=3)
    store.batches.start_ingest(tenant_id, batch.id)
    specs = [JobSpec(model="smollm2", request={}, kind="bulk", batch_id=batch.id, custom_id=f"req-{i}")
             for i in range(2)]
    assert store.batches.add_jobs(tenant_id, batch.id, specs) is None
    errors = [{"code": "invalid_json", "message": "the line is not valid JSON", "line": 3}]
    assert store.batches.finish_ingest(tenant_id, batch.id, total=3, errors=errors) is None
    failed = store.batches.get(tenant_id, batch.id)
    assert failed.status == "failed" and failed.errors == errors and failed.failed_at is not None  # type: ignore[union-attr]
    assert failed.total == 0 and store.jobs.count_jobs(tenant_id) == 0  # type: ignore[union-attr]


def test_an_interrupted_ingestion_can_start_over(store: Store, tenant_id: str) -> None:
    batch = new_batch(store, tenant_id, n=6)
    from store.batches import insert_jobs

    partial = [
        JobSpec(model="smollm2", request={}, kind="bulk", batch_id=batch.id, custom_id=f"req-{i}") for i in range(3)
    ]
    with store.db.write() as s:  # what a crash after the first insert transaction leaves behind
        insert_jobs(s, tenant_id, partial)
    assert ingest(store, tenant_id, batch.id) == 6
    assert store.batches.get(tenant_id, batch.id).total == 6  # type: ignore[union-attr]
    assert store.jobs.count_jobs(tenant_id, batch_id=batch.id) == 6


def test_a_batch_cancelled_while_ingested_takes_no_more_jobs(store: Store, tenant_id: str) -> None:
    batch = new_batch(store, tenant_id, n=4)
    store.batches.start_ingest(tenant_id, batch.id)
    specs = [JobSpec(model="smollm2", request={}, kind="bulk", batch_id=batch.id, custom_id=f"req-{i}")
             for i in range(4)]
    assert store.batches.add_jobs(tenant_id, batch.id, specs[:2]) is None
    assert store.batches.cancel(tenant_id, batch.id).status == "cancelled"
    assert store.batches.add_jobs(tenant_id, batch.id, specs[2:]) == "cancelled"
    assert store.batches.finish_ingest(tenant_id, batch.id, total=4, errors=[]) == "cancelled"
    assert store.jobs.count_jobs(tenant_id, batch_id=batch.id) == 2
    assert store.jobs.count_jobs(tenant_id, batch_id=batch.id, status="cancelled") == 2
    with pytest.raises(ValueError, match="must name it as its batch_id"):
        store.batches.add_jobs(tenant_id, batch.id, [JobSpec(model="smollm2", request={}, custom_id="x")])


def test_create_refuses_bad_arguments(store: Store, tenant_id: str) -> None:
    file_id = upload(store, tenant_id, [line("a")])
    with pytest.raises(ValueError, match="endpoint '/v1/embeddings' is not supported"):
        store.batches.create(tenant_id, input_file_id=file_id, endpoint="/v1/embeddings")
    with pytest.raises(ValueError, match="must be hours, like '24h'"):
        store.batches.create(tenant_id, input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="1d")
    other = upload(store, tenant_id, [line("a")], purpose="fine-tune")
    with pytest.raises(ValueError, match="needs 'batch'"):
        store.batches.create(tenant_id, input_file_id=other, endpoint="/v1/chat/completions")
    with pytest.raises(NotFound):
        store.batches.create(tenant_id, input_file_id="file-missing", endpoint="/v1/chat/completions")


def test_invalid_transitions_say_what_is_allowed(store: Store, tenant_id: str) -> None:
    batch = new_batch(store, tenant_id)
    with pytest.raises(
        InvalidTransition, match="validating; it can move to in_progress, failed, cancelling, not completed"
    ):
        store.batches.transition(tenant_id, batch.id, "completed")
    ingest(store, tenant_id, batch.id)
    with pytest.raises(InvalidTransition, match="only a validating batch can be ingested"):
        store.batches.start_ingest(tenant_id, batch.id)


def test_cancel_stops_queued_jobs_and_waits_for_running_ones(store: Store, tenant_id: str) -> None:
    batch = new_batch(store, tenant_id, n=5)
    ingest(store, tenant_id, batch.id)
    ids = list(store.jobs.iter_job_ids(tenant_id, batch_id=batch.id))
    store.jobs.mark_running(ids[:2], "w")
    cancelling = store.batches.cancel(tenant_id, batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert store.jobs.count_jobs(tenant_id, batch_id=batch.id, status="cancelled") == 3
    # A redelivered task may claim a running job again; a cancelled one never runs.
    assert sorted(c.id for c in store.jobs.mark_running(ids, "w")) == sorted(ids[:2])
    store.jobs.record_results([FinishedJob(i, "ok", "stop", 1, 1) for i in ids[:2]])
    cancelled = store.batches.advance(tenant_id, batch.id)
    assert cancelled.status == "cancelled" and (cancelled.completed, cancelled.failed) == (2, 0)
    assert store.batches.counts(tenant_id, batch.id).cancelled == 3  # type: ignore[union-attr]
    assert store.batches.cancel(tenant_id, batch.id).status == "cancelled"


def test_a_batch_past_its_window_expires(store: Store, tenant_id: str) -> None:
    batch = new_batch(store, tenant_id, n=3, completion_window="1h")
    ingest(store, tenant_id, batch.id)
    ids = list(store.jobs.iter_job_ids(tenant_id, batch_id=batch.id))
    store.jobs.record_results([FinishedJob(ids[0], "ok", "stop", 1, 1)])
    with store.db.write() as s:
        s.execute(
            update(Batch)
            .where(Batch.id == batch.id)
            .values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
        )
    expired = store.batches.advance(tenant_id, batch.id)
    assert expired.status == "expired" and expired.expired_at is not None
    assert (expired.completed, expired.failed) == (1, 2)
    job = store.jobs.get_job(tenant_id, ids[1])
    assert job.status == "expired" and job.error_code == "batch_expired"  # type: ignore[union-attr]


def test_list_pages_newest_first(store: Store, tenant_id: str) -> None:
    made = [new_batch(store, tenant_id, n=1).id for _ in range(5)]
    first = store.batches.list_batches(tenant_id, limit=2)
    rest = store.batches.list_batches(tenant_id, limit=10, after=first[-1].id)
    assert [b.id for b in first + rest] == made[::-1]
    assert store.batches.count_batches(tenant_id) == 5
