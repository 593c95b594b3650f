"""The API's side of the queue: sending tasks (write-then-enqueue), queue depths and backpressure,
cancellation, and the workers' live figures. What it shares with the workers is `contract`'s: no
torch, no engine."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from contract.celery_app import QueueConfig, job_task, make_celery, send_bulk, send_job
from api.routing import PrefixRouter, routing_workers
from contract.queues import (PRIORITY_BULK, TASK_GENERATE, TASK_GENERATE_BULK, priority_lists, queue_for,
                             worker_queue)
from contract.redis_keys import CANCEL_CHANNEL, WORKER_STATS_PATTERN, worker_of

log = logging.getLogger(__name__)

UNACKED_KEY = "unacked"  # kombu's Redis transport: tasks delivered to a worker, not yet acknowledged
# A Redis that hangs (paused, a link that drops packets) rather than refuses: every call from a
# request is bounded by these, so an API answer never waits on Redis for more than about
# 2 x REDIS_TIMEOUT_S (a publish is tried twice); after a failure, Redis is only probed (a PING
# bounded by REDIS_PROBE_S) before each call for REDIS_BACKOFF_S, so the requests meanwhile answer
# at once (503, the job stored) while it hangs, and go through as soon as it answers again.
REDIS_TIMEOUT_S = 2.0
REDIS_PROBE_S = 0.25
REDIS_BACKOFF_S = 5.0
# Take the lock if it is free, or renew it if the caller's token holds it.
_HOLD_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return 0
"""


