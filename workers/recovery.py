"""The recovery loop: every live worker puts the tasks of dead worker processes back in the queue,
seconds after their heartbeat stops, instead of after the visibility timeout.

Each pass (every second) reads which worker instance holds each delivered, unacknowledged task
(`contract.liveness.dead_holders`). An instance whose heartbeat is gone on passes at least
``confirm_s`` apart (3 s) is dead (a Redis that was paused expires every heartbeat at once when it
resumes; live workers renew theirs within a second, so one missing look proves nothing). For each
dead instance, in this order:

1. the store puts its ``running`` jobs back to ``queued`` (`store.jobs.requeue_lost`, conditional
   on the job still being claimed by that instance: several recoverers change each job once);
2. each of its deliveries is restored to the front of its queue by kombu's own restore, a Redis
   transaction that removes it from the ``unacked`` hash (and its owner entry) and pushes the same
   message back: of several recoverers exactly one pushes it, the others find it gone.

A recoverer that dies between the two steps leaves the deliveries owned by the dead instance, so
the next pass (of any worker) finishes the job. A recoverer that cannot renew its own heartbeat
does nothing: its view of Redis is not to be trusted.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import redis

from contract.liveness import dead_holders
from contract.redis_keys import HEARTBEAT_INTERVAL_S
from store import Store

log = logging.getLogger(__name__)

RECOVERY_INTERVAL_S = 1.0
# A heartbeat missing this long after it was first seen missing: longer than a live worker takes to
# renew its own (an interval, plus a renewal that timed out) once a paused Redis resumes.
CONFIRM_S = 3.0 * HEARTBEAT_INTERVAL_S


class Recoverer:
    """Restores the tasks and jobs of dead worker instances (one thread per worker process)."""

    def __init__(self, redis_url: str, store: Store, restore_tag: Callable[[str], None], *,
                 own_lapsed: Callable[[], bool] = lambda: False, interval_s: float = RECOVERY_INTERVAL_S,
                 confirm_s: float = CONFIRM_S) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._store = store
        self._restore_tag = restore_tag
        self._own_lapsed = own_lapsed
        self.interval_s = interval_s
        self.confirm_s = confirm_s
        self._missing_since: dict[str, float] = {}  # instance -> when first seen without a heartbeat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recovery", daemon=True)
        self.recovered: dict[str, int] = {"instances": 0, "jobs": 0, "tasks": 0}

    def start(self) -> "Recoverer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def tick(self) -> dict[str, Any]:
        """One pass; returns what it did."""
        done: dict[str, Any] = {"instances": [], "jobs": 0, "tasks": 0}
        if self._own_lapsed():
            self._missing_since.clear()  # what was seen while cut off proves nothing
            return done
        dead = dead_holders(self._redis)
        now = time.monotonic()
        self._missing_since = {i: self._missing_since.get(i, now) for i in dead}
        for instance, tags in dead.items():
            if now - self._missing_since[instance] < self.confirm_s:
                continue
            jobs = self._store.jobs.requeue_lost(instance)
            for tag in tags:
                self._restore_tag(tag)
            done["instances"].append(instance)
            done["jobs"] += len(jobs)
            done["tasks"] += len(tags)
            self._missing_since.pop(instance, None)
            log.warning("worker instance %s is gone (no heartbeat): %d job(s) back to queued, %d task(s) "
                        "back in the queue", instance, len(jobs), len(tags))
        self.recovered["instances"] += len(done["instances"])
        self.recovered["jobs"] += done["jobs"]
        self.recovered["tasks"] += done["tasks"]
        return done

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - Redis or the store away: the next pass retries
                log.warning("recovery pass failed: %r", e)


def kombu_restorer(app: Any) -> Callable[[str], None]:
    """Restores one delivery tag with kombu's own transaction (the same message, back at the front
    of its queue and priority: kombu sends with LPUSH and consumes with BRPOP, so the front is the
    right end, where its own visibility-timeout restore puts messages too)."""

    def restore(tag: str) -> None:
        with app.connection_for_write() as conn:
            conn.default_channel.qos.restore_by_tag(tag, leftmost=False)

    return restore
