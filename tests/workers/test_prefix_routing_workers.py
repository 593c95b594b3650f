"""Prefix-aware routing with two real `tokenmill worker` processes on the CPU (real Redis,
PostgreSQL, a tiny model), jobs sent by the API's own dispatcher at the default settings: jobs that
share a prompt prefix run on the worker that ran it first, a dead preferred worker costs no job, and
a worker told to stop (SIGTERM) gets no routed job any more."""

from __future__ import annotations

import random
import signal
import time

import pytest

from api.queue import Dispatcher
from contract.payload import job_payload
from contract.prefix_routing import ROUTE_WORKERS_KEY, parse_route_worker
from contract.queues import priority_lists, queue_for, worker_queue
from store.types import JobSpec

MODEL = "tiny-routing"
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}
SYSTEM = "You are a careful assistant who answers in one short sentence. " * 6  # 384 characters
OTHER = "Translate the following sentence into French, keeping its tone. " * 6


@pytest.fixture(scope="module")
def tenant(store):
    return store.keys.create_tenant(f"t-{random.randrange(10**9)}")


@pytest.fixture(scope="module")
def workers(start_worker, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    return [start_worker(model_dir, MODEL) for _ in range(2)]


@pytest.fixture(scope="module")
def dispatcher(redis_url, redis_client):
    d = Dispatcher(redis_url, prefix_routing=True)  # as the API builds it at the default settings
    yield d
    d.close()


def send(store, dispatcher, tenant, prompts: list[str]) -> list[str]:
    """Stores the jobs and sends them in one group, as the API's submitter does."""
    specs = [JobSpec(model=MODEL, request=job_payload(prompt=p, params={"max_tokens": 2, "temperature": 0,
                                                                            "ignore_eos": True}))
             for p in prompts]
    ids = [c.id for c in store.jobs.create_jobs(tenant.id, specs)]
    assert dispatcher.send_many([(i, MODEL, False) for i in ids], requests=[s.request for s in specs]) == len(ids)
    return ids


def wait_all(store, tenant, ids, timeout=120.0):
    deadline = time.monotonic() + timeout
    jobs = {}
    while time.monotonic() < deadline and len(jobs) < len(ids):
        for i in ids:
            job = store.jobs.get_job(tenant.id, i)
            if job.status in TERMINAL:
                jobs[i] = job
        time.sleep(0.2)
    assert len(jobs) == len(ids), f"{len(ids) - len(jobs)} job(s) did not finish"
    assert {j.status for j in jobs.values()} == {"succeeded"}
    return jobs


def waiting(redis_client, queue: str) -> int:
    return sum(redis_client.llen(name) for _, name in priority_lists(queue))


def test_jobs_sharing_a_prefix_run_on_the_worker_that_ran_it_first(store, dispatcher, tenant, workers):
    [first] = send(store, dispatcher, tenant, [SYSTEM + "Question 0?"])
    owner = wait_all(store, tenant, [first])[first].worker_instance
    ids = send(store, dispatcher, tenant, [SYSTEM + f"Question {n}?" for n in range(1, 7)])
    jobs = wait_all(store, tenant, ids)
    assert {j.worker_instance for j in jobs.values()} == {owner}
    # ... where its KV cache held the prefix.
    assert all(store.jobs.get_usage(tenant.id, i).cached_prompt_tokens > 0 for i in ids)
    # Another prefix: all its jobs on one worker too (the least busy when it was first seen).
    others = send(store, dispatcher, tenant, [OTHER + f"Sentence {n}." for n in range(4)])
    assert len({j.worker_instance for j in wait_all(store, tenant, others).values()}) == 1


def test_a_dead_preferred_worker_costs_no_job(store, dispatcher, tenant, workers, redis_client):
    [probe] = send(store, dispatcher, tenant, [SYSTEM + "Which worker?"])
    done = wait_all(store, tenant, [probe])[probe]
    dead = next(w for w in workers if w.hostname == done.worker)
    survivor = next(w for w in workers if w is not dead)
    own = worker_queue(queue_for(MODEL), done.worker_instance)
    dead.kill()  # SIGKILL: its heartbeat lasts a few seconds more, so the API still routes to it
    routed = send(store, dispatcher, tenant, [SYSTEM + f"Routed {n}?" for n in range(3)])
    assert waiting(redis_client, own) == 3  # in the dead worker's own queue, which nobody consumes
    # Its heartbeat expires (5 s), the survivor's recovery confirms it (3 s) and moves them to the
    # shared queue, where the survivor takes them.
    jobs = wait_all(store, tenant, routed, timeout=60)
    assert {j.worker != dead.hostname for j in jobs.values()} == {True}
    assert waiting(redis_client, own) == 0
    assert "routed task(s) moved to the shared queue" in survivor.log(tail=200_000)
    # Now the API sees the owner gone and sends the same prefix elsewhere at once.
    later = send(store, dispatcher, tenant, [SYSTEM + f"Later {n}?" for n in range(3)])
    assert waiting(redis_client, own) == 0
    assert {j.worker for j in wait_all(store, tenant, later, timeout=60).values()} == {survivor.hostname}


def test_a_stopping_worker_withdraws_from_routing(store, dispatcher, tenant, workers, start_worker, tiny_model_dir,
                                                  redis_client):
    live = [w for w in workers if w.proc.poll() is None]
    fresh = start_worker(tiny_model_dir("llama"), MODEL)
    prefix = "Summarise the following support ticket in one line for the on-call engineer. " * 5
    [first] = send(store, dispatcher, tenant, [prefix + "Ticket 0."])
    done = wait_all(store, tenant, [first])[first]
    owner = next(w for w in [*live, fresh] if w.hostname == done.worker)
    owner.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:  # its entry says it takes no routed job any more (written from the signal handler)
        entry = parse_route_worker(redis_client.hget(ROUTE_WORKERS_KEY, done.worker_instance) or b"{}")
        if entry is not None and not entry[2]:
            break
        assert time.monotonic() < deadline and owner.proc.poll() is None, "the worker did not withdraw"
        time.sleep(0.05)
    later = send(store, dispatcher, tenant, [prefix + f"Ticket {n}." for n in range(1, 4)])
    assert waiting(redis_client, worker_queue(queue_for(MODEL), done.worker_instance)) == 0
    assert done.worker not in {j.worker for j in wait_all(store, tenant, later, timeout=60).values()}
    assert owner.proc.wait(60) == 0
