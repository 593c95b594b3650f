"""Priorities with real worker processes: a bulk backlog overtaken by interactive jobs. (A worker
killed mid-batch, repeatedly, is tests/reliability/test_worker_sigkill.py.)"""

from __future__ import annotations

import random

import pytest

from contract.payload import job_payload

from test_worker_jobs import MODEL, greedy, rand_prompt, submit, wait_all


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def tenant(store):
    return store.keys.create_tenant(f"t-{random.randrange(10**9)}")


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
