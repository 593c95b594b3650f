"""Overload: clients submit interactive jobs far faster than the worker runs them, for a while
(`TOKENMILL_TEST_OVERLOAD_S`, 20 s by default; docs/reliability.md quotes a 60 s run).

Jobs beyond the queue limit are refused with 429 and Retry-After, never with a 5xx; the API
process's memory (RSS) and Redis's (INFO used_memory) stay under fixed caps however long it lasts;
and every job that was accepted (202) runs to `succeeded` once the load stops. A private Redis, so
that its memory figure is this test's alone; a real worker and API process on the tiny model.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from api_fixtures import (  # noqa: F401 - fixtures
    TINY,
    private_redis,
    relapi_database_url,
    relapi_model_dir,
    relapi_store,
    relapi_tenant,
    rss_bytes,
    start_api,
    start_worker,
)
from store import Store

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

DURATION_S = float(os.environ.get("TOKENMILL_TEST_OVERLOAD_S", "20"))
QUEUE_LIMIT = 100
CLIENTS = 24  # concurrent submitters, each posting as fast as the API answers
API_RSS_GROWTH_CAP = 64 * 2**20  # over the API's RSS once warmed up
REDIS_MEMORY_CAP = 16 * 2**20  # INFO used_memory, absolute


async def _load(url: str, key: str, duration_s: float, accepted: list[str], statuses: Counter,
                retry_after_missing: list[int]) -> None:
    end = time.monotonic() + duration_s
    body = {"model": TINY, "prompt": "hi", "params": {"max_tokens": 1}}
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                                 limits=limits) as client:

        async def one_client() -> None:
            while time.monotonic() < end:
                r = await client.post("/v1/jobs", json=body)
                statuses[r.status_code] += 1
                if r.status_code == 202:
                    accepted.append(r.json()["id"])
                elif r.status_code == 429:
                    if int(r.headers.get("retry-after", "0")) <= 0:
                        retry_after_missing.append(r.status_code)
                    await asyncio.sleep(0.05)  # a polite client backs off a little (not Retry-After's 2 s)

        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))


def test_overload_is_429_with_bounded_memory_and_every_accepted_job_runs(
        private_redis, relapi_database_url: str, relapi_model_dir: Path, relapi_store: Store,  # noqa: F811
        relapi_tenant: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    tenant_id, key = relapi_tenant
    worker, hostname = start_worker(redis_url=private_redis.url, database_url=relapi_database_url,
                                    model_dir=relapi_model_dir, log_dir=tmp_path, concurrency=8)
    api = None
    try:
        api = start_api(redis_url=private_redis.url, database_url=relapi_database_url, model_dir=relapi_model_dir,
                        log_dir=tmp_path, queue_limit=str(QUEUE_LIMIT),
                        # The reconciler looks at every job that waited over a second, twice a
                        # second: under this churn it must find each one's task, and send nothing.
                        reconcile_interval_s="0.5", reconcile_min_age_s="1")
        with api.client(key) as c:  # warm up: imports, pools, the tokenizer
            for _ in range(20):
                assert c.post("/v1/jobs", json={"model": TINY, "prompt": "hi", "params": {"max_tokens": 1}}
                              ).status_code == 202
        time.sleep(1.0)
        rss_base = rss_bytes(api.proc.pid)
        redis_base = private_redis.used_memory()
        samples: list[tuple[float, int, int, int]] = []  # (t, API RSS, Redis used_memory, queue depth)
        r = private_redis.client()
        accepted: list[str] = []
        statuses: Counter = Counter()
        retry_after_missing: list[int] = []

        async def run() -> None:
            load = asyncio.create_task(_load(api.url, key, DURATION_S, accepted, statuses, retry_after_missing))
            t0 = time.monotonic()
            while not load.done():
                samples.append((time.monotonic() - t0, rss_bytes(api.proc.pid), private_redis.used_memory(),
                                int(r.llen(f"tokenmill.{TINY}"))))
                await asyncio.sleep(0.5)
            await load

        started = time.monotonic()
        asyncio.run(run())
        load_s = time.monotonic() - started

        drain_start = time.monotonic()
        deadline = drain_start + 120
        while True:
            pending = relapi_store.jobs.count_jobs(tenant_id, status=["queued", "running"])
            if pending == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        drain_s = time.monotonic() - drain_start
        by_status = {s: relapi_store.jobs.count_jobs(tenant_id, status=s) for s in ("succeeded", "failed", "queued",
                                                                                   "running", "cancelled", "expired")}
        rows = [relapi_store.jobs.get_job(tenant_id, j) for j in accepted]
        not_done = [r.id for r in rows if r.status != "succeeded"]  # type: ignore[union-attr]
        twice = [r.id for r in rows if r.attempts != 1]  # type: ignore[union-attr]
        metrics = httpx.get(api.url + "/metrics", timeout=10).text
        resent = sum(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("tokenmill_api_reconciler_resent_total{"))
        rss_peak = max(s[1] for s in samples)
        redis_peak = max(s[2] for s in samples)
        depth_peak = max(s[3] for s in samples)
        figures = (f"\nOVERLOAD duration={load_s:.1f}s clients={CLIENTS} queue_limit={QUEUE_LIMIT} "
                   f"responses={dict(statuses)} accepted={len(accepted)} ({len(accepted) / load_s:.0f}/s) "
                   f"refused_429={statuses[429]} ({statuses[429] / load_s:.0f}/s) drain_after_load={drain_s:.1f}s "
                   f"store={by_status} queue_depth_peak={depth_peak} "
                   f"api_rss_base={rss_base / 2**20:.1f}MiB peak={rss_peak / 2**20:.1f}MiB "
                   f"end={samples[-1][1] / 2**20:.1f}MiB redis_used_memory_base={redis_base / 2**20:.2f}MiB "
                   f"peak={redis_peak / 2**20:.2f}MiB resent_by_reconciler={resent:g} worker_rss={rss_bytes(worker.pid) / 2**20:.0f}MiB")
        print(figures)
        # Nothing but 202 and 429, and every 429 says when to come back.
        assert set(statuses) <= {202, 429}, statuses
        assert statuses[429] > 0, "the load never went over the queue limit"
        assert not retry_after_missing
        # The queue is held near its limit (each process caches the depth figure for 250 ms, so
        # what it admits in that time comes on top).
        assert depth_peak <= 3 * QUEUE_LIMIT, depth_peak
        assert rss_peak - rss_base <= API_RSS_GROWTH_CAP, figures
        assert redis_peak <= REDIS_MEMORY_CAP, figures
        # Every accepted job ran, once.
        assert not not_done, f"{len(not_done)} accepted jobs did not succeed: {not_done[:5]} {by_status}"
        assert by_status["succeeded"] == len(accepted) + 20
        assert not twice and resent == 0, (twice[:5], resent)
        assert worker.alive()
    finally:
        if api is not None:
            api.proc.stop()
        worker.stop()
