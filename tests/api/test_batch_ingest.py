"""Batch ingestion, the API's side: the batch-line rules (`api.batch_lines`) and the streaming of
an input file through them into the store (`api.batch_ingest`), on the tests' PostgreSQL database.
The body rules of each endpoint, with a real model, are in tests/reliability/test_hostile_batch_parser.py."""

from __future__ import annotations

import io
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest

from api.batch_ingest import MAX_ERRORS, ingest_batch
from api.batch_lines import BatchLine, BodyRefusal, LineError, LineRules, refused_param
from api.config import ApiConfig
from store import FinishedJob, Store

MAX_LINES = ApiConfig.batch_max_lines


def line(custom_id: str, url: str = "/v1/chat/completions", model: str = "smollm2", **body: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": custom_id}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode() + b"\n"


@pytest.fixture
def tenant_id(store: Store) -> str:
    return store.keys.create_tenant(f"ingest-{uuid.uuid4().hex[:8]}").id


def new_batch(store: Store, tenant_id: str, lines: list[bytes], **kw: Any) -> str:
    file_id = store.files.create(tenant_id, io.BytesIO(b"".join(lines)), purpose="batch", filename="in.jsonl").id
    return store.batches.create(tenant_id, input_file_id=file_id, endpoint="/v1/chat/completions", **kw).id


def test_ingest_turns_each_line_into_a_bulk_job(store: Store, tenant_id: str) -> None:
    key, _ = store.keys.create_key(tenant_id)
    batch_id = new_batch(store, tenant_id, [line(f"req-{i}") for i in range(7)], api_key_id=key.id)
    report = ingest_batch(store, tenant_id, batch_id, prepare=None, max_lines=MAX_LINES, jobs_per_insert=3)
    assert report.ok and report.total == 7 and report.model == "smollm2"
    batch = store.batches.get(tenant_id, batch_id)
    assert batch is not None and batch.status == "in_progress" and batch.total == 7
    assert batch.expires_at - batch.created_at == timedelta(hours=24)
    job = store.batches.job_by_custom_id(tenant_id, batch_id, "req-3")
    assert job is not None and (job.kind, job.model, job.api_key_id, job.status) == ("bulk", "smollm2", key.id, "queued")
    assert job.request["messages"][0]["content"] == "req-3" and job.expires_at == batch.expires_at
    assert store.jobs.count_jobs(tenant_id, batch_id=batch_id) == 7


def test_a_job_stores_the_prepared_request(store: Store, tenant_id: str) -> None:
    batch_id = new_batch(store, tenant_id, [line("a"), line("b")])

    def prepare(body: dict[str, Any]) -> dict[str, Any]:
        return {"messages": body["messages"], "params": {"max_tokens": 3}, "api": "chat"}

    assert ingest_batch(store, tenant_id, batch_id, prepare=prepare, max_lines=MAX_LINES).ok
    job = store.batches.job_by_custom_id(tenant_id, batch_id, "b")
    assert job is not None and job.request == {"messages": [{"role": "user", "content": "b"}],
                                               "params": {"max_tokens": 3}, "api": "chat"}


def test_bad_lines_fail_the_batch_and_keep_no_job(store: Store, tenant_id: str) -> None:
    lines = [
        line("a"),
        b"not json\n",
        line("b", url="/v1/completions"),
        line("a"),
        b"\n",
        json.dumps({"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": {}}).encode() + b"\n",
        json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": {}}).encode() + b"\n",
        line("e", model="other"),
        line("f"),
    ]
    batch_id = new_batch(store, tenant_id, lines)
    report = ingest_batch(store, tenant_id, batch_id, prepare=None, max_lines=MAX_LINES, jobs_per_insert=1)
    assert not report.ok
    assert [(e["line"], e["code"]) for e in report.errors] == [
        (2, "invalid_json"),
        (3, "mismatched_url"),
        (4, "duplicate_custom_id"),
        (6, "invalid_method"),
        (7, "invalid_body"),
        (8, "mismatched_model"),
    ]
    failed = store.batches.get(tenant_id, batch_id)
    assert failed is not None and failed.status == "failed" and failed.errors == report.errors
    assert failed.failed_at is not None and store.jobs.count_jobs(tenant_id) == 0


def test_a_refused_body_fails_its_request_alone(store: Store, tenant_id: str) -> None:
    """A well-formed line whose body the endpoint refuses is no error of the file: its request is
    a job failed from the start (with the 400's code and message), the others run."""
    batch_id = new_batch(store, tenant_id, [line("a"), line("b", max_tokens=-1), line("c")])

    def prepare(body: dict[str, Any]) -> dict[str, Any] | BodyRefusal:
        if body.get("max_tokens", 1) < 1:
            return BodyRefusal("max_tokens: must be >= 1", "max_tokens", "invalid_value")
        return body

    report = ingest_batch(store, tenant_id, batch_id, prepare=prepare, max_lines=MAX_LINES)
    assert report.ok and report.errors == [] and report.total == 3
    batch = store.batches.get(tenant_id, batch_id)
    assert batch is not None and batch.status == "in_progress" and batch.total == 3
    bad = store.batches.job_by_custom_id(tenant_id, batch_id, "b")
    assert bad is not None and (bad.status, bad.error_code, bad.error_message) == (
        "failed", "invalid_value", "max_tokens: must be >= 1")
    assert bad.finished_at is not None and refused_param(bad.request) == "max_tokens"
    assert [j.status for j in (store.batches.job_by_custom_id(tenant_id, batch_id, c) for c in "ac")] == [
        "queued", "queued"]
    assert list(store.batches.queued_job_ids(tenant_id, batch_id)) == sorted(
        j.id for j in store.jobs.list_jobs(tenant_id, batch_id=batch_id).jobs if j.custom_id != "b")
    counts = store.batches.counts(tenant_id, batch_id)
    assert counts is not None and (counts.total, counts.failed, counts.pending) == (3, 1, 2)


def test_a_model_the_api_does_not_serve_fails_the_file(store: Store, tenant_id: str) -> None:
    batch_id = new_batch(store, tenant_id, [line("a"), line("b")])

    def prepare(body: dict[str, Any]) -> BodyRefusal:
        return BodyRefusal("model: 'smollm2' is not served here", "model", "model_not_found", whole_file=True)

    report = ingest_batch(store, tenant_id, batch_id, prepare=prepare, max_lines=MAX_LINES)
    assert [(e["line"], e["code"]) for e in report.errors] == [(1, "model_not_found"), (2, "model_not_found")]
    assert store.jobs.count_jobs(tenant_id) == 0


def test_every_line_must_name_the_same_model(store: Store, tenant_id: str) -> None:
    batch_id = new_batch(store, tenant_id, [line("a"), line("b", model="other"), line("c")])
    report = ingest_batch(store, tenant_id, batch_id, prepare=None, max_lines=MAX_LINES)
    assert report.errors == [{"code": "mismatched_model", "line": 2,
                              "message": "model: every request of a batch must use the same model ('smollm2')"}]


def test_empty_or_oversized_input_fails(store: Store, tenant_id: str) -> None:
    batch_id = new_batch(store, tenant_id, [b"\n"])
    report = ingest_batch(store, tenant_id, batch_id, prepare=None, max_lines=MAX_LINES)
    assert report.errors == [{"code": "empty_file", "message": "the input file holds no requests", "line": None}]
    batch_id = new_batch(store, tenant_id, [line(f"r{i}") for i in range(4)])
    report = ingest_batch(store, tenant_id, batch_id, prepare=None, max_lines=3)
    assert report.errors == [{"code": "too_many_requests", "message": "a batch holds at most 3 requests", "line": 4}]
    assert store.jobs.count_jobs(tenant_id) == 0


def test_at_most_max_errors_are_reported(store: Store, tenant_id: str) -> None:
    batch_id = new_batch(store, tenant_id, [b"[]\n"] * (MAX_ERRORS + 5))
    report = ingest_batch(store, tenant_id, batch_id, prepare=None, max_lines=MAX_LINES)
    assert [e["line"] for e in report.errors] == list(range(1, MAX_ERRORS + 1))
    assert store.batches.get(tenant_id, batch_id).errors == report.errors  # type: ignore[union-attr]


def test_each_line_gets_its_own_outcome() -> None:
    """The rules answer line by line: a good line, a file-level error, or a refused body that names
    its request (what a per-request error needs)."""
    rules = LineRules("/v1/chat/completions", lambda body: BodyRefusal("temperature: too hot", "temperature")
                      if "temperature" in body else body)
    assert rules.check(1, line("a").strip()) == BatchLine(1, "a", "smollm2",
                                                          {"model": "smollm2", "messages": [{"role": "user", "content": "a"}]})
    assert rules.check(2, line("a")) == LineError(2, "duplicate_custom_id", "custom_id 'a' appears more than once")
    assert rules.check(3, line("b", temperature=9)) == LineError(3, "invalid_body", "temperature: too hot", "b",
                                                                 "temperature")
    assert rules.check(4, line("c", model="other")).custom_id is None  # type: ignore[union-attr]
    assert rules.check(5, b'{"custom_id": "d", "x": NaN}') == LineError(
        5, "invalid_json", "the line is not valid JSON: NaN is not a JSON number")
    assert rules.model == "smollm2"


def test_a_json_error_at_the_end_of_a_line_names_that_column() -> None:
    unfinished = b'{"custom_id": "a", "method": "POST"'
    outcome = LineRules("/v1/chat/completions").check(1, unfinished + b"\n")
    assert isinstance(outcome, LineError) and outcome.code == "invalid_json"
    assert outcome.message.endswith(f"at column {len(unfinished) + 1}"), outcome


def test_outcomes_come_in_the_order_of_the_input_lines(store: Store, tenant_id: str) -> None:
    # Custom ids in no sorted order, more lines than a page and than an insert group: the outcomes
    # (what the output and error files are built from) still follow the input file line by line.
    names = [f"q{(i * 37) % 101:03d}" for i in range(101)]
    batch_id = new_batch(store, tenant_id, [line(n) for n in names])
    assert ingest_batch(store, tenant_id, batch_id, prepare=None, max_lines=MAX_LINES, jobs_per_insert=7).ok
    ids = list(store.jobs.iter_job_ids(tenant_id, batch_id=batch_id))
    store.jobs.mark_running(ids, "w")
    store.jobs.record_results([FinishedJob(i, "ok", "stop", 3, 4) for i in ids])
    outcomes = list(store.batches.iter_outcomes(tenant_id, batch_id, page_size=10))
    assert [job.custom_id for job, _, _ in outcomes] == names
