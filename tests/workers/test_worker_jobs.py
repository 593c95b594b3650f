"""A real worker process on Redis and PostgreSQL: jobs in, results and usage out, exactly once."""

from __future__ import annotations

import json
import random
import time

import pytest
from sqlalchemy import func, select

from contract.celery_app import send_bulk, send_job
from contract.payload import job_payload
from contract.redis_keys import CANCEL_CHANNEL
from store.models import Result, Usage
from store.types import JobSpec

MODEL = "tiny"
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def tenant(store):
    return store.keys.create_tenant(f"t-{random.randrange(10**9)}")


@pytest.fixture(scope="module")
def worker(start_worker, model_dir):
    return start_worker(model_dir, MODEL)


def greedy(max_tokens: int, **kw) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}


def submit(store, celery_app, tenant, payloads, *, bulk: bool = False, send: bool = True) -> list[str]:
    specs = [JobSpec(model=MODEL, request=p, kind="bulk" if bulk else "interactive") for p in payloads]
    ids = [c.id for c in store.jobs.create_jobs(tenant.id, specs)]
    if send:
        if bulk:
            send_bulk(celery_app, ids, MODEL)
        else:
            for i in ids:
                send_job(celery_app, i, MODEL)
    return ids


def wait_all(store, tenant, ids, timeout=240.0, statuses=TERMINAL):
    deadline = time.monotonic() + timeout
    pending = set(ids)
    jobs = {}
    while pending and time.monotonic() < deadline:
        for i in list(pending):
            job = store.jobs.get_job(tenant.id, i)
            if job.status in statuses:
                jobs[i] = job
                pending.discard(i)
        if pending:
            time.sleep(0.2)
    assert not pending, f"{len(pending)} jobs did not finish, e.g. {store.jobs.get_job(tenant.id, next(iter(pending)))}"
    return jobs


def count_rows(store, model, ids) -> int:
    with store.db.read() as s:
        return s.scalar(select(func.count()).select_from(model).where(model.job_id.in_(ids)))


def rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 1000) for _ in range(n)]


def test_two_hundred_jobs_finish_once_each_in_shared_engine_steps(store, celery_app, tenant, worker, redis_client):
    rng = random.Random(1)
    payloads = [job_payload(prompt=rand_prompt(rng, rng.randint(4, 40)), params=greedy(rng.randint(4, 16)))
                for _ in range(200)]
    ids = submit(store, celery_app, tenant, payloads)
    jobs = wait_all(store, tenant, ids)
    assert {j.status for j in jobs.values()} == {"succeeded"}
    assert count_rows(store, Result, ids) == 200 and count_rows(store, Usage, ids) == 200
    usages = [store.jobs.get_usage(tenant.id, i) for i in ids]
    expected = sum(p["params"]["max_tokens"] for p in payloads)
    assert sum(u.completion_tokens for u in usages) == expected
    assert sum(u.prompt_tokens for u in usages) == sum(len(p["prompt"]) for p in payloads)
    stats = redis_client.hgetall(f"tokenmill:worker:{worker.hostname}")
    peak = int(stats[b"peak_batch_size"])
    print(f"peak batch size over 200 jobs: {peak}")
    assert peak >= 16, f"jobs were not batched together (peak {peak})"


def test_job_submitted_mid_batch_joins_the_running_batch(store, celery_app, tenant, worker):
    rng = random.Random(2)
    [long] = submit(store, celery_app, tenant, [job_payload(prompt=rand_prompt(rng, 8), params=greedy(500))])
    wait_all(store, tenant, [long], statuses={"running"} | TERMINAL)
    [short] = submit(store, celery_app, tenant, [job_payload(prompt=rand_prompt(rng, 8), params=greedy(4))])
    jobs = wait_all(store, tenant, [short, long])
    # The short job started after the long one and finished before it: it ran beside it.
    assert jobs[short].started_at > jobs[long].started_at
    assert jobs[short].finished_at < jobs[long].finished_at, "the short job waited for the long one"
    assert store.jobs.get_usage(tenant.id, long).completion_tokens == 500


def keep_busy(store, celery_app, tenant, rng, n: int = 48) -> list[str]:
    """Long jobs that share the engine's steps with a test's job, so it runs for seconds."""
    return submit(store, celery_app, tenant, [job_payload(prompt=rand_prompt(rng, 8), params=greedy(400))
                                              for _ in range(n)])


