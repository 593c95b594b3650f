"""Atomic delivery (`contract.redis_delivery`, `contract.redis_transport`) on the tests' real Redis,
with kombu's real consumer machinery: a task is at every instant in its queue or recorded as
delivered to a named worker instance, also when the consumer process dies while Redis answers it;
priorities and queue order are BRPOP's; an idle consumer wakes on a push without polling."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kombu import Consumer
from kombu.utils.json import loads

from contract.celery_app import QueueConfig, declare_queues, make_celery, send_job
from contract.liveness import new_instance_id
from contract.queues import PRIORITY_BULK, priority_lists, queue_for
from contract.redis_delivery import bell_key
from contract.redis_keys import UNACKED_OWNER_KEY
from store import Store
from workers.recovery import Recoverer, kombu_restorer

MODEL = "delivery-test"
QUEUE = queue_for(MODEL)
ROOT = Path(__file__).resolve().parents[2]

# A consumer process that sends its first take of a task (the pop script, or with "stock" kombu's
# own BRPOP) and never reads the reply: it is SIGKILLed while Redis answers it.
_TAKE_AND_HANG = """
import sys, time
from kombu import Consumer
from kombu.transport import redis as kombu_redis
from contract.celery_app import QueueConfig, declare_queues, make_celery
from contract.queues import queue_for
url, instance, model, how = sys.argv[1:5]
app = make_celery(QueueConfig(redis_url=url, worker_instance=instance))
declare_queues(app, [model])
conn = app.connection_for_read()
channel = conn.channel()
Consumer(channel, queues=[app.amqp.queues[queue_for(model)]], accept=["json"], callbacks=[]).consume()
conn.transport.cycle._client_registered(channel, channel.client, "BRPOP")  # the consumer's connection
if how == "stock":
    kombu_redis.Channel._brpop_start(channel)
else:
    channel._brpop_start()
print("sent", flush=True)
time.sleep(60)
"""


_OPEN: list = []  # the consumers' connections, closed (their deliveries restored) after each test


@pytest.fixture()
def clean(redis_client):  # type: ignore[no-untyped-def]
    redis_client.flushdb()
    yield redis_client
    while _OPEN:
        _OPEN.pop().close()
    redis_client.flushdb()


def _take_and_die(redis_url: str, instance: str, how: str, redis_client) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen([sys.executable, "-c", _TAKE_AND_HANG, redis_url, instance, MODEL, how],
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"sent"
        deadline = time.monotonic() + 10
        while redis_client.llen(QUEUE) and time.monotonic() < deadline:  # Redis has answered it
            time.sleep(0.01)
        assert redis_client.llen(QUEUE) == 0
    finally:
        proc.kill()
        proc.wait(10)


def test_stock_kombu_loses_a_task_taken_by_a_consumer_that_dies_before_reading_it(
        clean, redis_url: str) -> None:
    """The window this module's mechanism closes, shown with kombu's own BRPOP."""
    send_job(make_celery(QueueConfig(redis_url=redis_url)), "lost-job", MODEL)
    _take_and_die(redis_url, new_instance_id(), "stock", clean)
    assert clean.llen(QUEUE) == 0 and clean.hlen("unacked") == 0  # nowhere in Redis any more


def test_a_task_taken_by_a_consumer_that_dies_before_reading_it_is_recorded_and_recovered(
        clean, redis_url: str, store: Store) -> None:
    send_job(make_celery(QueueConfig(redis_url=redis_url)), "kept-job", MODEL)
    dead = new_instance_id()  # it never had a heartbeat: dead from the start
    _take_and_die(redis_url, dead, "atomic", clean)
    [(tag, owner)] = clean.hgetall(UNACKED_OWNER_KEY).items()
    assert owner.decode() == dead
    assert clean.hexists("unacked", tag) and clean.zscore("unacked_index", tag) is not None

    # The recovery loop at its defaults (1 s passes, 3 s confirmation) puts it back.
    recoverer = Recoverer(redis_url, store, kombu_restorer(make_celery(QueueConfig(redis_url=redis_url))))
    recoverer.tick()
    time.sleep(recoverer.confirm_s)
    assert recoverer.tick()["tasks"] == 1
    assert clean.hlen("unacked") == 0 and clean.hlen(UNACKED_OWNER_KEY) == 0
    assert clean.llen(QUEUE) == 1
    assert clean.xlen(bell_key(QUEUE)) == 1  # the restore rang the bell: idle workers wake

    # ... and a live consumer then gets the very task, redelivered.
    got = _consume(redis_url, new_instance_id(), 1)
    assert [m.headers["id"] for m in got] == ["kept-job"] and got[0].delivery_info["redelivered"]


def _consume(redis_url: str, instance: str, n: int, *, timeout: float = 5.0) -> list:
    """Takes ``n`` deliveries through kombu's consumer loop (drain_events), unacknowledged."""
    app = make_celery(QueueConfig(redis_url=redis_url, worker_instance=instance))
    declare_queues(app, [MODEL])
    conn = app.connection_for_read()
    _OPEN.append(conn)
    channel = conn.channel()
    channel.basic_qos(0, n, False)
    got: list = []
    Consumer(channel, queues=[app.amqp.queues[QUEUE]], accept=["json"],
             on_message=got.append).consume()
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            pass
    return got


