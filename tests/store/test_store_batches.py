"""Batches: ingestion of the input file into jobs, lifecycle, counts, cancellation, expiry."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from store import FinishedJob, InvalidTransition, JobFailure, NotFound, Store
from store.models import Batch


def line(custom_id: str, url: str = "/v1/chat/completions", **body) -> bytes:  # type: ignore[no-untyped-def]
    body = {"model": "smollm2", "messages": [{"role": "user", "content": custom_id}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode() + b"\n"


def upload(store: Store, tenant_id: str, lines: list[bytes], purpose: str = "batch") -> str:
    return store.files.create(tenant_id, io.BytesIO(b"".join(lines)), purpose=purpose, filename="in.jsonl").id


def new_batch(store: Store, tenant_id: str, n: int = 5, **kw):  # type: ignore[no-untyped-def]
    file_id = upload(store, tenant_id, [line(f"req-{i}") for i in range(n)])
    return store.batches.create(tenant_id, input_file_id=file_id, endpoint="/v1/chat/completions", **kw)


def test_ingest_turns_each_line_into_a_bulk_job(store: Store, tenant_id: str) -> None:
    key, _ = store.keys.create_key(tenant_id)
    batch = new_batch(store, tenant_id, n=7, metadata={"team": "search"}, api_key_id=key.id)
    assert batch.status == "validating" and batch.expires_at - batch.created_at == timedelta(hours=24)
    report = store.batches.ingest(tenant_id, batch.id, jobs_per_insert=3)
    assert report.ok and report.total == 7
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
    store.batches.ingest(tenant_id, batch.id)
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


def test_bad_lines_fail_the_batch_and_keep_no_job(store: Store, tenant_id: str) -> None:
    lines = [
        line("a"),
        b"not json\n",
        line("b", url="/v1/completions"),
        line("a"),
        b"\n",
        json.dumps({"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": {}}).encode() + b"\n",
        json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": {}}).encode() + b"\n",
        line("e"),
    ]
    file_id = upload(store, tenant_id, lines)
    batch = store.batches.create(tenant_id, input_file_id=file_id, endpoint="/v1/chat/completions")
    report = store.batches.ingest(tenant_id, batch.id, jobs_per_insert=1)
    assert not report.ok
    assert [(e["line"], e["code"]) for e in report.errors] == [
        (2, "invalid_json"),
        (3, "mismatched_url"),
        (4, "duplicate_custom_id"),
        (6, "invalid_method"),
        (7, "invalid_body"),
    ]
    failed = store.batches.get(tenant_id, batch.id)
    assert failed.status == "failed" and failed.errors == report.errors and failed.failed_at is not None  # type: ignore[union-attr]
    assert store.jobs.count_jobs(tenant_id) == 0


def test_an_interrupted_ingestion_can_start_over(store: Store, tenant_id: str) -> None:
    batch = new_batch(store, tenant_id, n=6)
    from store.batches import insert_jobs
    from store.types import JobSpec

    partial = [
        JobSpec(model="smollm2", request={}, kind="bulk", batch_id=batch.id, custom_id=f"req-{i}") for i in range(3)
    ]
    with store.db.write() as s:  # what a crash after the first insert transaction leaves behind
        insert_jobs(s, tenant_id, partial)
    report = store.batches.ingest(tenant_id, batch.id)
    assert report.ok and report.total == 6
    assert store.jobs.count_jobs(tenant_id, batch_id=batch.id) == 6


def test_validate_hook_rejects_bodies(store: Store, tenant_id: str) -> None:
    file_id = upload(store, tenant_id, [line("a"), line("b", max_tokens=-1)])
    batch = store.batches.create(tenant_id, input_file_id=file_id, endpoint="/v1/chat/completions")

    def validate(body):  # type: ignore[no-untyped-def]
        return "max_tokens must be positive" if body.get("max_tokens", 1) < 1 else None

    report = store.batches.ingest(tenant_id, batch.id, validate=validate)
    assert report.errors == [{"code": "invalid_body", "message": "max_tokens must be positive", "line": 2}]


def test_empty_or_oversized_input_fails(store: Store, tenant_id: str) -> None:
    file_id = upload(store, tenant_id, [b"\n"])
    batch = store.batches.create(tenant_id, input_file_id=file_id, endpoint="/v1/chat/completions")
    assert store.batches.ingest(tenant_id, batch.id).errors[0]["code"] == "empty_file"
    batch = new_batch(store, tenant_id, n=4)
    report = store.batches.ingest(tenant_id, batch.id, max_lines=3)
    assert report.errors[0]["code"] == "too_many_requests" and store.jobs.count_jobs(tenant_id) == 0


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
    store.batches.ingest(tenant_id, batch.id)
    with pytest.raises(InvalidTransition, match="only a validating batch can be ingested"):
        store.batches.ingest(tenant_id, batch.id)


def test_cancel_stops_queued_jobs_and_waits_for_running_ones(store: Store, tenant_id: str) -> None:
    batch = new_batch(store, tenant_id, n=5)
    store.batches.ingest(tenant_id, batch.id)
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
    store.batches.ingest(tenant_id, batch.id)
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
