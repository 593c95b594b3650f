"""A worker's side of prefix-aware routing (`contract.prefix_routing`, docs/routing.md): it says
that it consumes a queue of its own, publishes the prefixes of the prompts it runs, and moves the
waiting tasks of a worker queue back to the shared model queue when that worker is gone."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis

from contract.prefix_routing import (PREFIX_TTL_S, ROUTE_WORKERS_KEY, prefix_hashes, prefix_key, prompt_text,
                                     route_worker_entry)
from contract.queues import priority_lists, worker_queue
from contract.redis_delivery import RING_LUA, bell_key

log = logging.getLogger(__name__)

REGISTER_INTERVAL_S = 1.0

# Moves every waiting message of a worker queue's priority lists to the same priority list of the
# shared queue, in one script (atomic: of several recoverers, one moves them, the others find the
# lists empty). KEYS: the worker queue's lists, then the shared queue's, in the same order, then
# the shared queue's bell (rung when anything moved: idle workers wait on it). The oldest message
# (the right end, where kombu consumes) ends up at the shared list's right end, in front of the
# shared queue's own waiting tasks: it has waited longer.
_DRAIN = """
local n = (#KEYS - 1) / 2
local moved = 0
for i = 1, n do
    while true do
        local m = redis.call('lpop', KEYS[i])
        if not m then break end
        redis.call('rpush', KEYS[n + i], m)
        moved = moved + 1
    end
end
if moved > 0 then
    """ + RING_LUA.format(bell="KEYS[#KEYS]") + """
end
return moved
"""


def drain_worker_queue(client: redis.Redis, model_queue: str, instance: str) -> int:
    """Moves the tasks waiting in ``instance``'s own queue to the shared ``model_queue``; returns
    how many moved."""
    own = [name for _, name in priority_lists(worker_queue(model_queue, instance))]
    shared = [name for _, name in priority_lists(model_queue)]
    return int(client.eval(_DRAIN, len(own) + len(shared) + 1, *own, *shared, bell_key(model_queue)))


class PrefixPublisher:
    """Registers this worker as a routing target (every second, from a thread of its own) and
    publishes the prefix hashes of the prompts it runs, pointing at itself."""

    def __init__(self, redis_url: str, model_queue: str, instance: str) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.model_queue = model_queue
        self.instance = instance
        self.queue = worker_queue(model_queue, instance)
        self._withdrawn = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="route-register", daemon=True)

    def start(self) -> "PrefixPublisher":
        self.register()
        self._thread.start()
        return self

    def register(self) -> None:
        try:
            self._redis.hset(ROUTE_WORKERS_KEY, self.instance,
                             route_worker_entry(self.model_queue, time.time(), accepting=not self._withdrawn))
        except redis.RedisError as e:  # routing is best effort: the shared queue always works
            log.warning("could not register for prefix routing: %r", e)

    def publish(self, request: Mapping[str, Any]) -> None:
        """Points the index at this worker for every full chunk of the request's prompt."""
        hashes = prefix_hashes(prompt_text(request))
        if not hashes:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for h in hashes:
                pipe.set(prefix_key(self.model_queue, h), self.instance, ex=PREFIX_TTL_S)
            pipe.execute()
        except redis.RedisError as e:
            log.warning("could not publish prompt prefixes: %r", e)

    def withdraw(self) -> None:
        """The worker is stopping (SIGTERM): the API routes nothing more to it, and what waits in
        its own queue goes to the shared one now, for the other workers to run meanwhile."""
        self._withdrawn = True
        self.register()
        try:
            moved = drain_worker_queue(self._redis, self.model_queue, self.instance)
            if moved:
                log.info("stopping: %d routed task(s) handed to the shared queue %s", moved, self.model_queue)
        except redis.RedisError as e:
            log.warning("could not hand routed tasks back (done again on the way out): %r", e)

    def stop(self) -> None:
        """Stops registering and hands its waiting routed tasks to the shared
        queue (the recovery of the other workers does the same if this process dies instead)."""
        self._stop.set()
        try:
            # Its entry stays: the recovery of the workers that live on moves what still arrives
            # (a task the API routed a moment ago) once the heartbeat is gone, then forgets it.
            moved = drain_worker_queue(self._redis, self.model_queue, self.instance)
            if moved:
                log.info("%d routed task(s) handed to the shared queue %s", moved, self.model_queue)
        except redis.RedisError as e:
            log.warning("could not hand routed tasks back (the other workers' recovery will): %r", e)

    def _run(self) -> None:
        while not self._stop.wait(REGISTER_INTERVAL_S):
            self.register()
