"""Faults and priorities with real worker processes: a worker killed mid-batch, a bulk backlog
overtaken by interactive jobs."""

from __future__ import annotations

import random
import time

import pytest

from store.models import Result, Usage
from workers.app import job_payload

from test_worker_jobs import MODEL, count_rows, greedy, rand_prompt, submit, wait_all


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def tenant(store):
    return store.keys.create_tenant(f"t-{random.randrange(10**9)}")


def test_worker_killed_mid_batch_loses_nothing_and_counts_nothing_twice(
        store, celery_app, tenant, start_worker, model_dir):
    rng = random.Random(7)
    first = start_worker(model_dir, MODEL, concurrency=32)
    payloads = [job_payload(prompt=rand_prompt(rng, rng.randint(4, 20)), params=greedy(rng.randint(150, 300)))
                for _ in range(80)]
    ids = submit(store, celery_app, tenant, payloads)
    # Kill it once some jobs are done and others are mid-generation.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        statuses = [store.jobs.get_job(tenant.id, i).status for i in ids]
        if statuses.count("succeeded") >= 1 and statuses.count("running") >= 8:
            break
        time.sleep(0.1)
    first.kill()
    done_before = sum(store.jobs.get_job(tenant.id, i).status == "succeeded" for i in ids)
    assert done_before < len(ids), "the worker finished everything before it could be killed"

    start_worker(model_dir, MODEL, concurrency=32)
    jobs = wait_all(store, tenant, ids, timeout=300)
    assert {j.status for j in jobs.values()} == {"succeeded"}
    assert count_rows(store, Result, ids) == len(ids)
    assert count_rows(store, Usage, ids) == len(ids)
    usages = [store.jobs.get_usage(tenant.id, i) for i in ids]
    assert sum(u.completion_tokens for u in usages) == sum(p["params"]["max_tokens"] for p in payloads)
    retried = [j for j in jobs.values() if j.attempts >= 2]
    assert retried, "no job was redelivered after the kill"
    print(f"killed with {done_before}/{len(ids)} done; {len(retried)} jobs ran twice; all stored once")


def test_interactive_jobs_overtake_a_bulk_backlog(store, celery_app, tenant, start_worker, model_dir):
    rng = random.Random(8)
    # The backlog and the interactive jobs are queued while no worker consumes this model...
    bulk = submit(store, celery_app, tenant, [job_payload(prompt=rand_prompt(rng, 10), params=greedy(16))
                                              for _ in range(320)], bulk=True)
    interactive = submit(store, celery_app, tenant, [job_payload(prompt=rand_prompt(rng, 10), params=greedy(16))
                                                     for _ in range(10)])
    # ...then one worker that can hold only a few tasks at a time starts.
    start_worker(model_dir, MODEL, concurrency=2)
    jobs = wait_all(store, tenant, bulk + interactive, timeout=300)
    last_interactive = max(jobs[i].finished_at for i in interactive)
    bulk_done_first = sum(jobs[b].finished_at < last_interactive for b in bulk)
    print(f"bulk jobs finished before the last interactive one: {bulk_done_first} of {len(bulk)}")
    # At most the bulk chunks already taken when the worker started can finish first.
    assert bulk_done_first <= 2 * 64