def test_bad_request_fails_alone_with_a_clear_error(store, celery_app, tenant, worker):
    rng = random.Random(3)
    payloads = [job_payload(prompt=rand_prompt(rng, 6), params=greedy(4)),
                job_payload(prompt=rand_prompt(rng, 700), params=greedy(4)),  # longer than the 512 context
                job_payload(prompt=rand_prompt(rng, 6), params={"max_tokens": 4, "bogus": 1}),
                job_payload(prompt=rand_prompt(rng, 6), params=greedy(4))]
    ids = submit(store, celery_app, tenant, payloads)
    jobs = wait_all(store, tenant, ids)
    assert [jobs[i].status for i in ids] == ["succeeded", "failed", "failed", "succeeded"]
    assert jobs[ids[1]].error_code == "invalid_request" and "700 tokens" in jobs[ids[1]].error_message
    assert "bogus" in jobs[ids[2]].error_message
    assert count_rows(store, Usage, ids[1:3]) == 0


def test_cancelling_queued_and_running_jobs(store, celery_app, tenant, worker, redis_client):
    rng = random.Random(4)
    # Queued: cancelled before any worker takes it; the worker skips it.
    [queued] = submit(store, celery_app, tenant, [job_payload(prompt=rand_prompt(rng, 6), params=greedy(8))],
                      send=False)
    store.jobs.cancel(tenant.id, queued)
    send_job(celery_app, queued, MODEL)
    # Running: aborted in the engine at the next step. Company in the batch keeps the steps slow
    # enough that the job is still generating when the cancel arrives.
    company = keep_busy(store, celery_app, tenant, rng)
    [running] = submit(store, celery_app, tenant, [job_payload(prompt=rand_prompt(rng, 6), params=greedy(500))])
    wait_all(store, tenant, [running], statuses={"running"})
    time.sleep(0.2)
    store.jobs.cancel(tenant.id, running)
    redis_client.publish(CANCEL_CHANNEL, running)
    deadline = time.monotonic() + 30
    while store.jobs.get_result(tenant.id, running) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    result = store.jobs.get_result(tenant.id, running)
    assert result is not None and result.finish_reason == "abort"
    usage = store.jobs.get_usage(tenant.id, running)
    assert 0 < usage.completion_tokens < 500  # it stopped early; the tokens it spent are counted
    assert store.jobs.get_job(tenant.id, running).status == "cancelled"
    wait_all(store, tenant, company)
    time.sleep(1.5)
    assert store.jobs.get_job(tenant.id, queued).status == "cancelled"
    assert store.jobs.get_result(tenant.id, queued) is None
    stats = redis_client.hgetall(f"tokenmill:worker:{worker.hostname}")
    assert int(stats[b"running"]) == 0 and int(stats[b"kv_blocks_used"]) == 0  # blocks freed


def test_bulk_chunks_run_and_stream_channel_carries_text(store, celery_app, tenant, worker, redis_client):
    rng = random.Random(5)
    ids = submit(store, celery_app, tenant, [job_payload(prompt=rand_prompt(rng, 10), params=greedy(6))
                                             for _ in range(130)], bulk=True)  # three chunks
    jobs = wait_all(store, tenant, ids)
    assert {j.status for j in jobs.values()} == {"succeeded"}
    assert count_rows(store, Usage, ids) == 130
    # Streaming: subscribe, then submit a job that asks for it.
    pubsub = redis_client.pubsub()
    [sid] = submit(store, celery_app, tenant, [job_payload(prompt=rand_prompt(rng, 5), params=greedy(12),
                                                           stream=True)], send=False)
    pubsub.subscribe(f"tokenmill:stream:{sid}")
    send_job(celery_app, sid, MODEL)
    text, tokens, finished = "", 0, False
    deadline = time.monotonic() + 60
    while not finished and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=1.0)
        if msg and msg["type"] == "message":
            data = json.loads(msg["data"])
            text += data["text"]
            tokens += len(data["token_ids"])
            finished = data["finished"]
    assert finished and tokens == 12
    wait_all(store, tenant, [sid])
    assert store.jobs.get_result(tenant.id, sid).output_text == text


def test_job_past_its_deadline_mid_run_is_stopped_as_expired(store, celery_app, tenant, worker, redis_client):
    from datetime import datetime, timedelta, timezone

    rng = random.Random(6)
    deadline = datetime.now(timezone.utc) + timedelta(seconds=1.5)
    [jid] = [c.id for c in store.jobs.create_jobs(tenant.id, [JobSpec(
        model=MODEL, request=job_payload(prompt=rand_prompt(rng, 6), params=greedy(500)), expires_at=deadline)])]
    send_job(celery_app, jid, MODEL)
    company = keep_busy(store, celery_app, tenant, rng)  # slows the steps: 500 tokens outlast the deadline
    jobs = wait_all(store, tenant, [jid], timeout=60)
    assert jobs[jid].status == "expired"
    usage = store.jobs.get_usage(tenant.id, jid)
    assert usage is not None and 0 < usage.completion_tokens < 500  # stopped early, spent tokens counted
    assert store.jobs.get_result(tenant.id, jid).finish_reason == "abort"
    wait_all(store, tenant, company)
