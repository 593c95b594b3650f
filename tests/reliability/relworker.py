"""Helpers of the worker half of the reliability suite (`test_worker_*.py`): submitting jobs the way
the API does (store first, then the task), waiting for them, and reading what the store holds.

Everything is real: a Redis database of the session's Redis, a throwaway PostgreSQL database, real
`tokenmill worker` processes on the CPU running a tiny random Llama.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

from sqlalchemy import func, select

from contract.celery_app import send_job
from contract.payload import job_payload
from store import Store
from store.models import Job, Result, Usage
from store.types import JobSpec

MODEL = "tiny"
FINAL = ("succeeded", "failed", "cancelled", "expired")


def greedy(max_tokens: int, **kw: Any) -> dict[str, Any]:
    """Sampling params that produce exactly ``max_tokens`` tokens."""
    return {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}


def token_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 1000) for _ in range(n)]


def payloads(rng: random.Random, n: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int],
             **request: Any) -> list[dict[str, Any]]:
    """``n`` job requests with random token prompts and forced output lengths."""
    out = []
    for _ in range(n):
        body = job_payload(prompt=token_prompt(rng, rng.randint(*prompt_len)),
                           params=greedy(rng.randint(*max_tokens)))
        out.append({**body, **request})
    return out


def create(store: Store, tenant_id: str, bodies: list[dict[str, Any]]) -> list[str]:
    """Stores the jobs (status ``queued``) without sending their tasks."""
    return [c.id for c in store.jobs.create_jobs(tenant_id, [JobSpec(model=MODEL, request=b) for b in bodies])]


def send(app: Any, ids: list[str]) -> None:
    for job_id in ids:
        send_job(app, job_id, MODEL)


def submit(store: Store, app: Any, tenant_id: str, bodies: list[dict[str, Any]]) -> list[str]:
    """As the API does: the jobs are stored, then their tasks sent."""
    ids = create(store, tenant_id, bodies)
    send(app, ids)
    return ids


def status_counts(store: Store, tenant_id: str) -> Counter:
    """How many of the tenant's jobs are in each status (one query)."""
    with store.db.read() as s:
        rows = s.execute(select(Job.status, func.count()).where(Job.tenant_id == tenant_id).group_by(Job.status))
        return Counter({status: int(n) for status, n in rows})


def wait_final(store: Store, tenant_id: str, total: int, timeout: float, *, during: Any = None) -> Counter:
    """Waits until all ``total`` jobs of the tenant are final; returns the counts by status.
    ``during()``, if given, runs at every poll (e.g. to restart a dead worker)."""
    deadline = time.monotonic() + timeout
    counts: Counter = Counter()
    while time.monotonic() < deadline:
        counts = status_counts(store, tenant_id)
        if sum(counts[s] for s in FINAL) >= total:
            return counts
        if during is not None:
            during()
        time.sleep(0.25)
    raise AssertionError(f"jobs not final after {timeout:.0f}s: {dict(counts)}")


def rows_per_job(store: Store, table: Any, ids: list[str]) -> Counter:
    """How many rows of ``table`` (Result or Usage) each job has."""
    with store.db.read() as s:
        rows = s.execute(select(table.job_id, func.count()).where(table.job_id.in_(ids)).group_by(table.job_id))
        return Counter({job_id: int(n) for job_id, n in rows})


def assert_each_stored_once(store: Store, ids: list[str], bodies: list[dict[str, Any]]) -> dict[str, Usage]:
    """Every job has exactly one result and one usage row, and its token counts are the ones its
    request forces (prompt length; max_tokens with ignore_eos). Returns the usage rows by job."""
    for table in (Result, Usage):
        per_job = rows_per_job(store, table, ids)
        missing = [i for i in ids if per_job[i] == 0]
        doubled = [i for i in ids if per_job[i] > 1]
        assert not missing and not doubled, f"{table.__name__}: {len(missing)} missing, {len(doubled)} doubled"
    with store.db.read() as s:
        usage = {u.job_id: u for u in s.scalars(select(Usage).where(Usage.job_id.in_(ids)))}
    wrong = [i for i, b in zip(ids, bodies)
             if (usage[i].prompt_tokens, usage[i].completion_tokens) != (len(b["prompt"]), b["params"]["max_tokens"])]
    assert not wrong, f"{len(wrong)} jobs with wrong token counts, e.g. {wrong[:3]}"
    total = sum(u.completion_tokens for u in usage.values())
    assert total == sum(b["params"]["max_tokens"] for b in bodies)
    return usage


def jobs_by_id(store: Store, ids: list[str]) -> dict[str, Job]:
    with store.db.read() as s:
        return {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}


def unacked(redis_client: Any) -> int:
    """Tasks delivered to a worker and not yet acknowledged (kombu's Redis transport)."""
    return int(redis_client.hlen("unacked"))
