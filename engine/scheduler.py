"""The scheduler: which requests run in the next step, and how many of their tokens.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running requests come first, in priority order (lower number first; inside a priority, fair
queueing between tenants by weight, then arrival), each taking what it still needs: one token for
a decode, or the next chunk of a long prompt. Waiting requests are then admitted in the same order
while budget, sequence slots and KV blocks last; a waiting request of a better priority step than
a running one that finds no slot or block takes the place of the newest running request of the
worst step. When a running request cannot get a block, the newest request of the lowest priority
(of the tenant most ahead of its share) is preempted. A preempted request's blocks are freed and
it is recomputed later from its tokens (which the prefix cache often still holds).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """One step's work: requests with how many of their tokens to compute now."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    by_priority: dict[int, int] = field(default_factory=dict)  # tokens per priority step

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def add(self, request: Request, n: int) -> None:
        self.requests.append(request)
        self.num_tokens.append(n)
        self.by_priority[request.priority] = self.by_priority.get(request.priority, 0) + n

    def drop(self, request: Request) -> None:
        """Takes a request out of the step again (preempted before the step ran)."""
        for i, r in enumerate(self.requests):
            if r is request:
                self.by_priority[r.priority] -= self.num_tokens[i]
                if not self.by_priority[r.priority]:
                    del self.by_priority[r.priority]
                del self.requests[i], self.num_tokens[i]
                return

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    """Continuous batching with chunked prefill, priorities and preemption by recomputation."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 priority_yield: float | None = None) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # In a step with requests of a better priority step, the worse steps get at most this many
        # tokens per token of the best step's (None: no limit); see `EngineConfig.priority_yield`.
        self.priority_yield = priority_yield
        self.waiting: list[tuple[tuple[int, float, float, int], Request]] = []  # sorted by key
        self.running: list[Request] = []
        self._order = itertools.count()
        self._keys: dict[int, tuple[int, float, float, int]] = {}
        self.num_preemptions = 0
        # Start-time fair queueing between tenants: each request gets a virtual start tag, the
        # later of the system's virtual time and its tenant's previous finish tag; its finish tag
        # adds its cost (prompt + max_tokens) divided by the tenant's weight. Waiting requests of a
        # priority are served in start-tag order, so tenants with work share the engine in
        # proportion to their weights, and one that was idle starts at the current virtual time
        # (it hoards no credit). The virtual time is the latest start tag admitted.
        self._vtime = 0.0
        self._finish: dict[str, float] = {}

    def _key(self, request: Request) -> tuple[int, float, float, int]:
        key = self._keys.get(id(request))
        if key is None:
            start = 0.0
            if request.tenant is not None:
                start = max(self._vtime, self._finish.get(request.tenant, 0.0))
                cost = len(request.prompt_token_ids) + request.params.max_tokens
                self._finish[request.tenant] = start + cost / request.weight
            key = (request.priority, start, request.arrival_time, next(self._order))
            self._keys[id(request)] = key
        return key

    # -- membership --------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queues a new (or preempted) request."""
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, (self._key(request), request), key=lambda e: e[0])

    def remove(self, request: Request) -> None:
        """Takes a request out (finished or aborted) and frees its blocks."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting = [e for e in self.waiting if e[1] is not request]
        self.kv.free(request)
        self._keys.pop(id(request), None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        """Picks this step's work. Allocates the blocks it needs; never exceeds budget or caps."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        self.running.sort(key=self._key)
        scheduled: set[int] = set()

        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(request.num_uncomputed_tokens, budget, self._allowance(batch, request))
            if n == 0:
                continue
            while not self.kv.allocate(request, n):
                victim = self._pick_victim(exclude=scheduled)
                self._preempt(victim, batch)
                if victim is request:
                    break
            else:
                batch.add(request, n)
                scheduled.add(id(request))
                budget -= n

        # New work joins only when nothing had to be preempted (admitting it now would just push
        # the preempted ones out again) and while sequence slots last, unless it is of a better
        # priority step than some running request: then it takes the place of the newest request
        # of the worst step (`_displace`), so interactive work gets in at the next step instead of
        # waiting for a bulk request to finish. The n - 1 other completions of a prompt wait until
        # the first has computed it: then the prefix cache hands them its blocks (no n-fold
        # prefill); only the prompt's last, partial block is theirs to compute.
        tight = bool(batch.preempted)
        made_room_for: Request | None = None
        at = 0
        while at < len(self.waiting) and budget > 0:
            request = self.waiting[at][1]
            if self.kv.enable_prefix_caching and request.waits_for_leader:
                at += 1
                continue
            if (tight or len(self.running) >= self.max_num_seqs) and made_room_for is not request:
                if not self._displace(request, batch):
                    break
                budget = self.max_num_batched_tokens - batch.total_tokens
                made_room_for = request
                continue
            allowance = self._allowance(batch, request)
            if allowance == 0:
                break  # the rest wait behind better work (the waiting list is in priority order)
            cached = self.kv.find_cached_prefix(request)
            num_cached = len(cached) * self.kv.block_size
            n = min(request.num_tokens - num_cached, budget, allowance)
            if not self.kv.allocate(request, n, cached):
                if not self._displace(request, batch):
                    break
                budget = self.max_num_batched_tokens - batch.total_tokens
                made_room_for = request
                continue
            self.waiting.pop(at)
            self._vtime = max(self._vtime, self._key(request)[1])
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.add(request, n)
            budget -= n
        return batch

    def _allowance(self, batch: ScheduledBatch, request: Request) -> int:
        """The most tokens ``request`` may still take in this step under `priority_yield`: with
        requests of a better priority step in the batch, the worse steps together get at most
        `priority_yield` tokens per token of the best step's (at least one)."""
        if self.priority_yield is None or not batch.by_priority:
            return self.max_num_batched_tokens
        best = min(batch.by_priority)
        if request.priority <= best:
            return self.max_num_batched_tokens
        best_tokens = batch.by_priority[best]
        worse_tokens = sum(batch.by_priority.values()) - best_tokens
        return max(0, math.ceil(best_tokens * self.priority_yield) - worse_tokens)

    def _displace(self, request: Request, batch: ScheduledBatch) -> bool:
        """Makes room for a waiting request by preempting the newest running request of the
        worst priority step, if that step is worse than the request's (between tenants, the one
        furthest ahead of its share). The victim leaves this step's batch if it was in it.
        Returns whether a request was preempted."""
        worse = [r for r in self.running if r.priority > request.priority]
        if not worse:
            return False
        victim = max(worse, key=self._key)
        batch.drop(victim)
        self._preempt(victim, batch)
        return True

    def _pick_victim(self, exclude: set[int]) -> Request:
        """The newest request of the lowest priority, preferring ones not yet scheduled; between
        tenants, one of the tenant furthest ahead in virtual time (the most over its share)."""
        candidates = [r for r in self.running if id(r) not in exclude] or self.running
        return max(candidates, key=self._key)

    def _preempt(self, request: Request, batch: ScheduledBatch) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(request)
        self.add(request)

    def after_step(self, batch: ScheduledBatch) -> None:
        """Advances the computed-token counts of the step's requests and caches full blocks."""
        for request, n in zip(batch.requests, batch.num_tokens):
            request.num_computed_tokens += n
            self.kv.cache_full_blocks(request)
