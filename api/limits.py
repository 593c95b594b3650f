"""Per-tenant and per-key limits, enforced with counters in Redis that every API process shares.

What is counted, per scope (the tenant, and the key when the key has limits of its own):

- ``requests_per_minute``: requests in the current UTC minute.
- ``tokens_per_minute``: tokens reserved in the current minute (prompt + max_tokens of each job);
  what a finished job did not use is given back while that minute lasts.
- ``max_queued_jobs``: jobs submitted one by one that have not finished yet.
- ``max_batch_tokens``: tokens reserved by batch jobs that have not finished yet (OpenAI's
  "enqueued tokens").
- ``daily_tokens`` / ``monthly_tokens``: token budgets per UTC day / month, a hard stop. A job
  reserves prompt + max_tokens when it is admitted; when it finishes its reservation is replaced by
  what it spent (its usage row), so the counter ends equal to the SQL usage of the period.

Every admission is one Lua script: it checks every counter of both scopes and only then adds to
all of them, so two API processes can never both take the last of a budget; the overspend is
bounded by what one job reserves beyond what it spends, never more. A counter that Redis does not
hold (first use, a restart) is started from the store: the period's usage plus what open jobs
hold. Finished jobs are settled by `api.settler`, one process at a time, idempotently (a job's
reservation record is deleted by the settlement that uses it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import redis

from api.errors import ApiError
from store import Store
from store.types import Settlement

PREFIX = "tokenmill:limits"
RESERVATIONS = f"{PREFIX}:reservations"  # hash: job id -> [[counter key, amount, kind], ...]
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_queued_jobs", "max_batch_tokens",
                "daily_tokens", "monthly_tokens")
QUEUE_RETRY_S = 5  # a full queue drains as jobs finish: ask again soon

# KEYS: the counters, then the reservations hash. ARGV: m, then m pairs of job id and the tokens
# it reserves, then per counter: amount, limit, ttl (ms, 0: none), whether a missing counter must
# be started from the store first (1/0), how it is settled ("t": refund what was not spent, "h":
# release all, "-": never) and its unit ("n": jobs, "t": tokens).
# Returns {0, value...} (the counters after the add), {-i} (counter i must be started), or
# {i, value} (counter i would pass its limit; nothing was added).
_ADMIT = """
local n = #KEYS - 1
local m = tonumber(ARGV[1])
local first = 2 + 2 * m
local values = {}
for i = 1, n do
    local base = first + (i - 1) * 6
    local amount = tonumber(ARGV[base])
    local limit = tonumber(ARGV[base + 1])
    local raw = redis.call('get', KEYS[i])
    if raw == false and ARGV[base + 3] == '1' then
        return {-i}
    end
    local value = tonumber(raw or '0')
    if value + amount > limit then
        return {i, value}
    end
    values[i] = value + amount
end
local records = {}
for j = 1, m do records[j] = {} end
for i = 1, n do
    local base = first + (i - 1) * 6
    redis.call('incrby', KEYS[i], ARGV[base])
    local ttl = tonumber(ARGV[base + 2])
    if ttl > 0 and redis.call('pttl', KEYS[i]) < 0 then
        redis.call('pexpire', KEYS[i], ttl)
    end
    if ARGV[base + 4] ~= '-' then
        for j = 1, m do
            local amount = 1
            if ARGV[base + 5] == 't' then amount = tonumber(ARGV[1 + 2 * j]) end
            table.insert(records[j], {KEYS[i], amount, ARGV[base + 4]})
        end
    end
end
for j = 1, m do
    if #records[j] > 0 then
        redis.call('hset', KEYS[n + 1], ARGV[2 * j], cjson.encode(records[j]))
    end
