"""Per-tenant and per-key limits against live API processes, a real worker, PostgreSQL and Redis:
rate limits with OpenAI's headers, the queued-jobs limit, token budgets as a hard stop whose Redis
counter ends equal to the SQL usage, two API processes racing one budget, batch token limits, and
setting limits through the admin API and the CLI."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis
from conftest import ADMIN_KEY, TINY, Server, start_server, wait_job
from typer.testing import CliRunner

from api.limits import Limiter, Scope
from store import Store


def _tenant(store: Store, make_key: Callable[[str], str], limits: dict, server: Server,
            key_limits: dict | None = None) -> tuple[str, str]:
    """A fresh tenant with these limits (set through the admin API); returns (tenant id, key)."""
    name = f"lim-{uuid.uuid4().hex[:8]}"
    key = make_key(name)
    tenant_id = store.keys.tenant_by_name(name).id  # type: ignore[union-attr]
    with server.client(ADMIN_KEY) as admin:
        r = admin.put(f"/v1/admin/tenants/{tenant_id}/limits", json=limits)
        assert r.status_code == 200, r.text
        assert {k: v for k, v in r.json()["limits"].items() if v is not None} == limits
        if key_limits is not None:
            key_id = store.keys.list_keys(tenant_id)[0].id
            r = admin.put(f"/v1/admin/tenants/{tenant_id}/keys/{key_id}/limits", json=key_limits)
            assert r.status_code == 200, r.text
    return tenant_id, key


def _away_from_minute_end() -> None:
    """Per-minute counters start afresh each UTC minute: a test counting within one minute does
    not start in its last seconds."""
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)


def _job(max_tokens: int, exact: bool = False) -> dict:
    params: dict = {"max_tokens": max_tokens, "temperature": 0}
    if exact:  # spend exactly max_tokens, so a job's spending is known in advance
        params.update(ignore_eos=True, min_tokens=max_tokens)
    return {"model": TINY, "prompt": "Hello there", "params": params}


def _settled(limiter_redis: redis.Redis, store: Store, tenant_id: str, timeout: float = 20) -> tuple[int, int]:
    """Waits until the tenant's daily budget counter equals its SQL usage of the day (every job
    finished and settled); returns (counter, SQL usage)."""
    limiter = Limiter(limiter_redis, store)
    scope = Scope(tenant_id, None, {"daily_tokens": 1})
    deadline = time.monotonic() + timeout
    while True:
        counter = limiter.counter_value(scope, "daily_tokens")
        spent = store.limits.spent_tokens(tenant_id, since=datetime.now(UTC).date())
        open_jobs = store.jobs.count_jobs(tenant_id, status=["queued", "running"])
        if counter == spent and open_jobs == 0:
            return counter, spent
        if time.monotonic() > deadline:
            raise AssertionError(f"budget counter {counter} never matched the SQL usage {spent} "
                                 f"({open_jobs} jobs open)")
        time.sleep(0.2)


def test_requests_per_minute_answers_429_with_openai_headers(server: Server, store: Store, make_key) -> None:
    _, key = _tenant(store, make_key, {"requests_per_minute": 3}, server)
    _away_from_minute_end()
    with server.client(key) as api:
        answers = [api.post("/v1/jobs", json=_job(1)) for _ in range(4)]
    assert [r.status_code for r in answers] == [202, 202, 202, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "2"
    assert answers[2].headers["x-ratelimit-remaining-requests"] == "0"
    refused = answers[3]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "3 requests per minute" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


def test_tokens_per_minute_counts_prompt_plus_max_tokens_and_the_key_limit_applies_too(
        server: Server, store: Store, make_key) -> None:
    # The tenant allows plenty; the key's own limit is the tighter one.
    _, key = _tenant(store, make_key, {"tokens_per_minute": 100_000}, server, key_limits={"tokens_per_minute": 100})
    _away_from_minute_end()
    with server.client(key) as api:
        first = api.post("/v1/jobs", json=_job(60))
        second = api.post("/v1/jobs", json=_job(60))
        chat = api.post("/v1/chat/completions", json={"model": TINY, "max_tokens": 60,
                                                      "messages": [{"role": "user", "content": "Hi"}]})
    assert first.status_code == 202, first.text
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 40  # 60 + the prompt's tokens taken
    assert second.status_code == 429 and chat.status_code == 429
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert "this API key" in second.json()["error"]["message"] and "100 tokens per minute" in second.text
    assert chat.headers["x-ratelimit-limit-tokens"] == "100"


def test_max_queued_jobs_refuses_until_jobs_finish(server: Server, store: Store, make_key) -> None:
    _, key = _tenant(store, make_key, {"max_queued_jobs": 2}, server)
    with server.client(key) as api:
        long = [api.post("/v1/jobs", json=_job(400, exact=True)) for _ in range(2)]
        assert all(r.status_code == 202 for r in long), [r.text for r in long]
        third = api.post("/v1/jobs", json=_job(1))
        assert third.status_code == 429, third.text
        assert third.json()["error"]["code"] == "queue_limit_exceeded"
        assert third.headers["retry-after"] == "5"
        for r in long:
            api.delete(f"/v1/jobs/{r.json()['id']}")
        # Cancelled jobs are settled within the settler's interval (1 s): the slots come back.
        deadline = time.monotonic() + 15
        while (r := api.post("/v1/jobs", json=_job(1))).status_code == 429:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.3)
        assert r.status_code == 202
        assert wait_job(api, r.json()["id"])["status"] == "succeeded"


def test_a_repeated_idempotency_key_gives_its_reservation_back(server: Server, store: Store, make_key) -> None:
    _, key = _tenant(store, make_key, {"max_queued_jobs": 1}, server)
    body = {**_job(300, exact=True), "idempotency_key": f"once-{uuid.uuid4().hex}"}
    with server.client(key) as api:
        first = api.post("/v1/jobs", json=body)
        again = api.post("/v1/jobs", json=body)  # the same job: it takes no second slot
        assert (first.status_code, again.status_code) == (202, 200), again.text
        assert again.json()["id"] == first.json()["id"]
        other = api.post("/v1/jobs", json=_job(1))
        assert other.status_code == 429 and other.json()["error"]["code"] == "queue_limit_exceeded"
        api.delete(f"/v1/jobs/{first.json()['id']}")


def test_daily_budget_is_a_hard_stop_and_its_counter_ends_equal_to_the_sql_usage(
        server: Server, store: Store, make_key, redis_client: redis.Redis) -> None:
    tenant_id, key = _tenant(store, make_key, {"daily_tokens": 100}, server)
    refused = None
    with server.client(key) as api:
        for _ in range(20):
            r = api.post("/v1/jobs", json=_job(20))
            if r.status_code != 202:
                refused = r
                break
            assert wait_job(api, r.json()["id"])["status"] == "succeeded"
    assert refused is not None and refused.status_code == 429, refused and refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota" and "daily token budget" in error["message"]
    assert int(refused.headers["retry-after"]) <= 86_400
    counter, spent = _settled(redis_client, store, tenant_id)
    assert counter == spent <= 100
    # The budget never refuses a job that fits in what is left: the refused one needed more.
    needed = int(error["message"].split("this request needs ")[1].split(" ")[0])
    assert spent + needed > 100


def test_redis_losing_the_counter_restarts_it_from_the_store(server: Server, store: Store, make_key,
                                                               redis_client: redis.Redis) -> None:
    tenant_id, key = _tenant(store, make_key, {"daily_tokens": 10_000}, server)
    with server.client(key) as api:
        done = wait_job(api, api.post("/v1/jobs", json=_job(10)).json()["id"])
        _settled(redis_client, store, tenant_id)
        for k in redis_client.scan_iter(match=f"tokenmill:limits:t:{tenant_id}:*"):
            redis_client.delete(k)  # as after a Redis restart without persistence
        assert api.post("/v1/jobs", json=_job(10)).status_code == 202
    counter, spent = _settled(redis_client, store, tenant_id)
    assert spent >= done["usage"]["total_tokens"] * 2 - 2 and counter == spent


@pytest.fixture(scope="module")
def second_server(database_url: str, redis_url: str, tiny_dir: Path, worker,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second API process on the same store and Redis; it answers a spent budget with 402 (the
    setting under test; the first process keeps the default, 429)."""
    # webhook_interval_s=0: as the session's server (conftest.py): at the default it could take the
    # sending lock and refuse the webhook tests' loopback receiver, which only their process may reach
    s = start_server(database_url, redis_url, tiny_dir, tmp_path_factory.mktemp("api2"), budget_status="402",
                     webhook_interval_s="0")
    yield s
    s.proc.stop()


