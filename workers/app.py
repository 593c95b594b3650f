"""The Celery app and the contract between whoever sends work and the workers that run it.

This module is imported by the API: it must stay free of torch and the engine.

- One queue per model (`queue_for(model)`); inside a queue, Redis priority steps put interactive
  work (priority 0) ahead of bulk work (priority 9): a worker always drains the interactive list
  first, so interactive jobs overtake a bulk backlog.
- A task's id is the job id (the bulk task's id is its first job's id plus a suffix), its arguments
  are ids and a timestamp, never prompts: the job itself is read from the store.
- JSON only (pickle refused), late acknowledgement, a lost worker's tasks are redelivered.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu import Queue

from workers.redis_transport import TRANSPORT as REDIS_TRANSPORT

TASK_GENERATE = "tokenmill.generate"  # args: [job_id, enqueued_at (unix seconds)]
TASK_GENERATE_BULK = "tokenmill.generate_bulk"  # args: [[job_id, ...], enqueued_at]
PRIORITY_INTERACTIVE = 0
PRIORITY_BULK = 9
PRIORITY_STEPS = list(range(10))
BULK_CHUNK = 64  # jobs per bulk task

STREAM_CHANNEL = "tokenmill:stream:{job_id}"  # pub/sub: a running job's new text, then "done"
CANCEL_CHANNEL = "tokenmill:cancel"  # pub/sub: ids of jobs to abort wherever they run
WORKER_STATS_KEY = "tokenmill:worker:{hostname}"  # hash of live engine figures, with a TTL
WORKER_STATS_TTL_S = 15


@dataclass(frozen=True)
class QueueConfig:
    """How the app talks to Redis."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    visibility_timeout_s: int = 3600  # longer than the longest job allowed
    prefetch_multiplier: int = 1


def queue_for(model: str) -> str:
    """The queue that holds a model's jobs: `tokenmill.<model name, safe characters only>`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.strip("/").split("/")[-1] if "/" in model else model)
    return f"tokenmill.{safe}"


def job_payload(*, prompt: str | list[int] | None = None, messages: list[dict[str, Any]] | None = None,
                params: dict[str, Any] | None = None, stream: bool = False) -> dict[str, Any]:
    """The `request` a job stores: exactly one of prompt / messages, sampling params (fields of
    `engine.SamplingParams`, already validated by the sender), and whether to stream its text."""
    if (prompt is None) == (messages is None):
        raise ValueError("a job needs exactly one of prompt or messages")
    body: dict[str, Any] = {"params": dict(params or {}), "stream": bool(stream)}
    if prompt is not None:
        body["prompt"] = prompt
    else:
        body["messages"] = messages
    return body


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
            "visibility_timeout": config.visibility_timeout_s,
            # How often a consuming worker looks for tasks whose worker was lost (delivered longer
            # than the visibility timeout ago): kombu's default is every 100 s, which would dwarf a
            # short timeout; a fraction of the timeout, at most 10 s, keeps the delay close to it.
            "unacked_restore_interval": max(1, min(10, config.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
            "sep": ":",
        },
        task_default_priority=PRIORITY_INTERACTIVE,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app


def send_job(app: Celery, job_id: str, model: str, *, bulk: bool = False,
             enqueued_at: float | None = None) -> None:
    """Enqueues one job (its task id is the job id)."""
    app.send_task(TASK_GENERATE, args=[job_id, enqueued_at or time.time()], task_id=job_id,
                  queue=queue_for(model), priority=PRIORITY_BULK if bulk else PRIORITY_INTERACTIVE)


def send_bulk(app: Celery, job_ids: list[str], model: str, *, enqueued_at: float | None = None) -> None:
    """Enqueues bulk jobs in chunks of `BULK_CHUNK`, each chunk one task at bulk priority."""
    now = enqueued_at or time.time()
    for i in range(0, len(job_ids), BULK_CHUNK):
        chunk = job_ids[i:i + BULK_CHUNK]
        app.send_task(TASK_GENERATE_BULK, args=[chunk, now], task_id=f"{chunk[0]}-bulk",
                      queue=queue_for(model), priority=PRIORITY_BULK)


def declare_queues(app: Celery, models: list[str]) -> None:
    """Tells the app which model queues a worker consumes."""
    app.conf.task_queues = [Queue(queue_for(m), routing_key=queue_for(m)) for m in models]