def _message_job_ids(message: dict[str, Any]) -> set[str]:
    """The job ids one task message carries: its task id for a generate task, the job ids in its
    arguments for a bulk task (whose id is only its first job's)."""
    headers = message.get("headers") or {}
    task = headers.get("task")
    if task == TASK_GENERATE:
        return {str(headers.get("id"))}
    if task == TASK_GENERATE_BULK:
        try:
            body = message["body"]
            if (message.get("properties") or {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            return {str(job_id) for job_id in args[0]}
        except (KeyError, IndexError, TypeError, ValueError):
            return set()
    return set()


def _task_job_ids(raw: bytes) -> set[str]:
    try:
        return _message_job_ids(json.loads(raw))
    except (ValueError, TypeError, AttributeError):
        return set()


class QueueUnavailable(Exception):
    """Redis did not take the task; the job stays ``queued`` in the store."""


@dataclass(frozen=True)
class QueueDepth:
    """Tasks waiting in one model's queue: interactive (priorities 0-8) and bulk (priority 9)."""

    queue: str
    interactive: int
    bulk: int


class Dispatcher:
    """Sends job tasks and reads queue state, for one API process."""

    def __init__(self, redis_url: str, *, visibility_timeout_s: int = 3600, depth_cache_s: float = 0.25,
                 prefix_routing: bool = False) -> None:
        self.celery: Celery = make_celery(QueueConfig(redis_url=redis_url, visibility_timeout_s=visibility_timeout_s))
        # Fail fast when Redis is down or hangs: the caller answers 503 and the job waits in the store.
        self.celery.conf.broker_transport_options = {
            **self.celery.conf.broker_transport_options,
            "socket_connect_timeout": REDIS_TIMEOUT_S,
            "socket_timeout": REDIS_TIMEOUT_S,
        }
        self.celery.conf.task_publish_retry_policy = {
            "max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2,
        }
        self.celery.conf.broker_connection_timeout = REDIS_TIMEOUT_S
        self.redis = redis.Redis.from_url(redis_url, socket_connect_timeout=REDIS_TIMEOUT_S,
                                          socket_timeout=REDIS_TIMEOUT_S)
        self._probe = redis.Redis.from_url(redis_url, socket_connect_timeout=REDIS_PROBE_S,
                                           socket_timeout=REDIS_PROBE_S)
        self._down_until = 0.0  # monotonic: until then, Redis is probed before a request waits on it
        self._hold = self.redis.register_script(_HOLD_LOCK)
        # Prefix-aware routing (docs/routing.md): jobs whose prompts share a prefix go to the worker
        # that holds it in its KV cache; None: every job goes to its model's shared queue.
        self.router = PrefixRouter(self.redis) if prefix_routing else None
        self._depth_cache_s = depth_cache_s
        self._depths: dict[str, tuple[float, QueueDepth]] = {}
        self._lock = threading.Lock()

    # -- Redis's health, as the requests see it -------------------------------------------------
    @property
    def redis_suspect(self) -> bool:
        """True for a while after a Redis call failed or timed out: Redis is probed before use."""
        return time.monotonic() < self._down_until

    def _failed(self, exc: BaseException) -> None:
        if not self.redis_suspect:
            log.warning("Redis did not answer (%r): it is probed (%.2fs at most) before each call for the next "
                        "%.0fs", exc, REDIS_PROBE_S, REDIS_BACKOFF_S)
        self._down_until = time.monotonic() + REDIS_BACKOFF_S

    def _check(self) -> None:
        """Raises QueueUnavailable at once when Redis failed a moment ago and still does not answer a
        short PING; a Redis that answers again is used at once."""
        if not self.redis_suspect:
            return
        try:
            self._probe.ping()
        except redis.RedisError as exc:
            self._failed(exc)
            raise QueueUnavailable(f"Redis does not answer ({exc!r})") from exc
        self._down_until = 0.0

    # -- sending ---------------------------------------------------------------------------------
    def send(self, job_id: str, model: str, *, bulk: bool = False) -> None:
        """Enqueues one stored job. Raises QueueUnavailable when Redis refuses."""
        self._check()
        try:
            send_job(self.celery, job_id, model, bulk=bulk)
        except Exception as exc:
            self._failed(exc)
            raise QueueUnavailable(str(exc)) from exc

    def send_many(self, jobs: list[tuple[str, str, bool]], *, headers: list[dict[str, str] | None] | None = None,
                  requests: list[dict[str, Any] | None] | None = None) -> int:
        """Enqueues stored jobs ``(job_id, model, bulk)`` in order, all in one Redis round trip
        (kombu's publish batch: the tasks and their task-sent events go out as one pipeline);
        returns how many were sent: all, or 0 when Redis refused.

        Each task is `contract.celery_app.job_task`'s, as `send_job` sends it: only the producer
        and the round trip are shared. A pipeline cut short may have delivered some
        of them; they count as unsent, and the reconciler, which looks in Redis first, sends only
        the ones that are missing. ``headers``: per job, the trace context its task carries.
        ``requests``: per job, its request body, for prefix routing (without them, or with routing
        off, every task goes to its model's shared queue).
        """
        now = time.time()
        try:
            self._check()
        except QueueUnavailable:
            return 0
        queues: list[str | None] = [None] * len(jobs)
        if self.router is not None and requests is not None:
            queues = self.router.queues([model for _, model, _ in jobs], requests)
        try:
            with self.celery.producer_or_acquire() as producer, producer.batch(max_size=2 * len(jobs) + 8):
                for i, (job_id, model, bulk) in enumerate(jobs):
                    task = job_task(job_id, model, bulk=bulk, enqueued_at=now,
                                    headers=headers[i] if headers is not None else None, queue=queues[i])
                    self.celery.send_task(**task, producer=producer)
        except Exception as exc:
            log.warning("Redis refused a group of %d tasks: %r", len(jobs), exc)
            self._failed(exc)
            return 0
        return len(jobs)

    def cached_depth(self, model: str) -> QueueDepth | None:
        """The model's queue depth if a fresh figure is at hand (no I/O), else None."""
        with self._lock:
            hit = self._depths.get(queue_for(model))
        if hit is not None and time.monotonic() - hit[0] < self._depth_cache_s:
            return hit[1]
        return None

    def send_bulk(self, job_ids: list[str], model: str) -> None:
        """Enqueues stored bulk jobs in chunks. Raises QueueUnavailable when Redis refuses."""
        self._check()
        try:
            send_bulk(self.celery, job_ids, model)
        except Exception as exc:
            self._failed(exc)
            raise QueueUnavailable(str(exc)) from exc

    def cancel(self, job_id: str) -> None:
        """Tells whichever worker runs the job to stop it (best effort: the store is the truth)."""
        try:
            self.redis.publish(CANCEL_CHANNEL, job_id)
        except redis.RedisError:
            pass

    # -- queue state ----------------------------------------------------------------------------
    def depth(self, model: str, *, fresh: bool = False) -> QueueDepth:
        """Tasks waiting in the model's queue, its routing workers' own queues included (cached for a fraction of a second: admission checks
        happen on every request and the figure need not be exact)."""
        queue = queue_for(model)
        now = time.monotonic()
        if not fresh:
            with self._lock:
                hit = self._depths.get(queue)
            if hit is not None and now - hit[0] < self._depth_cache_s:
                return hit[1]
        self._check()
        try:
            # With prefix routing, a model's tasks also wait in its routing workers' own queues.
            routed = sorted(routing_workers(self.redis, model_queue=queue)) if self.router is not None else []
            pipe = self.redis.pipeline(transaction=False)
            lists = [pl for q in [queue, *(worker_queue(queue, w) for w in routed)] for pl in priority_lists(q)]
            for _, name in lists:
                pipe.llen(name)
            lengths = pipe.execute()
        except redis.RedisError as exc:
            self._failed(exc)
            raise
        interactive = sum(n for (p, _), n in zip(lists, lengths) if p != PRIORITY_BULK)
        bulk = sum(n for (p, _), n in zip(lists, lengths) if p == PRIORITY_BULK)
        depth = QueueDepth(queue, interactive, bulk)
        with self._lock:
            self._depths[queue] = (now, depth)
        return depth

    def workers(self) -> list[dict[str, Any]]:
        """The live workers' figures (each worker refreshes its hash every second, with a TTL)."""
        self._check()
        out = []
        for key in self.redis.scan_iter(match=WORKER_STATS_PATTERN, count=100):
            fields = self.redis.hgetall(key)
            if not fields:
                continue
            row: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items()}
            row["hostname"] = worker_of(key)
            out.append(row)
        return out

    def hold(self, name: str, token: str, ttl_s: float) -> bool:
        """Takes or keeps a cross-process lock that lasts ``ttl_s`` seconds unless renewed: True
        when ``token`` (the caller's own) holds it now. The holder keeps it by calling again in
        time; another process takes it over only once it lapses."""
        return bool(self._hold(keys=[f"tokenmill:lock:{name}"], args=[token, max(1, int(ttl_s * 1000))]))

    def job_ids_in_queue(self, model: str, wanted: set[str], *, page: int = 1000) -> set[str]:
        """Which of ``wanted`` job ids have a task in Redis now: waiting in the model's queue or in
        the own queue of one of its routing workers, live or not yet recovered (any priority), or
        delivered to a worker and not yet acknowledged (kombu's ``unacked`` hash).

        Read a page at a time, not atomically: a task moving from the queue to a worker while it
        is read may be missed, so a caller must see a job missing twice before acting on it."""
        found: set[str] = set()
        model_queue = queue_for(model)
        queues = [model_queue] + [worker_queue(model_queue, w)
                                  for w in sorted(routing_workers(self.redis, model_queue=model_queue))]
        names = [name for q in queues for _, name in priority_lists(q)]
        for name in names:
            start = 0
            while True:
                chunk = self.redis.lrange(name, start, start + page - 1)
                for raw in chunk:
                    found |= _task_job_ids(raw) & wanted
                if len(chunk) < page:
                    break
                start += page
        for _, raw in self.redis.hscan_iter(UNACKED_KEY, count=page):
            try:
                message = json.loads(raw)[0]
            except (ValueError, IndexError, TypeError):
                continue
            found |= _message_job_ids(message) & wanted
        return found

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
            self._probe.close()
        finally:
            self.celery.close()
