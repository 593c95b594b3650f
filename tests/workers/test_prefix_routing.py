"""Prefix-aware routing's parts (docs/routing.md): the prefix hashes and the queue choice (pure), then
on real Redis the API's router (`api.routing`), the recovery's move of a dead worker's routed tasks
back to the shared queue with several recoverers at once, and the reconciler's view of worker queues."""

from __future__ import annotations

import json
import threading
import time

from api.queue import Dispatcher
from api.routing import PrefixRouter
from contract.celery_app import QueueConfig, job_task, make_celery
from contract.liveness import Heartbeat, new_instance_id
from contract.prefix_routing import (CHUNK_CHARS, IMBALANCE, ROUTE_WORKERS_KEY, choose, prefix_hashes, prompt_text,
                                     route_worker_entry)
from contract.queues import PRIORITY_BULK, priority_lists, queue_for, shared_queue_of, worker_queue
from workers.prefix_index import PrefixPublisher
from workers.recovery import Recoverer, kombu_restorer

MODEL = "routing-test"
SYSTEM = "You are a careful assistant. " * 20  # 580 characters: two full chunks


# -- the hashes -------------------------------------------------------------------------------------
def test_prefix_hashes_are_chained_over_full_chunks_only() -> None:
    a = prefix_hashes(SYSTEM + "What is two plus two?")
    b = prefix_hashes(SYSTEM + "Name a colour.")
    assert len(SYSTEM) // CHUNK_CHARS == 2 and len(a) == 2 and a == b  # same full chunks, same hashes
    assert prefix_hashes("x" * (CHUNK_CHARS - 1)) == []  # shorter than a chunk: never routed
    # A chunk's hash depends on everything before it: the same second chunk after another first differs.
    c = prefix_hashes("y" * CHUNK_CHARS + SYSTEM[CHUNK_CHARS:2 * CHUNK_CHARS])
    assert c[1] != a[1]
    assert prefix_hashes(SYSTEM[:CHUNK_CHARS] + "z" * CHUNK_CHARS)[0] == a[0]  # shares the first chunk only
    assert len(prefix_hashes("q" * CHUNK_CHARS * 100)) == 32  # bounded
    assert prefix_hashes(SYSTEM) == prefix_hashes(SYSTEM)  # stable (no per-process salt)


def test_prompt_text_of_prompts_token_ids_and_messages() -> None:
    assert prompt_text({"prompt": "hello"}) == "hello"
    assert prompt_text({"prompt": [1, 2, 3]}) != prompt_text({"prompt": "1,2,3"})
    sys_msg = {"role": "system", "content": SYSTEM}
    one = prompt_text({"messages": [sys_msg, {"role": "user", "content": "hi"}]})
    two = prompt_text({"messages": [sys_msg, {"role": "user", "content": "bye"}]})
    assert prefix_hashes(one) == prefix_hashes(two) and len(prefix_hashes(one)) == 2
    # The same words as a user message are another prompt (another chat template rendering).
    assert prefix_hashes(prompt_text({"messages": [{"role": "user", "content": SYSTEM}]}))[0] != prefix_hashes(one)[0]
    assert prompt_text({"messages": "bogus"}) == "" and prompt_text({}) == ""


def test_a_worker_queue_names_its_shared_queue() -> None:
    instance = new_instance_id()
    assert shared_queue_of(worker_queue(queue_for(MODEL), instance)) == queue_for(MODEL)
    assert shared_queue_of(queue_for(MODEL)) == queue_for(MODEL)


# -- the choice -------------------------------------------------------------------------------------
def test_choice_follows_the_longest_live_prefix_unless_its_worker_is_too_busy() -> None:
    assert choose(["a", "b"], {"a": 0, "b": 0}) == "b"  # the longest prefix's owner
    assert choose(["a", "dead"], {"a": 0, "b": 0}) == "a"  # the longest one held by a live worker
    assert choose(["a"], {"a": IMBALANCE, "b": 0}) == "a"  # busier, within the bound
    assert choose(["a"], {"a": IMBALANCE + 1, "b": 0}) is None  # beyond it: the shared queue
    assert choose([None, None], {"a": 3, "b": 1}) == "b"  # unknown: the least busy live worker
    assert choose(["dead"], {"a": 2, "b": 2}) == "a"  # its owner is gone: as if unknown
    assert choose(["a"], {}) is None  # no live routing worker
    assert choose([], {"a": 0}) is None  # shorter than a chunk


# -- the router, on Redis ---------------------------------------------------------------------------
def _register(redis_client, instance: str, *, queue: str = queue_for(MODEL)) -> None:
    redis_client.hset(ROUTE_WORKERS_KEY, instance, route_worker_entry(queue, time.time()))


