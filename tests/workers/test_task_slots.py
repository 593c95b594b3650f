"""A real worker process keeps slots for interactive tasks: bulk tasks hold at most `--bulk-tasks`
of its `--concurrency` slots while more bulk waits in Redis, an interactive task sent then starts at
once instead of waiting for a bulk task to finish, and every job is run and counted once."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from contract.payload import job_payload
from contract.queues import PRIORITY_BULK, priority_lists, queue_for
from store.models import Usage

from test_worker_jobs import MODEL, count_rows, greedy, rand_prompt, submit, wait_all

UNACKED = "unacked"  # kombu's hash of delivered, unacknowledged messages


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def tenant(store):
    return store.keys.create_tenant(f"t-{random.randrange(10**9)}")


def held_by_priority(redis_client) -> tuple[int, int]:
    """(bulk, interactive) deliveries the worker holds now."""
    bulk = interactive = 0
    for raw in redis_client.hvals(UNACKED):
        message = json.loads(raw)[0]
        if (message["properties"].get("priority") or 0) >= PRIORITY_BULK:
            bulk += 1
        else:
            interactive += 1
    return bulk, interactive


def test_bulk_tasks_leave_the_other_slots_to_interactive_tasks(store, celery_app, tenant, start_worker,
                                                                model_dir, redis_client):
    # 4 slots, 2 for bulk, instead of the defaults (128, 64): filling 64 bulk slots takes 4,096
    # jobs, more than this CPU runs in a test's time; the rule is the same at any size.
    start_worker(model_dir, MODEL, concurrency=4, extra_args=["--bulk-tasks", "2"])
    rng = random.Random(18)
    bulk = submit(store, celery_app, tenant, [job_payload(prompt=rand_prompt(rng, 10), params=greedy(96))
                                              for _ in range(6 * 64)], bulk=True)  # six bulk tasks
    bulk_list = dict(priority_lists(queue_for(MODEL)))[PRIORITY_BULK]
    samples: list[tuple[int, int, int]] = []  # (bulk held, interactive held, bulk tasks left in Redis)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((*held_by_priority(redis_client), redis_client.llen(bulk_list)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        deadline = time.monotonic() + 60
        while not (samples and samples[-1][0] == 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # more than a BRPOP's poll: a worker that did not keep slots would take more bulk now
        assert samples[-1][0] == 2, samples[-5:]
        interactive = submit(store, celery_app, tenant, [job_payload(prompt=rand_prompt(rng, 10), params=greedy(8))
                                                         for _ in range(2)])
        jobs = wait_all(store, tenant, bulk + interactive, timeout=600)
    finally:
        stop.set()
        sampler.join()

    # Never more than 2 bulk tasks held, though bulk tasks waited in Redis all along; an interactive
    # task was held beside them before either had finished (the other four still in Redis).
    assert max(s[0] for s in samples) == 2
    assert any(s[0] == 2 and s[1] >= 1 and s[2] == 4 for s in samples), samples[::20]
    assert {j.status for j in jobs.values()} == {"succeeded"}
    assert count_rows(store, Usage, bulk + interactive) == len(bulk) + 2  # counted once each