def test_the_consumer_takes_tasks_in_priority_then_queue_order_and_records_each_delivery(
        clean, redis_url: str) -> None:
    sender = make_celery(QueueConfig(redis_url=redis_url))
    send_job(sender, "bulk-1", MODEL, bulk=True)
    for n in range(3):
        send_job(sender, f"interactive-{n}", MODEL)
    send_job(sender, "bulk-2", MODEL, bulk=True)
    instance = new_instance_id()
    got = _consume(redis_url, instance, 5)
    # Interactive work first (FIFO inside a priority), then bulk: BRPOP's order.
    assert [m.headers["id"] for m in got] == ["interactive-0", "interactive-1", "interactive-2", "bulk-1", "bulk-2"]
    owners = {k.decode(): v.decode() for k, v in clean.hgetall(UNACKED_OWNER_KEY).items()}
    assert owners == {m.delivery_tag: instance for m in got}
    # kombu's own unacked entry (what its QoS.append would write, and its restore reads back).
    for m in got:
        entry = loads(clean.hget("unacked", m.delivery_tag))
        assert entry == [m._raw, m.delivery_info["exchange"], m.delivery_info["routing_key"]]
    assert clean.llen(priority_lists(QUEUE)[PRIORITY_BULK][1]) == 0
    for m in got:
        m.ack()
    assert clean.hlen("unacked") == 0 and clean.hlen(UNACKED_OWNER_KEY) == 0 and clean.zcard("unacked_index") == 0
    # A rejected one goes back (kombu's restore) and is delivered again.
    send_job(sender, "again", MODEL)
    [first] = _consume(redis_url, instance, 1)
    first.reject(requeue=True)
    [second] = _consume(redis_url, instance, 1)
    assert second.headers["id"] == "again" and clean.hget(UNACKED_OWNER_KEY, second.delivery_tag)


def test_an_idle_consumer_wakes_on_a_push_without_waiting_for_its_timeout(clean, redis_url: str) -> None:
    """kombu's BRPOP timeout is 1 s: a consumer that only looked again at its timeout would answer
    anywhere within 1 s (five tries all under 0.3 s: once in 400); the bell wakes it at once."""
    arrived: dict[str, float] = {}
    sender = make_celery(QueueConfig(redis_url=redis_url))
    waits = []
    for n in range(5):
        got = threading.Thread(target=lambda: [arrived.__setitem__(m.headers["id"], time.monotonic())
                                               for m in _consume(redis_url, new_instance_id(), 1, timeout=10)])
        got.start()
        time.sleep(1.2)  # the consumer is idle, waiting on the bell
        start = time.monotonic()
        send_job(sender, f"wake-{n}", MODEL)
        got.join(10)
        waits.append(arrived[f"wake-{n}"] - start)
    assert max(waits) < 0.3, [f"{w:.3f}" for w in waits]


def test_a_push_that_does_not_ring_is_still_taken(clean, redis_url: str) -> None:
    """A producer other than tokenmill's transport (a raw LPUSH of kombu's message): found within
    the consumer's wait timeout (1 s)."""
    sender = make_celery(QueueConfig(redis_url=redis_url))
    send_job(sender, "rung", MODEL)
    raw = clean.rpop(QUEUE)  # kombu's message as the transport pushed it
    clean.delete(bell_key(QUEUE))
    done: list = []
    t = threading.Thread(target=lambda: done.extend(_consume(redis_url, new_instance_id(), 1, timeout=10)))
    t.start()
    time.sleep(1.5)
    clean.lpush(QUEUE, raw)
    t.join(10)
    assert [m.headers["id"] for m in done] == ["rung"]


def test_a_message_that_is_not_kombus_is_not_left_blocking_the_queue(clean, redis_url: str) -> None:
    sender = make_celery(QueueConfig(redis_url=redis_url))
    send_job(sender, "good", MODEL)
    clean.rpush(QUEUE, b"not json")  # at the consuming end: taken first
    app = make_celery(QueueConfig(redis_url=redis_url, worker_instance=new_instance_id()))
    declare_queues(app, [MODEL])
    conn = app.connection_for_read()
    _OPEN.append(conn)
    channel = conn.channel()
    with pytest.raises(ValueError):
        channel._get(QUEUE)  # kombu's BRPOP would fail it the same way: not a message
    assert clean.hlen("unacked") == 0
    message = channel._get(QUEUE)
    assert message["headers"]["id"] == "good" and clean.hlen("unacked") == 1
