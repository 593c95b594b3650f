"""The recovery of a dead worker instance's tasks (`workers.recovery`), on real Redis and
PostgreSQL, with kombu's real transport: a consumer channel of instance "dead" takes deliveries
(recorded against it beside kombu's `unacked` entries); several recoverers then act at once."""

from __future__ import annotations

import threading

from contract.celery_app import QueueConfig, declare_queues, make_celery, send_job
from contract.liveness import Heartbeat, dead_holders, new_instance_id
from contract.queues import queue_for
from contract.redis_keys import UNACKED_OWNER_KEY
from store import JobSpec, Store
from workers.recovery import Recoverer, kombu_restorer

MODEL = "recovery-test"


def _deliver(redis_url: str, instance: str, n: int) -> list:
    """Takes ``n`` deliveries on a consumer channel of ``instance`` and leaves them unacknowledged."""
    app = make_celery(QueueConfig(redis_url=redis_url, worker_instance=instance))
    declare_queues(app, [MODEL])
    conn = app.connection_for_read()
    channel = conn.channel()
    channel.basic_qos(0, n, False)
    got: list = []
    queue = app.amqp.queues[queue_for(MODEL)](channel)
    queue.declare()
    while len(got) < n:
        message = queue.get(no_ack=False)
        if message is not None:
            got.append(message)
    return got


def test_several_recoverers_put_a_dead_instances_jobs_and_tasks_back_exactly_once(
        store: Store, redis_client, redis_url: str) -> None:
    tenant = store.keys.create_tenant("recovery").id
    ids = [c.id for c in store.jobs.create_jobs(tenant, [JobSpec(model=MODEL, request={}) for _ in range(4)])]
    sender = make_celery(QueueConfig(redis_url=redis_url))
    declare_queues(sender, [MODEL])
    for job_id in ids:
        send_job(sender, job_id, MODEL)
    dead = new_instance_id()
    heartbeat = Heartbeat(redis_url, dead, "w@test").start()
    messages = _deliver(redis_url, dead, len(ids))
    store.jobs.mark_running(ids, "w@test", dead)
    assert redis_client.hlen("unacked") == len(ids) and redis_client.hlen(UNACKED_OWNER_KEY) == len(ids)
    assert dead_holders(redis_client) == {}  # alive
    heartbeat.stop(forget=True)  # the process is gone
    assert sorted(dead_holders(redis_client)) == [dead]

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
    assert sum(d["jobs"] for d in done) == len(ids)  # each job put back by exactly one of them
    assert redis_client.hlen("unacked") == 0 and redis_client.hlen(UNACKED_OWNER_KEY) == 0
    assert redis_client.llen(queue_for(MODEL)) == len(ids)  # each task back once, not more
    assert {store.jobs.get_job(tenant, i).status for i in ids} == {"queued"}  # type: ignore[union-attr]
    # The old deliveries' acknowledgements (a worker back from the dead) change nothing now.
    for m in messages:
        m.ack()
    assert redis_client.llen(queue_for(MODEL)) == len(ids)