end
local out = {0}
for i = 1, n do out[i + 1] = values[i] end
return out
"""

# KEYS[1]: the reservations hash. ARGV: pairs of job id and tokens spent. Each job's record is
# taken (deleted) and its counters given back: the unspent part of a token reservation, all of a
# hold. Counters Redis no longer holds are left alone (they restart from the store). Returns how
# many jobs were settled (a job settled before counts 0).
_SETTLE = """
local settled = 0
for j = 1, #ARGV, 2 do
    local raw = redis.call('hget', KEYS[1], ARGV[j])
    if raw then
        redis.call('hdel', KEYS[1], ARGV[j])
        settled = settled + 1
        local spent = tonumber(ARGV[j + 1])
        for _, entry in ipairs(cjson.decode(raw)) do
            local back = entry[2]
            if entry[3] == 't' then back = entry[2] - spent end
            if back ~= 0 and redis.call('exists', entry[1]) == 1 then
                redis.call('decrby', entry[1], back)
            end
        end
    end
end
return settled
"""


@dataclass(frozen=True)
class Scope:
    """Whose counters: a tenant, or one key of it, with its limits."""

    tenant_id: str
    key_id: str | None
    limits: dict[str, int]

    @property
    def tag(self) -> str:
        return f"k:{self.key_id}" if self.key_id else f"t:{self.tenant_id}"

    @property
    def who(self) -> str:
        return "this API key" if self.key_id else "your organization"


@dataclass(frozen=True)
class _Counter:
    key: str
    scope: Scope
    name: str
    amount: int
    limit: int
    ttl_ms: int
    from_store: bool
    settle: str  # "t", "h" or "-"
    retry_s: int


@dataclass
class Admission:
    """An admitted request: its reservation (tokens; None when no limit applied) and the
    ``x-ratelimit-*`` headers to answer with."""

    reserved_tokens: int | None
    headers: dict[str, str] = field(default_factory=dict)


def estimate_prompt_tokens(payload: dict[str, Any]) -> int:
    """An upper bound of a prompt's tokens when the model's tokenizer did not count them: its
    UTF-8 bytes (a token is at least one byte of text)."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list):
        return len(prompt)
    if isinstance(prompt, str):
        return len(prompt.encode())
    return len(json.dumps(payload.get("messages") or []).encode())


def reservation(payload: dict[str, Any], prompt_tokens: int | None, max_tokens: int) -> int:
    """What a job holds against token limits: its prompt plus every completion it may write."""
    n = int((payload.get("params") or {}).get("n") or 1)
    prompt = prompt_tokens if prompt_tokens is not None else estimate_prompt_tokens(payload)
    return prompt + n * max_tokens


