"""The async jobs API against a live server and a real worker: lifecycle, listing, cancellation,
idempotency, events, deadlines."""

from __future__ import annotations

import json
import time

import httpx
from conftest import TINY, Server, wait_job

from store import Store


def test_job_lifecycle_runs_to_succeeded_with_result_usage_and_timings(api: httpx.Client) -> None:
    r = api.post("/v1/jobs", json={"model": TINY, "prompt": "Hello there", "params": {"max_tokens": 5, "temperature": 0}})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["id"].startswith("job_")
    from api.schemas.jobs import Job

    Job.model_validate(job)  # the hand-serialized answer is a valid Job
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    done = wait_job(api, job["id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["finish_reason"] in ("stop", "length")
    assert done["usage"]["completion_tokens"] >= 1
    assert done["usage"]["prompt_tokens"] >= 2
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    assert done["timings"]["total_ms"] > 0
    assert done["request"]["params"]["max_tokens"] == 5


def test_messages_job_and_token_id_prompt_succeed(api: httpx.Client) -> None:
    a = api.post("/v1/jobs", json={"model": TINY, "messages": [{"role": "user", "content": "Hi"}],
                                   "params": {"max_tokens": 3}})
    b = api.post("/v1/jobs", json={"model": TINY, "prompt": [1, 2, 3, 4], "params": {"max_tokens": 3}})
    assert a.status_code == 202 and b.status_code == 202, (a.text, b.text)
    assert wait_job(api, a.json()["id"])["status"] == "succeeded"
    assert wait_job(api, b.json()["id"])["usage"]["prompt_tokens"] == 4


def test_idempotency_key_returns_the_first_job(api: httpx.Client) -> None:
    body = {"model": TINY, "prompt": "same", "params": {"max_tokens": 2}, "idempotency_key": f"k-{time.time()}"}
    first = api.post("/v1/jobs", json=body)
    second = api.post("/v1/jobs", json=body)
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    header_key = f"h-{time.time()}"
    h1 = api.post("/v1/jobs", json={"model": TINY, "prompt": "x"}, headers={"Idempotency-Key": header_key})
    h2 = api.post("/v1/jobs", json={"model": TINY, "prompt": "y"}, headers={"Idempotency-Key": header_key})
    assert h1.json()["id"] == h2.json()["id"]


def test_list_filters_by_status_and_pages_with_a_cursor(api: httpx.Client) -> None:
    ids = [api.post("/v1/jobs", json={"model": TINY, "prompt": f"p{i}", "params": {"max_tokens": 1}}).json()["id"]
           for i in range(3)]
    for i in ids:
        wait_job(api, i)
    page = api.get("/v1/jobs", params={"limit": 2, "status": "succeeded"}).json()
    assert len(page["data"]) == 2 and page["has_more"] and page["next_cursor"]
    assert all(j["status"] == "succeeded" for j in page["data"])
    nxt = api.get("/v1/jobs", params={"limit": 2, "status": "succeeded", "cursor": page["next_cursor"]}).json()
    assert not {j["id"] for j in nxt["data"]} & {j["id"] for j in page["data"]}
    assert api.get("/v1/jobs", params={"cursor": "garbage!"}).status_code == 400
    assert api.get("/v1/jobs", params={"status": "bogus"}).status_code == 400


def test_cancel_a_running_job_stops_it(api: httpx.Client) -> None:
    job = api.post("/v1/jobs", json={"model": TINY, "prompt": "long", "params": {"max_tokens": 400, "ignore_eos": True,
                                                                                "min_tokens": 400}}).json()
    deadline = time.monotonic() + 30
    while api.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.02)
    r = api.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert r.json()["error"]["code"] == "cancelled"
    time.sleep(1.0)
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    # cancelling a final job changes nothing
    assert api.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_deadline_in_the_past_expires_the_job(api: httpx.Client) -> None:
    job = api.post("/v1/jobs", json={"model": TINY, "prompt": "late", "deadline": "2000-01-01T00:00:00Z"}).json()
    assert wait_job(api, job["id"])["status"] == "expired"


def test_events_stream_status_deltas_and_the_final_job(api: httpx.Client) -> None:
    job = api.post("/v1/jobs", json={"model": TINY, "prompt": "stream me", "stream": True,
                                     "params": {"max_tokens": 64, "min_tokens": 64, "temperature": 0}}).json()
    events: list[tuple[str, dict]] = []
    with api.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name or "", json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert kinds[0] == "status" and kinds[-1] == "done"
    done = events[-1][1]
    assert done["status"] == "succeeded"
    deltas = "".join(d["text"] for k, d in events if k == "delta")
    # Text flows from the moment the client subscribes (the worker may have begun before the GET
    # arrived); `done` carries all of it.
    assert deltas and done["result"]["output_text"].endswith(deltas)
    assert ("status", {"id": job["id"], "status": "succeeded"}) in events


def test_other_tenant_sees_404_for_jobs(server: Server, api: httpx.Client, other_key: str) -> None:
    job = api.post("/v1/jobs", json={"model": TINY, "prompt": "mine"}).json()
    with server.client(other_key) as other:
        assert other.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert other.delete(f"/v1/jobs/{job['id']}").status_code == 404
        assert other.get(f"/v1/jobs/{job['id']}/events").status_code == 404
        assert job["id"] not in {j["id"] for j in other.get("/v1/jobs").json()["data"]}
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 200


def test_job_is_stored_before_its_task_is_sent(api: httpx.Client, store: Store) -> None:
    # The 202 comes after the commit: the row is there the moment the answer is.
    job = api.post("/v1/jobs", json={"model": TINY, "prompt": "durable"}).json()
    tenant = store.keys.tenant_by_name("acme")
    assert tenant is not None
    assert store.jobs.get_job(tenant.id, job["id"]) is not None
