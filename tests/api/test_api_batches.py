"""Files and batches end to end with the `openai` client: upload, create, run on the worker,
output and error files in OpenAI's format, validation failures, cancellation, tenant isolation."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest
from conftest import TINY, Server


@pytest.fixture
def client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def _wait_batch(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {b.status}")


def test_chat_batch_runs_to_completed_with_output_file_in_input_order(client: openai.OpenAI) -> None:
    # Custom ids in no sorted order: the output file lists them as the input file does.
    ids = ["zeta", "r1", "alpha", "r0", "mid", "b"]
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": TINY, "messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 4}}
             for i, cid in enumerate(ids)]
    f = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0
    assert client.files.retrieve(f.id).filename == "in.jsonl"
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"team": "nlp"})
    assert batch.status == "validating"
    done = _wait_batch(client, batch.id, ("completed", "failed"))
    assert done.status == "completed", done
    assert done.request_counts.total == 6 and done.request_counts.completed == 6
    assert done.metadata == {"team": "nlp"}
    assert done.usage is not None and done.usage.output_tokens >= 6
    assert done.output_file_id and done.error_file_id is None
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == ids
    for o in out:
        assert o["error"] is None and o["response"]["status_code"] == 200
        assert o["response"]["body"]["object"] == "chat.completion"
        assert o["response"]["body"]["usage"]["completion_tokens"] >= 1
    assert done.id in [b.id for b in client.batches.list()]


def test_completions_batch(client: openai.OpenAI) -> None:
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": TINY, "prompt": f"Number {i}", "max_tokens": 3}} for i in range(3)]
    f = client.files.create(file=("c.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    done = _wait_batch(client, batch.id, ("completed", "failed"))
    assert done.status == "completed"
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert {o["response"]["body"]["object"] for o in out} == {"text_completion"}


def test_invalid_lines_fail_the_batch_with_per_line_errors(client: openai.OpenAI) -> None:
    """Errors of the file (not JSON, another model, method or url) fail the whole batch in
    validating, with OpenAI's errors.data entries."""
    lines = [
        {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": TINY, "messages": [{"role": "user", "content": "fine"}]}},
        {"custom_id": "bad-model", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}},
        {"custom_id": "get", "method": "GET", "url": "/v1/chat/completions",
         "body": {"model": TINY, "messages": [{"role": "user", "content": "x"}]}},
        {"custom_id": "url", "method": "POST", "url": "/v1/completions", "body": {"model": TINY, "prompt": "x"}},
        {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": TINY, "messages": [{"role": "user", "content": "again"}]}},
    ]
    raw = _jsonl(lines) + b"{not json\n"
    f = client.files.create(file=("bad.jsonl", io.BytesIO(raw)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = _wait_batch(client, batch.id, ("failed", "completed"))
    assert done.status == "failed" and done.in_progress_at is None
    errors = {e.line: e for e in done.errors.data}  # type: ignore[union-attr]
    assert [(line, errors[line].code) for line in sorted(errors)] == [
        (2, "mismatched_model"), (3, "invalid_method"), (4, "mismatched_url"), (5, "duplicate_custom_id"),
        (6, "invalid_json")]
    assert "model" in (errors[2].message or "")
    only_unserved = [{"custom_id": "m", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}]
    f = client.files.create(file=("bad2.jsonl", io.BytesIO(_jsonl(only_unserved))), purpose="batch")
    done = _wait_batch(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                     completion_window="24h").id, ("failed", "completed"))
    assert done.status == "failed" and done.errors.data[0].code == "model_not_found"  # type: ignore[union-attr]


def test_a_bad_request_fails_alone(client: openai.OpenAI) -> None:
    """A 20-line batch with one bad body completes: 19 outputs and 1 error line in OpenAI's shape,
    matched by custom_id, the bad request counted as failed."""
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": TINY, "messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 3}}
             for i in range(20)]
    lines[7]["body"]["max_tokens"] = -5
    f = client.files.create(file=("one-bad.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = _wait_batch(client, batch.id, ("completed", "failed"))
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (20, 19, 1)
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(f"r{i}" for i in range(20) if i != 7)
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in out)
    assert done.error_file_id is not None
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert len(errors) == 1
    err = errors[0]
    assert set(err) == {"id", "custom_id", "response", "error"} and err["error"] is None
    assert err["custom_id"] == "r7" and err["id"].startswith("batch_req_")
    response = err["response"]
    assert response["status_code"] == 400 and response["request_id"]
    body = response["body"]["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == "max_tokens"
    assert "max_tokens" in body["message"]
    # The request of the error line is the job the batch made of line 8: its error is the same.
    job = client.get(f"/jobs/{response['request_id']}", cast_to=httpx.Response).json()
    assert (job["status"], job["custom_id"], job["error"]["message"]) == ("failed", "r7", body["message"])


# More requests than the worker claims at once (its 8 task slots hold 64 requests each), so
# some are surely still queued when the batch is cancelled.
N_CANCEL = 1500


def test_cancel_keeps_what_ran_and_cancels_the_rest(client: openai.OpenAI, store, worker) -> None:
    lines = [{"custom_id": f"x{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": TINY, "prompt": "go", "max_tokens": 30, "min_tokens": 30, "ignore_eos": True}}
             for i in range(N_CANCEL)]
    f = client.files.create(file=("big.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    _wait_batch(client, batch.id, ("in_progress",))
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    try:
        # Up to 8 x 64 requests already running finish first (as OpenAI's cancel does): on a loaded
        # 2-core machine that takes more than a minute.
        done = _wait_batch(client, batch.id, ("cancelled",), timeout=180)
    except AssertionError:
        t = store.keys.tenant_by_name("acme")
        print("COUNTS", store.batches.counts(t.id, batch.id))
        for j in store.jobs.list_jobs(t.id, batch_id=batch.id, status="running", limit=5).jobs:
            print("RUNNING", j.id, j.worker, j.attempts, j.started_at)
        print(worker.log()[-3000:])
        raise
    deadline = time.monotonic() + 30
    while done.output_file_id is None and time.monotonic() < deadline:
        time.sleep(0.3)
        done = client.batches.retrieve(batch.id)
    assert done.output_file_id is not None
    out = client.files.content(done.output_file_id).text.splitlines()
    errs = client.files.content(done.error_file_id).text.splitlines() if done.error_file_id else []
    assert len(out) + len(errs) == N_CANCEL and len(errs) > 0
    assert {json.loads(e)["error"]["code"] for e in errs} <= {"batch_cancelled", "cancelled"}
    assert done.request_counts.completed == len(out)


def test_files_errors_and_tenant_isolation(client: openai.OpenAI, server: Server, key: str, other_key: str) -> None:
    f = client.files.create(file=("mine.jsonl", io.BytesIO(b'{"a": 1}\n')), purpose="batch")
    with server.client(other_key) as other:
        assert other.get(f"/v1/files/{f.id}").status_code == 404
        assert other.get(f"/v1/files/{f.id}/content").status_code == 404
        assert other.delete(f"/v1/files/{f.id}").status_code == 404
        r = other.post("/v1/batches", json={"input_file_id": f.id, "endpoint": "/v1/completions"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "input_file_id"
    with server.client(key) as mine:
        r = mine.post("/v1/files", files={"file": ("a.txt", b"x")}, data={"purpose": "fine-tune"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
        r = mine.post("/v1/files", files={"file": ("e.jsonl", b"")}, data={"purpose": "batch"})
        assert r.status_code == 400
        r = mine.post("/v1/files", json={"purpose": "batch"})
        assert r.status_code == 415
        r = mine.post("/v1/files", files={"purpose": (None, "batch")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"
        assert mine.post("/v1/files", data={"purpose": "batch"}).status_code == 415  # urlencoded
        assert mine.get(f"/v1/files/{f.id}/content").content == b'{"a": 1}\n'
    deleted = client.files.delete(f.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_batch_of_another_tenant_is_404(client: openai.OpenAI, server: Server, other_key: str) -> None:
    lines = [{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": TINY, "prompt": "x",
                                                                                    "max_tokens": 1}}]
    f = client.files.create(file=("i.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    with server.client(other_key) as other:
        assert other.get(f"/v1/batches/{batch.id}").status_code == 404
        assert other.post(f"/v1/batches/{batch.id}/cancel").status_code == 404
        assert batch.id not in [b["id"] for b in other.get("/v1/batches").json()["data"]]
    _wait_batch(client, batch.id, ("completed",))


def test_file_over_the_size_limit_is_413(server: Server, key: str) -> None:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:
        r = c.post("/v1/jobs", content=b"{" + b" " * (5 * 1024 * 1024) + b"}",
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413
