"""The API's side of prefix-aware routing (`contract.prefix_routing`, docs/routing.md): for a group
of jobs about to be sent, which queue each goes to, the model's shared queue or a live worker's own.

Three Redis round trips per group, whatever its size: the routing workers and the index entries of
every job's prefixes; the heartbeats and waiting tasks of the model's routing workers; the index
entries of the jobs routed (pointing at the worker chosen, so that the next job with that prefix
follows before the worker has even run it). Any Redis failure sends the group to the shared queues:
routing is an optimisation, never a condition of delivery.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from contract.liveness import live_instances
from contract.prefix_routing import (PREFIX_TTL_S, ROUTE_WORKER_STALE_S, ROUTE_WORKERS_KEY, choose, parse_route_worker,
                                     prefix_hashes, prefix_key, prompt_text)
from contract.queues import priority_lists, queue_for, worker_queue

log = logging.getLogger(__name__)


def routing_workers(client: redis.Redis, *, model_queue: str | None = None,
                    fresh_s: float | None = None) -> dict[str, str]:
    """Routing workers (instance -> model queue), of one model queue if given; with ``fresh_s``,
    only those heard from within that many seconds."""
    out: dict[str, str] = {}
    now = time.time()
    for instance, raw in client.hgetall(ROUTE_WORKERS_KEY).items():
        parsed = parse_route_worker(raw)
        if parsed is None:
            continue
        queue, seen, _ = parsed
        if (model_queue is None or queue == model_queue) and (fresh_s is None or now - seen <= fresh_s):
            out[instance.decode()] = queue
    return out


class PrefixRouter:
    """Chooses the queue of each job of a group (None: the model's shared queue)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def queues(self, models: Sequence[str], requests: Sequence[Mapping[str, Any] | None]) -> list[str | None]:
        try:
            return self._queues(models, requests)
        except redis.RedisError as e:
            log.warning("prefix routing skipped (Redis: %r): the jobs go to their shared queues", e)
            return [None] * len(models)

    def _queues(self, models: Sequence[str], requests: Sequence[Mapping[str, Any] | None]) -> list[str | None]:
        out: list[str | None] = [None] * len(models)
        hashes = [prefix_hashes(prompt_text(r)) if r else [] for r in requests]
        todo = [i for i, h in enumerate(hashes) if h]
        if not todo:
            return out
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(ROUTE_WORKERS_KEY)
        for i in todo:
            pipe.mget([prefix_key(queue_for(models[i]), h) for h in hashes[i]])
        first = pipe.execute()
        workers: dict[str, list[str]] = defaultdict(list)  # model queue -> instances heard from lately
        now = time.time()
        for instance, raw in first[0].items():
            parsed = parse_route_worker(raw)
            if parsed is not None and parsed[2] and now - parsed[1] <= ROUTE_WORKER_STALE_S:
                workers[parsed[0]].append(instance.decode())
        owners = {i: [o.decode() if o is not None else None for o in found] for i, found in zip(todo, first[1:])}
        candidates = sorted({w for i in todo for w in workers.get(queue_for(models[i]), [])})
        if not candidates:
            return out
        # Which of them live, and how many tasks wait in each one's own queue.
        alive = live_instances(self._redis, set(candidates))
        model_of = {w: q for q, ws in workers.items() for w in ws}
        pipe = self._redis.pipeline(transaction=False)
        for w in candidates:
            for _, name in priority_lists(worker_queue(model_of[w], w)):
                pipe.llen(name)
        lengths = pipe.execute()
        steps = len(priority_lists(""))
        waiting: dict[str, dict[str, int]] = defaultdict(dict)  # model queue -> live instance -> waiting
        for k, w in enumerate(candidates):
            if w in alive:
                waiting[model_of[w]][w] = sum(lengths[k * steps:(k + 1) * steps])
        pipe = self._redis.pipeline(transaction=False)
        assigned: dict[str, str] = {}  # index entries written for this group's earlier jobs
        for i in todo:
            model_queue = queue_for(models[i])
            keys = [prefix_key(model_queue, h) for h in hashes[i]]
            chosen = choose([assigned.get(k, o) for k, o in zip(keys, owners[i])], waiting.get(model_queue, {}))
            if chosen is None:
                continue
            out[i] = worker_queue(model_queue, chosen)
            waiting[model_queue][chosen] += 1  # the next jobs of the group see it
            for k in keys:
                assigned[k] = chosen
                pipe.set(k, chosen, ex=PREFIX_TTL_S)
        pipe.execute()
        return out