def test_two_api_processes_racing_one_budget_never_overspend_it(
        server: Server, second_server: Server, store: Store, make_key, redis_client: redis.Redis) -> None:
    budget = 1_000
    tenant_id, key = _tenant(store, make_key, {"daily_tokens": budget}, server)
    with server.client(key) as a, second_server.client(key) as b:
        clients = [a, b] * 20
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda c: (c, c.post("/v1/jobs", json=_job(50, exact=True))), clients))
        accepted = [r.json()["id"] for _, r in answers if r.status_code == 202]
        refused = [(c, r) for c, r in answers if r.status_code != 202]
        for job_id in accepted:
            assert wait_job(a, job_id, timeout=120)["status"] == "succeeded"
    assert refused, "40 jobs of ~55 tokens each fit in a budget of 1000?"
    assert {r.json()["error"]["code"] for _, r in refused} == {"insufficient_quota"}
    assert {r.status_code for c, r in refused if c is a} <= {429}
    assert {r.status_code for c, r in refused if c is b} <= {402}
    assert any(r.status_code == 402 for _, r in refused) or all(c is a for c, _ in refused)
    counter, spent = _settled(redis_client, store, tenant_id)
    # Each job spends exactly what it reserved (ignore_eos): nothing was given back during the
    # race, so the accepted jobs' reservations fit in the budget, and their usage too.
    assert spent <= budget and counter == spent
    per_job = spent // len(accepted)
    assert len(accepted) == budget // per_job


