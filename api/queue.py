"""The API's side of the queue: sending tasks (write-then-enqueue), queue depths and backpressure,
cancellation, and the workers' live figures. Only `workers.app` is used: no torch, no engine."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from workers.app import (
    CANCEL_CHANNEL,
    PRIORITY_BULK,
    PRIORITY_INTERACTIVE,
    PRIORITY_STEPS,
    TASK_GENERATE,
    QueueConfig,
    make_celery,
    queue_for,
    send_bulk,
    send_job,
)

log = logging.getLogger(__name__)
WORKER_KEYS = "tokenmill:worker:*"  # WORKER_STATS_KEY with any hostname


class QueueUnavailable(Exception):
    """Redis did not take the task; the job stays ``queued`` in the store."""


@dataclass(frozen=True)
class QueueDepth:
    """Tasks waiting in one model's queue: interactive (priorities 0-8) and bulk (priority 9)."""

    queue: str
    interactive: int
    bulk: int


def priority_lists(queue: str) -> list[tuple[int, str]]:
    """The Redis lists kombu keeps for a queue's priority steps: ``queue`` for 0, ``queue:N`` for N."""
    return [(p, queue if p == 0 else f"{queue}:{p}") for p in PRIORITY_STEPS]


class Dispatcher:
    """Sends job tasks and reads queue state, for one API process."""

    def __init__(self, redis_url: str, *, visibility_timeout_s: int = 3600, depth_cache_s: float = 0.25) -> None:
        self.celery: Celery = make_celery(QueueConfig(redis_url=redis_url, visibility_timeout_s=visibility_timeout_s))
        # Fail fast when Redis is down: the caller answers 503 and the job waits in the store.
        self.celery.conf.broker_transport_options = {
            **self.celery.conf.broker_transport_options,
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
        }
        self.celery.conf.task_publish_retry_policy = {
            "max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2,
        }
        self.celery.conf.broker_connection_timeout = 2
        self.redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
        self._depth_cache_s = depth_cache_s
        self._depths: dict[str, tuple[float, QueueDepth]] = {}
        self._lock = threading.Lock()

    # -- sending ---------------------------------------------------------------------------------
    def send(self, job_id: str, model: str, *, bulk: bool = False) -> None:
        """Enqueues one stored job. Raises QueueUnavailable when Redis refuses."""
        try:
            send_job(self.celery, job_id, model, bulk=bulk)
        except Exception as exc:
            raise QueueUnavailable(str(exc)) from exc

    def send_many(self, jobs: list[tuple[str, str, bool]]) -> int:
        """Enqueues stored jobs ``(job_id, model, bulk)`` in order over one producer (one Redis
        connection for the lot); returns how many were sent before Redis refused, if it did.

        The task is exactly `workers.app.send_job`'s (name, arguments, id, queue, priority): only
        the producer is shared.
        """
        sent = 0
        now = time.time()
        try:
            with self.celery.producer_or_acquire() as producer:
                for job_id, model, bulk in jobs:
                    self.celery.send_task(TASK_GENERATE, args=[job_id, now], task_id=job_id, queue=queue_for(model),
                                          priority=PRIORITY_BULK if bulk else PRIORITY_INTERACTIVE, producer=producer)
                    sent += 1
        except Exception as exc:
            log.warning("Redis took %d of %d tasks: %r", sent, len(jobs), exc)
        return sent

    def cached_depth(self, model: str) -> QueueDepth | None:
        """The model's queue depth if a fresh figure is at hand (no I/O), else None."""
        with self._lock:
            hit = self._depths.get(queue_for(model))
        if hit is not None and time.monotonic() - hit[0] < self._depth_cache_s:
            return hit[1]
        return None

    def send_bulk(self, job_ids: list[str], model: str) -> None:
        """Enqueues stored bulk jobs in chunks. Raises QueueUnavailable when Redis refuses."""
        try:
            send_bulk(self.celery, job_ids, model)
        except Exception as exc:
            raise QueueUnavailable(str(exc)) from exc

    def cancel(self, job_id: str) -> None:
        """Tells whichever worker runs the job to stop it (best effort: the store is the truth)."""
        try:
            self.redis.publish(CANCEL_CHANNEL, job_id)
        except redis.RedisError:
            pass

    # -- queue state ----------------------------------------------------------------------------
    def depth(self, model: str, *, fresh: bool = False) -> QueueDepth:
        """Tasks waiting in the model's queue (cached for a fraction of a second: admission checks
        happen on every request and the figure need not be exact)."""
        queue = queue_for(model)
        now = time.monotonic()
        if not fresh:
            with self._lock:
                hit = self._depths.get(queue)
            if hit is not None and now - hit[0] < self._depth_cache_s:
                return hit[1]
        pipe = self.redis.pipeline(transaction=False)
        lists = priority_lists(queue)
        for _, name in lists:
            pipe.llen(name)
        lengths = pipe.execute()
        interactive = sum(n for (p, _), n in zip(lists, lengths) if p != PRIORITY_BULK)
        bulk = sum(n for (p, _), n in zip(lists, lengths) if p == PRIORITY_BULK)
        depth = QueueDepth(queue, interactive, bulk)
        with self._lock:
            self._depths[queue] = (now, depth)
        return depth

    def workers(self) -> list[dict[str, Any]]:
        """The live workers' figures (each worker refreshes its hash every second, with a TTL)."""
        out = []
        for key in self.redis.scan_iter(match=WORKER_KEYS, count=100):
            fields = self.redis.hgetall(key)
            if not fields:
                continue
            row: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items()}
            row["hostname"] = key.decode().split(":", 2)[-1]
            out.append(row)
        return out

    def lock(self, name: str, ttl_s: int) -> bool:
        """Takes a cross-process lock for ``ttl_s`` seconds (False if someone holds it)."""
        return bool(self.redis.set(f"tokenmill:lock:{name}", json.dumps(time.time()), nx=True, ex=ttl_s))

    def unlock(self, name: str) -> None:
        """Releases a lock taken with ``lock``."""
        try:
            self.redis.delete(f"tokenmill:lock:{name}")
        except redis.RedisError:
            pass

    def close(self) -> None:
        """Closes the connections."""
        try:
            self.redis.close()
        finally:
            self.celery.close()