def _reset(seconds: float) -> str:
    """OpenAI's reset duration format: ``1s``, ``6m0s``, ``2h3m4s``."""
    s = max(0, math.ceil(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{sec}s"


def _next_month(day: date) -> datetime:
    first = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
    return datetime(first.year, first.month, 1, tzinfo=UTC)


class Limiter:
    """Admits requests against the limits of their tenant and key, and settles finished jobs."""

    def __init__(self, client: redis.Redis, store: Store, *, budget_status: int = 429) -> None:
        if budget_status not in (402, 429):
            raise ValueError(f"the budget status must be 402 or 429, got {budget_status}")
        self._redis = client
        self._store = store
        self._budget_status = budget_status
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)

    # -- admission -------------------------------------------------------------------------------
    def admit(self, scopes: list[Scope], jobs: list[tuple[str, int]], *, bulk: bool = False,
              now: float | None = None) -> Admission:
        """Counts a submission of ``jobs`` (job id, tokens it reserves: one for a request, a
        batch's jobs for a batch) against every scope's limits, or raises the 429 (402 for a
        budget, if so configured) of the first limit it would pass, having counted nothing. Each
        job's reservation is recorded under its id for the settlement."""
        scopes = [s for s in scopes if s.limits]
        tokens = sum(t for _, t in jobs)
        if not scopes:
            return Admission(None)
        now = time.time() if now is None else now
        counters = [c for s in scopes for c in self._counters(s, tokens, bulk, len(jobs), now)]
        if not counters:
            return Admission(tokens)
        args: list[Any] = [len(jobs)]
        for job_id, t in jobs:
            args += [job_id, t]
        for c in counters:
            args += [c.amount, c.limit, c.ttl_ms, int(c.from_store), c.settle,
                     "n" if c.name in ("requests_per_minute", "max_queued_jobs") else "t"]
        for _ in range(len(counters) + 1):
            out = self._admit(keys=[c.key for c in counters] + [RESERVATIONS], args=args)
            status = int(out[0])
            if status == 0:
                return Admission(tokens, self._headers(counters, [int(v) for v in out[1:]], now))
            if status < 0:
                self._start(counters[-status - 1], now)
                continue
            raise self._refusal(counters, counters[status - 1], int(out[1]), now)
        raise RuntimeError("limit counters could not be started")

    def release(self, job_ids: list[str]) -> None:
        """Gives back everything jobs reserved (they were not stored, or were duplicates)."""
        args: list[Any] = []
        for job_id in job_ids:
            args += [job_id, 0]
        if args:
            self._settle(keys=[RESERVATIONS], args=args)

    def settle(self, settlements: list[Settlement]) -> int:
        """Replaces finished jobs' reservations by what they spent; returns how many were settled
        now (a job settled before is skipped)."""
        done = 0
        for start in range(0, len(settlements), 500):
            args: list[Any] = []
            for s in settlements[start:start + 500]:
                args += [s.job_id, s.spent_tokens]
            done += int(self._settle(keys=[RESERVATIONS], args=args))
        return done

    def counter_value(self, scope: Scope, name: str, now: float | None = None) -> int | None:
        """The live value of one of the scope's counters (None: Redis does not hold it)."""
        now = time.time() if now is None else now
        raw = self._redis.get(self._key(scope, name, now))
        return None if raw is None else int(raw)

    # -- counters --------------------------------------------------------------------------------
    def _key(self, scope: Scope, name: str, now: float) -> str:
        when = datetime.fromtimestamp(now, UTC)
        suffix = {"requests_per_minute": f"rpm:{int(now // 60)}", "tokens_per_minute": f"tpm:{int(now // 60)}",
                  "max_queued_jobs": "open", "max_batch_tokens": "batch",
                  "daily_tokens": f"day:{when:%Y%m%d}", "monthly_tokens": f"month:{when:%Y%m}"}[name]
        return f"{PREFIX}:{scope.tag}:{suffix}"

    def _counters(self, scope: Scope, tokens: int, bulk: bool, requests: int, now: float) -> list[_Counter]:
        when = datetime.fromtimestamp(now, UTC)
        minute_left = 60 - now % 60
        day_left = (datetime(when.year, when.month, when.day, tzinfo=UTC) + timedelta(days=1) - when).total_seconds()
        month_left = (_next_month(when.date()) - when).total_seconds()
        plan = {
            # name: (amount, ttl_s, from_store, settle, retry_s)
            "requests_per_minute": (requests, 120, False, "-", minute_left),
            "tokens_per_minute": (tokens, 120, False, "t", minute_left),
            "max_queued_jobs": (requests, 0, True, "h", QUEUE_RETRY_S),
            "max_batch_tokens": (tokens, 0, True, "h", QUEUE_RETRY_S),
            "daily_tokens": (tokens, day_left + 86_400, True, "t", day_left),
            "monthly_tokens": (tokens, month_left + 86_400, True, "t", month_left),
        }
        out = []
        for name, limit in scope.limits.items():
            if name not in plan or limit is None:
                continue
            # A batch counts against its own queue limit and the budgets; the per-minute rates and
            # the queued-jobs limit are for requests sent one by one (as in OpenAI's Batch API).
            if bulk != (name == "max_batch_tokens") and name != "daily_tokens" and name != "monthly_tokens":
                continue
            amount, ttl_s, from_store, settle, retry_s = plan[name]
            out.append(_Counter(self._key(scope, name, now), scope, name, int(amount), int(limit),
                                int(ttl_s * 1000), from_store, settle, max(1, math.ceil(retry_s))))
        return out

    def _start(self, counter: _Counter, now: float) -> None:
        """Starts a counter Redis does not hold from the store (SET NX: the first process wins)."""
        scope, limits = counter.scope, self._store.limits
        key_id = scope.key_id
        when = datetime.fromtimestamp(now, UTC).date()
        if counter.name == "max_queued_jobs":
            value = limits.open_jobs(scope.tenant_id, api_key_id=key_id)
        elif counter.name == "max_batch_tokens":
            value = limits.held_tokens(scope.tenant_id, api_key_id=key_id, bulk=True)
        else:
            since = when if counter.name == "daily_tokens" else when.replace(day=1)
            value = (limits.spent_tokens(scope.tenant_id, since=since, api_key_id=key_id)
                     + limits.held_tokens(scope.tenant_id, api_key_id=key_id))
        self._redis.set(counter.key, value, nx=True, px=counter.ttl_ms or None)

    def _headers(self, counters: list[_Counter], values: list[int], now: float) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers, from the tightest per-minute counters."""
        headers: dict[str, str] = {}
        for name, what in (("requests_per_minute", "requests"), ("tokens_per_minute", "tokens")):
            pairs = [(c, v) for c, v in zip(counters, values) if c.name == name]
            if not pairs:
                continue
            c, v = min(pairs, key=lambda p: p[0].limit - p[1])
            headers[f"x-ratelimit-limit-{what}"] = str(c.limit)
            headers[f"x-ratelimit-remaining-{what}"] = str(max(0, c.limit - v))
            headers[f"x-ratelimit-reset-{what}"] = _reset(60 - now % 60)
        return headers

    def _refusal(self, counters: list[_Counter], c: _Counter, value: int, now: float) -> ApiError:
        headers = {"Retry-After": str(c.retry_s)}
        if c.name in ("requests_per_minute", "tokens_per_minute"):
            headers.update(self._headers([c], [value], now))
        if c.name == "requests_per_minute":
            return ApiError(429, f"rate limit reached for {c.scope.who}: {c.limit} requests per minute; retry in "
                                 f"{c.retry_s} s", code="rate_limit_exceeded", headers=headers)
        if c.name == "tokens_per_minute":
            return ApiError(429, f"rate limit reached for {c.scope.who}: {c.limit} tokens per minute (used {value}, "
                                 f"this request needs {c.amount}: prompt plus max_tokens); retry in {c.retry_s} s",
                            code="rate_limit_exceeded", headers=headers)
        if c.name == "max_queued_jobs":
            return ApiError(429, f"{c.scope.who} has {value} unfinished jobs, the most it may have "
                                 f"({c.limit}); retry when some finish", code="queue_limit_exceeded",
                            headers=headers)
        if c.name == "max_batch_tokens":
            return ApiError(429, f"enqueued token limit reached for {c.scope.who}: {value} tokens held by "
                                 f"unfinished batch jobs, this batch needs {c.amount}, the limit is {c.limit}",
                            code="token_limit_exceeded", headers=headers)
        period = "daily" if c.name == "daily_tokens" else "monthly"
        return ApiError(self._budget_status,
                        f"{period} token budget of {c.scope.who} exhausted: {value} of {c.limit} tokens used or "
                        f"held, this request needs {c.amount} (prompt plus max_tokens); it renews in "
                        f"{_reset(c.retry_s)}", code="insufficient_quota", headers=headers)


def scopes_of(tenant_id: str, key_id: str | None, tenant_limits: dict[str, Any] | None,
              key_limits: dict[str, Any] | None) -> list[Scope]:
    """The scopes a caller's request counts against: its tenant's, and its key's if it has any."""
    out = []
    if tenant_limits:
        out.append(Scope(tenant_id, None, {k: int(v) for k, v in tenant_limits.items() if v is not None}))
    if key_limits and key_id:
        out.append(Scope(tenant_id, key_id, {k: int(v) for k, v in key_limits.items() if v is not None}))
    return out