def test_batch_over_the_enqueued_token_limit_fails_with_its_code(server: Server, store: Store, make_key) -> None:
    _, key = _tenant(store, make_key, {"max_batch_tokens": 200}, server)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": TINY, "prompt": "Hi", "max_tokens": 50}} for i in range(6)]
    with server.client(key) as api:
        data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        f = api.post("/v1/files", files={"file": ("b.jsonl", data)}, data={"purpose": "batch"}).json()
        batch = api.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                              "completion_window": "24h"}).json()
        deadline = time.monotonic() + 30
        while (b := api.get(f"/v1/batches/{batch['id']}").json())["status"] == "validating":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert b["status"] == "failed", b
        assert b["errors"]["data"][0]["code"] == "token_limit_exceeded"
        assert "enqueued token limit" in b["errors"]["data"][0]["message"]
        small = api.post("/v1/files", files={"file": ("s.jsonl", b"".join(
            json.dumps(x).encode() + b"\n" for x in lines[:2]))}, data={"purpose": "batch"}).json()
        ok = api.post("/v1/batches", json={"input_file_id": small["id"], "endpoint": "/v1/completions",
                                           "completion_window": "24h"}).json()
        deadline = time.monotonic() + 60
        while (b := api.get(f"/v1/batches/{ok['id']}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, b
            time.sleep(0.2)
        assert b["status"] == "completed", b


def test_admin_limits_are_validated(server: Server, store: Store, make_key) -> None:
    tenant_id, _ = _tenant(store, make_key, {}, server)
    with server.client(ADMIN_KEY) as admin:
        bad = admin.put(f"/v1/admin/tenants/{tenant_id}/limits", json={"daily_tokens": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "daily_tokens"
        unknown = admin.put(f"/v1/admin/tenants/{tenant_id}/limits", json={"tokens_per_day": 5})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tokens_per_day"
        assert admin.put("/v1/admin/tenants/ten_nope/limits", json={}).status_code == 404
        got = admin.get(f"/v1/admin/tenants/{tenant_id}").json()
        assert set(got["limits"].values()) == {None} and got["retention_days"] is None
        assert admin.patch(f"/v1/admin/tenants/{tenant_id}", json={"retention_days": 7}).json()["retention_days"] == 7


def test_cli_sets_tenant_and_key_limits(database_url: str, redis_url: str, store: Store, make_key) -> None:
    from tokenmill.cli import app

    name = f"cli-{uuid.uuid4().hex[:8]}"
    make_key(name)
    env = {"TOKENMILL_DATABASE_URL": database_url, "TOKENMILL_REDIS_URL": redis_url}
    runner = CliRunner()
    r = runner.invoke(app, ["tenants", "limits", name, "-l", "daily_tokens=5000", "-l", "requests_per_minute=10"],
                      env=env)
    assert r.exit_code == 0, r.output
    assert "daily_tokens=5000, requests_per_minute=10" in r.output
    r = runner.invoke(app, ["tenants", "limits", name, "-l", "requests_per_minute=none"], env=env)
    assert r.exit_code == 0 and store.keys.tenant_by_name(name).limits == {"daily_tokens": 5000}  # type: ignore[union-attr]
    bad = runner.invoke(app, ["tenants", "limits", name, "-l", "daily_tokens=-1"], env=env)
    assert bad.exit_code == 2 and "daily_tokens" in bad.output
    key_id = store.keys.list_keys(store.keys.tenant_by_name(name).id)[0].id  # type: ignore[union-attr]
    r = runner.invoke(app, ["keys", "limits", key_id, "--tenant", name, "-l", "tokens_per_minute=300"], env=env)
    assert r.exit_code == 0, r.output
    assert store.limits.key_limits(key_id) == {"tokens_per_minute": 300}


def test_release_gives_back_a_reservation_once(store: Store, redis_client: redis.Redis) -> None:
    from api.errors import ApiError

    limiter = Limiter(redis_client, store)
    scope = Scope(f"ten_{uuid.uuid4().hex}", None, {"max_queued_jobs": 2, "daily_tokens": 100})
    limiter.admit([scope], [("job_a", 40)])
    limiter.admit([scope], [("job_b", 40)])
    with pytest.raises(ApiError) as refused:
        limiter.admit([scope], [("job_c", 10)])
    assert refused.value.code == "queue_limit_exceeded"
    limiter.release(["job_a"])
    limiter.release(["job_a"])  # a second release of the same job gives nothing back
    assert limiter.counter_value(scope, "max_queued_jobs") == 1
    assert limiter.counter_value(scope, "daily_tokens") == 40
    with pytest.raises(ApiError) as over:
        limiter.admit([scope], [("job_c", 61)])  # 40 + 61 > 100: the budget, and nothing counted
    assert over.value.code == "insufficient_quota" and over.value.status == 429
    assert limiter.counter_value(scope, "max_queued_jobs") == 1
    limiter.admit([scope], [("job_c", 60)])
    assert limiter.counter_value(scope, "daily_tokens") == 100
