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
   message back: of several recoverers exactly one pushes it, the others find it gone. A task is
   recorded as delivered in the same step that takes it from its queue (`contract.redis_delivery`),
   so this covers one that Redis was handing over when the instance died.

3. the tasks waiting in its own queue (prefix routing, `workers.prefix_index`) move to the shared
   model queue, in one script (atomic). This is done again on every pass until the instance has
   been silent for `ROUTE_FORGET_S` (a task routed to it in the moment it died, or restored to its
   queue by step 2, still moves), then it is forgotten.

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

from contract.liveness import dead_holders, live_instances
from contract.prefix_routing import ROUTE_WORKERS_KEY, parse_route_worker
from contract.redis_keys import HEARTBEAT_INTERVAL_S
from store import Store
from workers.prefix_index import drain_worker_queue

log = logging.getLogger(__name__)

RECOVERY_INTERVAL_S = 1.0
# A heartbeat missing this long after it was first seen missing: longer than a live worker takes to
# renew its own (an interval, plus a renewal that timed out) once a paused Redis resumes.
CONFIRM_S = 3.0 * HEARTBEAT_INTERVAL_S
# A dead routing worker's queue is emptied into the shared one on every pass for this long after it
# was last heard from, then its entry is deleted.
ROUTE_FORGET_S = 60.0


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
        self.recovered: dict[str, int] = {"instances": 0, "jobs": 0, "tasks": 0, "routed": 0}

    def start(self) -> "Recoverer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def tick(self) -> dict[str, Any]:
        """One pass; returns what it did."""
        done: dict[str, Any] = {"instances": [], "jobs": 0, "tasks": 0, "routed": 0}
        if self._own_lapsed():
            self._missing_since.clear()  # what was seen while cut off proves nothing
            return done
        dead = dead_holders(self._redis)
        routed = self._dead_routing_workers()
        now = time.monotonic()
        self._missing_since = {i: self._missing_since.get(i, now) for i in set(dead) | set(routed)}
        confirmed = {i for i, since in self._missing_since.items() if now - since >= self.confirm_s}
        for instance, tags in dead.items():
            if instance not in confirmed:
                continue
            jobs = self._store.jobs.requeue_lost(instance)
            for tag in tags:
                self._restore_tag(tag)
            done["instances"].append(instance)
            done["jobs"] += len(jobs)
            done["tasks"] += len(tags)
            log.warning("worker instance %s is gone (no heartbeat): %d job(s) back to queued, %d task(s) "
                        "back in the queue", instance, len(jobs), len(tags))
        for instance, (queue, seen) in routed.items():
            if instance not in confirmed:
                continue
            moved = drain_worker_queue(self._redis, queue, instance)
            done["routed"] += moved
            if moved:
                log.warning("worker instance %s is gone (no heartbeat): %d routed task(s) moved to the shared "
                            "queue %s", instance, moved, queue)
            if time.time() - seen > ROUTE_FORGET_S:
                self._redis.hdel(ROUTE_WORKERS_KEY, instance)
        for instance in confirmed - set(routed):  # a routing worker's queue is looked at on every pass
            self._missing_since.pop(instance, None)
        self.recovered["instances"] += len(done["instances"])
        self.recovered["jobs"] += done["jobs"]
        self.recovered["tasks"] += done["tasks"]
        self.recovered["routed"] += done["routed"]
        return done

    def _dead_routing_workers(self) -> dict[str, tuple[str, float]]:
        """The routing workers (`workers.prefix_index`) whose heartbeat is gone: (model queue, last seen)."""
        entries = {}
        for instance, raw in self._redis.hgetall(ROUTE_WORKERS_KEY).items():
            parsed = parse_route_worker(raw)
            if parsed is not None:
                entries[instance.decode()] = parsed[:2]
        alive = live_instances(self._redis, set(entries))
        return {i: e for i, e in entries.items() if i not in alive}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - Redis or the store away: the next pass retries
                log.warning("recovery pass failed: %r", e)


def kombu_restorer(app: Any) -> Callable[[str], None]:
    """Restores one delivery tag with kombu's own transaction (the same message, back at the front
    of its queue and priority: kombu sends with LPUSH and consumers take from the right end
    (`contract.redis_delivery`, as BRPOP would), so the front is the right end, where kombu's own
    visibility-timeout restore puts messages too; the restore rings the queue's bell)."""

    def restore(tag: str) -> None:
        with app.connection_for_write() as conn:
            conn.default_channel.qos.restore_by_tag(tag, leftmost=False)

    return restore
