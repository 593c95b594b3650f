"""Completion webhooks against a live API process, the real worker and a local receiver: signed
deliveries (Standard Webhooks), retries with backoff after a failing answer, the delivery state on
the job, batch events, tenant defaults, and refusal of private addresses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_KEY, TINY, Server, start_server, wait_job

from api.webhooks import retry_delay, sign
from store import Store


class Receiver:
    """A local HTTP endpoint that records what it is sent and answers the statuses it is told to."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[int] = []  # popped one per request; empty: 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.answers.pop(0) if receiver.answers else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def hook_server(database_url: str, redis_url: str, tiny_dir: Path, worker,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An API process that may send webhooks to loopback addresses: the test's receiver listens on
    127.0.0.1, which the default (TOKENMILL_WEBHOOK_ALLOW_PRIVATE off) rightly refuses."""
    s = start_server(database_url, redis_url, tiny_dir, tmp_path_factory.mktemp("api-hooks"),
                     webhook_allow_private="true")
    yield s
    s.proc.stop()


def _tenant(store: Store, make_key, server: Server) -> tuple[str, str, str]:  # type: ignore[no-untyped-def]
    name = f"hook-{uuid.uuid4().hex[:8]}"
    key = make_key(name)
    tenant_id = store.keys.tenant_by_name(name).id  # type: ignore[union-attr]
    with server.client(ADMIN_KEY) as admin:
        secret = admin.get(f"/v1/admin/tenants/{tenant_id}/webhook-secret").json()["secret"]
    return tenant_id, key, secret


def _verify(headers: dict[str, str], body: bytes, secret: str) -> None:
    """Checks the signature as a receiver would, from the Standard Webhooks definition."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 300


def _wait_webhook(api: httpx.Client, path: str, status: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        obj = api.get(path).json()
        if (obj.get("webhook") or {}).get("status") == status:
            return obj
        assert time.monotonic() < deadline, obj
        time.sleep(0.2)


def test_signature_matches_the_standard_webhooks_reference() -> None:
    # The example of the Standard Webhooks specification's reference libraries.
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert [retry_delay(n) for n in (1, 2, 3)] == [5, 10, 20] and retry_delay(30) == 4 * 3600


def test_a_finished_job_is_posted_signed_and_its_delivery_shows_on_the_job(
        hook_server: Server, store: Store, make_key, receiver: Receiver) -> None:
    _, key, secret = _tenant(store, make_key, hook_server)
    with hook_server.client(key) as api:
        r = api.post("/v1/jobs", json={"model": TINY, "prompt": "Hello", "params": {"max_tokens": 3},
                                       "webhook_url": receiver.url})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.json()["webhook"]["status"] == "pending"
        job = _wait_webhook(api, f"/v1/jobs/{job_id}", "delivered")
    assert job["webhook"]["attempts"] == 1 and job["webhook"]["last_status_code"] == 200
    mine = [(h, b) for h, b in receiver.received if json.loads(b)["data"]["id"] == job_id]
    assert len(mine) == 1
    headers, body = mine[0]
    _verify(headers, body, secret)
    assert headers["webhook-id"].startswith("msg_")
    event = json.loads(body)
    assert event["type"] == "job.succeeded"
    assert event["data"]["status"] == "succeeded" and event["data"]["result"]["output_text"] is not None
    assert event["data"]["usage"]["completion_tokens"] >= 1


def test_a_failing_receiver_gets_the_same_event_again_after_the_backoff(
        hook_server: Server, store: Store, make_key, receiver: Receiver) -> None:
    tenant_id, key, secret = _tenant(store, make_key, hook_server)
    with hook_server.client(ADMIN_KEY) as admin:  # the tenant's default webhook this time
        assert admin.patch(f"/v1/admin/tenants/{tenant_id}", json={"webhook_url": receiver.url}).status_code == 200
    receiver.answers[:] = [503]
    with hook_server.client(key) as api:
        job_id = api.post("/v1/jobs", json={"model": TINY, "prompt": "Hi", "params": {"max_tokens": 2}}).json()["id"]
        retrying = _wait_webhook(api, f"/v1/jobs/{job_id}", "retrying")
        assert retrying["webhook"]["last_status_code"] == 503 and retrying["webhook"]["attempts"] == 1
        assert "503" in retrying["webhook"]["last_error"] and retrying["webhook"]["next_attempt_at"]
        done = _wait_webhook(api, f"/v1/jobs/{job_id}", "delivered")  # the first retry comes after 5 s
    assert done["webhook"]["attempts"] == 2
    mine = [(h, b) for h, b in receiver.received if json.loads(b)["data"]["id"] == job_id]
    assert len(mine) == 2 and mine[0][0]["webhook-id"] == mine[1][0]["webhook-id"]  # one event, twice
    assert mine[0][1] == mine[1][1]
    for h, b in mine:
        _verify(h, b, secret)


def test_a_batch_posts_one_event_when_it_ends(hook_server: Server, store: Store, make_key,
                                              receiver: Receiver) -> None:
    _, key, secret = _tenant(store, make_key, hook_server)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": TINY, "prompt": "Hi", "max_tokens": 2}} for i in range(3)]
    with hook_server.client(key) as api:
        f = api.post("/v1/files", files={"file": ("b.jsonl", b"".join(json.dumps(x).encode() + b"\n" for x in lines))},
                     data={"purpose": "batch"}).json()
        batch = api.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                              "completion_window": "24h", "webhook_url": receiver.url}).json()
        assert batch["webhook"]["status"] == "pending"
        done = _wait_webhook(api, f"/v1/batches/{batch['id']}", "delivered", timeout=120)
    assert done["status"] == "completed"
    mine = [(h, b) for h, b in receiver.received if json.loads(b)["data"]["id"] == batch["id"]]
    assert len(mine) == 1
    _verify(*mine[0], secret)
    event = json.loads(mine[0][1])
    assert event["type"] == "batch.completed" and event["data"]["request_counts"]["completed"] == 3
    assert event["data"]["output_file_id"] == done["output_file_id"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/hook",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/hook",
                                 "ftp://example.com/hook", "not a url"])
def test_private_and_malformed_webhook_urls_are_refused_by_default(api: httpx.Client, url: str) -> None:
    r = api.post("/v1/jobs", json={"model": TINY, "prompt": "x", "webhook_url": url})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_webhook_url" and r.json()["error"]["param"] == "webhook_url"
