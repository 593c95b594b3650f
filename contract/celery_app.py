"""The tokenmill Celery app, the same for whoever sends work and for the workers that run it, and
the two ways to send a job's task (names, queues and priorities are in `contract.queues`).

JSON only (pickle refused), late acknowledgement, a lost worker's tasks are redelivered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu import Queue

from contract.queues import (
    BULK_CHUNK,
    PRIORITY_BULK,
    PRIORITY_INTERACTIVE,
    PRIORITY_SEP,
    PRIORITY_STEPS,
    TASK_GENERATE,
    TASK_GENERATE_BULK,
    queue_for,
)
from contract.redis_transport import TRANSPORT as REDIS_TRANSPORT


@dataclass(frozen=True)
class QueueConfig:
    """How the app talks to Redis."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    visibility_timeout_s: int = 3600  # longer than the longest job allowed
    prefetch_multiplier: int = 1
    # A worker process's instance id (contract.liveness): the tasks delivered to it are recorded
    # against it. Empty for senders.
    worker_instance: str = ""


def make_celery(config: QueueConfig | None = None, name: str = "tokenmill") -> Celery:
    """The tokenmill Celery app on Redis (the same settings for senders and workers)."""
    config = config or QueueConfig()
    app = Celery(name, broker=config.redis_url)
    app.conf.update(
        broker_transport=REDIS_TRANSPORT,  # kombu's, reusing one client per channel
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # pickle is refused outright
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,  # results go to the SQL store
        worker_prefetch_multiplier=config.prefetch_multiplier,
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # A backstop only: a live worker keeps pushing its deliveries' time forward, and a dead
            # instance's tasks are restored by the other workers as soon as its heartbeat is gone
            # (workers.recovery); this catches a delivery that no instance owns.
            "visibility_timeout": config.visibility_timeout_s,
            "worker_instance": config.worker_instance,
            # How often a consuming worker extends what it holds and looks for deliveries older
            # than the visibility timeout: kombu's default is every 100 s, which would dwarf a
            # short timeout; a fraction of the timeout, at most 10 s, keeps the delay close to it.
            "unacked_restore_interval": max(1, min(10, config.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
            "sep": PRIORITY_SEP,
        },
        task_default_priority=PRIORITY_INTERACTIVE,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app


def job_task(job_id: str, model: str, *, bulk: bool = False, enqueued_at: float | None = None,
             headers: dict[str, str] | None = None, queue: str | None = None) -> dict[str, Any]:
    """The task of one job, as `Celery.send_task` arguments: its name, arguments (the job id and
    when it was enqueued), id (the job id), queue and priority; ``headers``: message headers (the
    W3C trace context, `contract.tracing`); ``queue``: another queue than the model's shared one
    (a worker's own, `contract.queues.worker_queue`)."""
    task = {"name": TASK_GENERATE, "args": [job_id, enqueued_at or time.time()], "task_id": job_id,
            "queue": queue or queue_for(model), "priority": PRIORITY_BULK if bulk else PRIORITY_INTERACTIVE}
    if headers:
        task["headers"] = headers
    return task


def send_job(app: Celery, job_id: str, model: str, *, bulk: bool = False,
             enqueued_at: float | None = None) -> None:
    """Enqueues one job (its task id is the job id)."""
    app.send_task(**job_task(job_id, model, bulk=bulk, enqueued_at=enqueued_at))


def send_bulk(app: Celery, job_ids: list[str], model: str, *, enqueued_at: float | None = None) -> None:
    """Enqueues bulk jobs in chunks of `BULK_CHUNK`, each chunk one task at bulk priority."""
    now = enqueued_at or time.time()
    for i in range(0, len(job_ids), BULK_CHUNK):
        chunk = job_ids[i:i + BULK_CHUNK]
        app.send_task(TASK_GENERATE_BULK, args=[chunk, now], task_id=f"{chunk[0]}-bulk",
                      queue=queue_for(model), priority=PRIORITY_BULK)


def declare_queues(app: Celery, models: list[str], *, extra: list[str] | None = None) -> None:
    """Tells the app which model queues a worker consumes (``extra``: its own queue, after them)."""
    names = [queue_for(m) for m in models] + list(extra or [])
    app.conf.task_queues = [Queue(name, routing_key=name) for name in names]