def test_router_on_redis(redis_client, redis_url) -> None:
    redis_client.flushdb()
    a, b = new_instance_id(), new_instance_id()
    beats = [Heartbeat(redis_url, i, f"{i}@test").start() for i in (a, b)]
    try:
        router = PrefixRouter(redis_client)
        long_a, long_b = {"prompt": SYSTEM + "one"}, {"prompt": "Another long system prompt. " * 20 + "two"}
        assert router.queues([MODEL], [long_a]) == [None]  # no routing worker registered yet
        for i in (a, b):
            _register(redis_client, i)
        [first] = router.queues([MODEL], [long_a])  # unknown: the least busy (tie: the first by id)
        owner = min(a, b)
        other = max(a, b)
        assert first == worker_queue(queue_for(MODEL), owner)
        # In one group: the same prefix follows the first job; another prefix goes to the other worker.
        got = router.queues([MODEL] * 3, [{"prompt": SYSTEM + "two"}, long_b, {"prompt": "short"}])
        assert got == [worker_queue(queue_for(MODEL), owner), worker_queue(queue_for(MODEL), other), None]
        # A new prefix in one group: its jobs follow the group's first one with it.
        third = "A third long system prompt here. " * 10
        got = router.queues([MODEL] * 3, [{"prompt": third + str(n)} for n in range(3)])
        assert len(set(got)) == 1 and got[0] is not None
        # A worker that published a prefix (it ran the prompt) owns it from then on.
        PrefixPublisher(redis_url, queue_for(MODEL), other).publish({"prompt": SYSTEM + "three"})
        assert router.queues([MODEL], [long_a]) == [worker_queue(queue_for(MODEL), other)]
        # Too busy: IMBALANCE + 1 tasks wait in its own queue, none in the other's -> the shared queue.
        busy = priority_lists(worker_queue(queue_for(MODEL), other))[PRIORITY_BULK][1]
        redis_client.lpush(busy, *[b"{}"] * (IMBALANCE + 1))
        assert router.queues([MODEL], [long_a]) == [None]
        assert Dispatcher(redis_url, prefix_routing=True).depth(MODEL, fresh=True).bulk == IMBALANCE + 1
        redis_client.delete(busy)
        # Its heartbeat gone: the prefix goes to the live worker (and is its from now on).
        beats[1 if other == b else 0].stop(forget=True)
        assert router.queues([MODEL], [long_a]) == [worker_queue(queue_for(MODEL), owner)]
        assert router.queues([MODEL], [long_a]) == [worker_queue(queue_for(MODEL), owner)]
        # A stopping worker (SIGTERM) withdraws: nothing more is routed to it, and a task waiting
        # in its own queue moves to the shared queue at once.
        make_celery(QueueConfig(redis_url=redis_url)).send_task(
            **job_task("waiting-job", MODEL, queue=worker_queue(queue_for(MODEL), owner)))
        PrefixPublisher(redis_url, queue_for(MODEL), owner).withdraw()
        assert router.queues([MODEL], [long_a]) == [None]
        assert redis_client.llen(queue_for(MODEL)) == 1
        assert redis_client.llen(worker_queue(queue_for(MODEL), owner)) == 0
    finally:
        for h in beats:
            h.stop(forget=True)
        redis_client.flushdb()


# -- recovery: a dead worker's routed tasks back to the shared queue ----------------------------------
def test_several_recoverers_move_a_dead_workers_routed_tasks_to_the_shared_queue_once(
        store, redis_client, redis_url) -> None:
    redis_client.flushdb()
    dead = new_instance_id()
    _register(redis_client, dead)
    sender = make_celery(QueueConfig(redis_url=redis_url))
    own = worker_queue(queue_for(MODEL), dead)
    ids = [f"job-{n}" for n in range(6)]
    for n, job_id in enumerate(ids):  # interactive and bulk, interleaved, in the dead worker's queue
        sender.send_task(**job_task(job_id, MODEL, bulk=n % 2 == 1, queue=own))
    assert sum(redis_client.llen(name) for _, name in priority_lists(own)) == 6
    # The reconciler finds the tasks there (a job waiting in a worker queue is not lost).
    dispatcher = Dispatcher(redis_url)
    assert dispatcher.job_ids_in_queue(MODEL, set(ids) | {"missing"}) == set(ids)

    # confirm_s=0: this test is about the move with several recoverers; the worker test
    # (test_prefix_routing_workers.py) shows it at the default confirmation time.
    recoverers = [Recoverer(redis_url, store, kombu_restorer(make_celery(QueueConfig(redis_url=redis_url))),
                            confirm_s=0.0) for _ in range(3)]
    done: list = []
    barrier = threading.Barrier(len(recoverers))

    def run(r: Recoverer) -> None:
        barrier.wait()
        done.append(r.tick())

    threads = [threading.Thread(target=run, args=(r,)) for r in recoverers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(d["routed"] for d in done) == 6  # each task moved by exactly one of them
    assert sum(redis_client.llen(name) for _, name in priority_lists(own)) == 0
    shared = dict(priority_lists(queue_for(MODEL)))

    def ids_in(name: str) -> list[str]:  # in the order a worker takes them (from the right)
        return [json.loads(m)["headers"]["id"] for m in reversed(redis_client.lrange(name, 0, -1))]

    # Each at its own priority, in the order sent.
    assert ids_in(shared[0]) == ids[0::2] and ids_in(shared[PRIORITY_BULK]) == ids[1::2]
    assert dispatcher.job_ids_in_queue(MODEL, set(ids)) == set(ids)
    assert redis_client.hexists(ROUTE_WORKERS_KEY, dead)  # kept a while: late arrivals still move
    redis_client.flushdb()
