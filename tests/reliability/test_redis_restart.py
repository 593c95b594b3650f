"""Redis goes away under a live system: a private `redis-server` (no persistence, like the shared
dev Redis), a real CPU worker and a real API process, all on it.

- Its connections are cut while jobs run (Redis itself stays up): nothing is lost or run twice.
- It is killed (everything it held is gone: waiting tasks and delivered ones) while jobs run and
  wait, stays down for a few seconds while clients keep submitting, and comes back empty. While it
  is down submissions are 503 with Retry-After (never 500) and /readyz is 503; afterwards every job
  acknowledged with 202 or stored with a 503 succeeds, exactly once: the jobs that were running
  finish on the same worker process (its engine kept), the ones Redis lost and the ones never
  sent are sent again by the API's reconciler, and new jobs run on the same worker once it has
  reconnected by itself.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api_fixtures import (  # noqa: F401 - fixtures
    TINY,
    PrivateRedis,
    Proc,
    Server,
    relapi_database_url,
    relapi_model_dir,
    relapi_store,
    relapi_tenant,
    start_api,
    start_worker,
    wait_final,
)
from store import Store

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SLOTS = 4  # the worker's task slots: with this many long jobs running, more jobs wait in Redis
LONG = {"max_tokens": 480, "min_tokens": 480, "ignore_eos": True}
SHORT = {"max_tokens": 4, "min_tokens": 4, "ignore_eos": True}
DOWN_S = 3.0  # how long Redis stays down
BATCH_LINES = 20


class Stack:
    """The private Redis, the worker (and its Celery hostname) and the API of this module."""

    def __init__(self, redis: PrivateRedis, worker: Proc, hostname: str, api: Server) -> None:
        self.redis, self.worker, self.hostname, self.api = redis, worker, hostname, api


@pytest.fixture(scope="module")
def stack(relapi_database_url: str, relapi_model_dir: Path,  # noqa: F811
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("redis-restart")
    redis = PrivateRedis(log_dir)
    redis.start()
    stack = None
    worker, hostname = start_worker(redis_url=redis.url, database_url=relapi_database_url,
                                    model_dir=relapi_model_dir, log_dir=log_dir, concurrency=SLOTS)
    try:
        api = start_api(redis_url=redis.url, database_url=relapi_database_url, model_dir=relapi_model_dir,
                        log_dir=log_dir)  # the reconciler at its defaults: lost tasks re-sent within ~40 s
        stack = Stack(redis, worker, hostname, api)
        yield stack
    finally:
        if stack is not None:
            stack.api.proc.stop()
            worker = stack.worker  # a test may have replaced it
        worker.stop()
        redis.kill()


def submit(c: httpx.Client, params: dict, statuses: Counter) -> httpx.Response:
    r = c.post("/v1/jobs", json={"model": TINY, "prompt": "hi", "params": params})
    statuses[r.status_code] += 1
    return r


def wait_running(store: Store, tenant_id: str, job_ids: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(store.jobs.get_job(tenant_id, j).status == "running" for j in job_ids):  # type: ignore[union-attr]
            return
        time.sleep(0.05)
    raise AssertionError("the long jobs never all ran at once")


def resent(api: Server) -> dict[str, int]:
    text = httpx.get(api.url + "/metrics", timeout=10).text
    return {m.group(1): int(float(m.group(2)))
            for m in re.finditer(r'tokenmill_api_reconciler_resent_total\{status="(\w+)"\} (\S+)', text)}


def test_redis_connections_cut_mid_run_lose_and_repeat_nothing(stack: Stack, relapi_store: Store,  # noqa: F811
                                                                relapi_tenant: tuple[str, str]) -> None:  # noqa: F811
    tenant_id, key = relapi_tenant
    statuses: Counter = Counter()
    with stack.api.client(key) as c:
        running = [submit(c, LONG, statuses).json()["id"] for _ in range(SLOTS)]
        wait_running(relapi_store, tenant_id, running)
        waiting = [submit(c, SHORT, statuses).json()["id"] for _ in range(8)]
        # Every client connection of Redis is closed at once: the worker's consumer, its figures
        # and cancel listener, the API's producer pool.
        killed = stack.redis.client().client_kill_filter(_type="normal", skipme=True)
        assert killed >= 3
        after = [submit(c, SHORT, statuses).json()["id"] for _ in range(4)]
    assert set(statuses) == {202}, statuses
    jobs = running + waiting + after
    final = wait_final(relapi_store, tenant_id, jobs, timeout=60)
    assert Counter(final.values()) == {"succeeded": len(jobs)}, final
    rows = [relapi_store.jobs.get_job(tenant_id, j) for j in jobs]
    assert {(r.attempts, r.worker) for r in rows} == {(1, stack.hostname)}  # type: ignore[union-attr]
    assert stack.worker.alive()


def test_redis_restart_loses_no_job_and_the_worker_carries_on(stack: Stack, relapi_store: Store,  # noqa: F811
                                                               relapi_tenant: tuple[str, str]) -> None:  # noqa: F811
    tenant_id, key = relapi_tenant
    worker_pid = stack.worker.pid
    before = resent(stack.api)
    statuses: Counter = Counter()
    with stack.api.client(key, timeout=30) as c:
        # Redis up: the worker's slots are taken by long jobs, and short ones wait in Redis.
        running = [submit(c, LONG, statuses).json()["id"] for _ in range(SLOTS)]
        wait_running(relapi_store, tenant_id, running)
        waiting = [submit(c, SHORT, statuses).json()["id"] for _ in range(12)]
        # A small batch too: its bulk tasks wait behind the interactive ones.
        lines = b"".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
                                     "body": {"model": TINY, "prompt": "hi", **SHORT}}).encode() + b"\n"
                         for i in range(BATCH_LINES))
        f = c.post("/v1/files", files={"file": ("b.jsonl", lines)}, data={"purpose": "batch"}).json()
        batch_id = c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                                "completion_window": "24h"}).json()["id"]
        r = stack.redis.client()
        deadline = time.monotonic() + 30
        while not (bulk_in_redis := r.llen(f"tokenmill.{TINY}:9")):
            assert time.monotonic() < deadline, "the batch's tasks never reached Redis"
            time.sleep(0.02)
        in_redis = r.llen(f"tokenmill.{TINY}")
        assert in_redis >= 8, "the short jobs should be waiting in Redis when it dies"
        assert set(statuses) == {202}, statuses

        # Redis dies with everything it held, and stays down for a while.
        stack.redis.kill()
        down_at = time.monotonic()
        refused: list[str] = []
        down: Counter = Counter()
        readiness = []
        while time.monotonic() - down_at < DOWN_S:
            r = submit(c, SHORT, down)
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) > 0
            assert r.json()["error"]["code"] == "queue_unavailable"
            refused.append(r.headers["x-tokenmill-job-id"])
            chat = c.post("/v1/chat/completions", json={"model": TINY, "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "hi"}]})
            down[chat.status_code] += 1
            assert chat.status_code == 503, chat.text
            refused.append(chat.headers["x-tokenmill-job-id"])
            ready = httpx.get(stack.api.url + "/readyz", timeout=10)
            readiness.append(ready.status_code)
            assert ready.status_code == 503 and ready.json()["redis"] is False
            assert c.get(f"/v1/jobs/{refused[0]}").json()["status"] == "queued"
            time.sleep(0.2)
        assert len(refused) >= 4

        # Redis comes back empty; new jobs are accepted at once.
        stack.redis.start()
        back_at = time.monotonic()
        after = [submit(c, SHORT, statuses).json()["id"] for _ in range(6)]
        assert set(statuses) == {202}, statuses

    batch_jobs = [j.id for j in relapi_store.jobs.list_jobs(tenant_id, batch_id=batch_id, limit=1000).jobs]
    assert len(batch_jobs) == BATCH_LINES
    jobs = running + waiting + refused + after + batch_jobs
    final = wait_final(relapi_store, tenant_id, jobs, timeout=150)  # the reconciler: every 10 s, jobs older than 30 s
    settled_s = time.monotonic() - back_at
    lost = {j: s for j, s in final.items() if s != "succeeded"}
    assert not lost, f"{len(lost)} of {len(jobs)} jobs did not succeed: {lost}\n{stack.worker.log()}"
    rows = {j: relapi_store.jobs.get_job(tenant_id, j) for j in jobs}
    twice = {j: r.attempts for j, r in rows.items() if r.attempts != 1}  # type: ignore[union-attr]
    assert not twice, f"jobs started more than once: {twice}"
    # One worker process did everything: the running jobs finished on it, the rest ran on it
    # after it reconnected by itself, with the engine it loaded once.
    assert {r.worker for r in rows.values()} == {stack.hostname}  # type: ignore[union-attr]
    assert stack.worker.alive() and stack.worker.pid == worker_pid
    assert stack.worker.log_path.read_text().count("workers.main: loading") == 1
    assert "Connection to broker lost" in stack.worker.log(200_000)
    # The reconciler sent again what Redis lost and what it never got, and nothing else.
    now = resent(stack.api)
    sent_again = now.get("queued", 0) - before.get("queued", 0)
    most = len(refused) + len(waiting) + len(batch_jobs)
    assert len(refused) <= sent_again <= most, (sent_again, len(refused), most)
    with stack.api.client(key) as c:
        deadline = time.monotonic() + 30
        while (batch := c.get(f"/v1/batches/{batch_id}").json())["status"] != "completed":
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
    assert batch["request_counts"] == {"total": BATCH_LINES, "completed": BATCH_LINES, "failed": 0}
    print(f"\nREDIS-RESTART jobs={len(jobs)} (running {len(running)}, waiting in Redis {in_redis} + "
          f"{len(batch_jobs)} batch jobs in {bulk_in_redis} bulk task(s), refused while down {len(refused)}, "
          f"after {len(after)}) responses={dict(statuses)} "
          f"down={dict(down)} readyz_while_down={Counter(readiness)} resent_by_reconciler={sent_again} "
          f"all_succeeded_s_after_restart={settled_s:.1f} lost=0")


def test_running_job_whose_worker_and_task_are_both_lost_is_sent_again(
        stack: Stack, relapi_store: Store, relapi_tenant: tuple[str, str],  # noqa: F811
        relapi_database_url: str, relapi_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    # The one case Redis's own redelivery cannot cover: the worker dies while the job runs, and
    # the unacknowledged task dies with Redis. The store still says `running`, on a worker that
    # publishes nothing any more; the reconciler sends it again and another worker runs it.
    tenant_id, key = relapi_tenant
    before = resent(stack.api)
    with stack.api.client(key) as c:
        job = c.post("/v1/jobs", json={"model": TINY, "prompt": "hi", "params": LONG}).json()["id"]
        wait_running(relapi_store, tenant_id, [job])
        stack.worker.proc.kill()  # SIGKILL: no warm shutdown, nothing acknowledged or handed back
        stack.worker.proc.wait(10)
        stack.redis.kill()
        stack.redis.start()
        lost_at = time.monotonic()
        replacement, hostname = start_worker(redis_url=stack.redis.url, database_url=relapi_database_url,
                                             model_dir=relapi_model_dir, log_dir=tmp_path, concurrency=SLOTS)
        stack.worker, stack.hostname = replacement, hostname  # the module's teardown stops this one
        final = wait_final(relapi_store, tenant_id, [job], timeout=60)
    row = relapi_store.jobs.get_job(tenant_id, job)
    assert final[job] == "succeeded", (row, stack.worker.log())
    assert row.worker == hostname and row.attempts == 2  # type: ignore[union-attr]
    assert resent(stack.api).get("running", 0) - before.get("running", 0) == 1
    print(f"\nLOST-RUNNING job succeeded on the replacement worker {time.monotonic() - lost_at:.1f}s after "
          f"the loss (worker start included), attempts=2")
