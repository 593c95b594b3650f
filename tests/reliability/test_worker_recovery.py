"""Crash recovery at the default settings (visibility timeout 3600 s): a dead worker process's jobs
run again seconds after its heartbeat stops, whatever its hostname, and are counted once.

- SIGKILL, then a restart under the same hostname (as `tokenmill up` or compose restart it): the
  new process is a new instance, so the jobs the old one held are recovered, not taken for live.
- A worker cut off from Redis (a proxy that stops relaying, sockets left half-open, as when a link
  or a host vanishes) while PostgreSQL stays reachable: its jobs are recovered by another worker,
  and when it is reconnected it writes no second result (fencing).

The visibility timeout stays at its default: nothing here waits for it.
"""

from __future__ import annotations

import random
import time
from urllib.parse import urlparse

from sqlalchemy import select

from relworker import assert_each_stored_once, jobs_by_id, payloads, status_counts, submit, wait_final
from store.models import Job, Usage
from tcp_proxy import TcpProxy

DEFAULT_VISIBILITY_TIMEOUT_S = 3600  # tokenmill.settings' default (the test helper's own is 5)
RUNNING_AGAIN_WITHIN_S = 30.0


def running_ids(store, tenant_id: str) -> set[str]:  # type: ignore[no-untyped-def]
    with store.db.read() as s:
        return set(s.scalars(select(Job.id).where(Job.tenant_id == tenant_id, Job.status == "running")))


def wait_running_again(store, held: set[str], since_attempts: dict[str, int], timeout: float) -> float:  # type: ignore[no-untyped-def]
    """Waits until every held job has been started again (a new attempt) or finished; returns when."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = jobs_by_id(store, sorted(held))
        if all(j.attempts > since_attempts[j.id] or j.status in ("succeeded", "failed") for j in jobs.values()):
            return time.monotonic()
        time.sleep(0.2)
    late = [j.id for j in jobs_by_id(store, sorted(held)).values() if j.attempts <= since_attempts[j.id]]
    raise AssertionError(f"{len(late)} held job(s) not running again after {timeout:.0f}s")


def test_sigkilled_worker_restarted_under_the_same_name_gets_its_jobs_back_within_seconds(
        rel_store, rel_celery, rel_redis, rel_tenant, spawn_worker, rel_reconciler):
    rng = random.Random(31)
    bodies = payloads(rng, 40, (4, 12), (150, 250))
    options = {"concurrency": 64, "visibility_timeout_s": DEFAULT_VISIBILITY_TIMEOUT_S,
               "hostname": f"tiny-same-{rng.randrange(10**6)}@test"}
    worker = spawn_worker(**options)
    ids = submit(rel_store, rel_celery, rel_tenant, bodies)
    deadline = time.monotonic() + 60
    while len(held := running_ids(rel_store, rel_tenant)) < 8:
        assert time.monotonic() < deadline, f"never 8 jobs running: {dict(status_counts(rel_store, rel_tenant))}"
        time.sleep(0.05)
    attempts = {j.id: j.attempts for j in jobs_by_id(rel_store, sorted(held)).values()}
    worker.kill()
    killed = time.monotonic()
    worker = spawn_worker(**options)  # the same hostname, a new process
    ready = time.monotonic()
    again = wait_running_again(rel_store, held, attempts, timeout=RUNNING_AGAIN_WITHIN_S)
    final = wait_final(rel_store, rel_tenant, len(ids), timeout=120)
    worker.terminate()  # the module's next test counts on its own workers only
    assert final == {"succeeded": len(ids)}, dict(final)
    assert dict(rel_reconciler.resent_total) == {}  # the recovery brought every task back, none was lost
    assert_each_stored_once(rel_store, ids, bodies)
    print(f"{len(held)} held jobs: running again {again - killed:.1f}s after the SIGKILL, "
          f"{again - ready:.1f}s after the new worker was ready")


def test_worker_cut_off_from_redis_loses_its_jobs_to_another_and_writes_no_second_result(
        rel_store, rel_celery, rel_redis, rel_redis_url, rel_tenant, spawn_worker, rel_reconciler):
    rng = random.Random(32)
    bodies = payloads(rng, 24, (4, 12), (120, 160))
    url = urlparse(rel_redis_url)
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 6379)
    cut = other = None
    try:
        # One sequence at a time in the cut-off worker's engine (TOKENMILL_MAX_NUM_SEQS, default:
        # sized from the device): its jobs then stay in its hands long enough for the cut to
        # outlast the recovery, which is what is tested.
        cut = spawn_worker(concurrency=64, visibility_timeout_s=DEFAULT_VISIBILITY_TIMEOUT_S,
                           redis_url=url._replace(netloc=f"127.0.0.1:{proxy.port}").geturl(),
                           extra_env={"TOKENMILL_MAX_NUM_SEQS": "1"})
        ids = submit(rel_store, rel_celery, rel_tenant, bodies)
        deadline = time.monotonic() + 60
        while rel_redis.hlen("unacked") < len(ids):  # every task delivered to the worker to be cut off
            assert time.monotonic() < deadline, "the tasks never all reached the worker"
            time.sleep(0.05)
        proxy.pause()
        other = spawn_worker(concurrency=64, visibility_timeout_s=DEFAULT_VISIBILITY_TIMEOUT_S)
        final = wait_final(rel_store, rel_tenant, len(ids), timeout=120)
        assert final == {"succeeded": len(ids)}, dict(final)
        assert dict(rel_reconciler.resent_total) == {}  # the recovery brought every task back
        proxy.resume()  # reconnected: whatever it still finishes must not count again
        time.sleep(8)
        assert cut.alive(), cut.log()
    finally:
        proxy.close()
        for w in (cut, other):
            if w is not None:
                w.terminate()
    assert_each_stored_once(rel_store, ids, bodies)
    with rel_store.db.read() as s:
        by_worker = {u.job_id: u.worker for u in s.scalars(select(Usage).where(Usage.job_id.in_(ids)))}
    taken_over = [i for i in ids if by_worker[i] == other.hostname]
    assert taken_over, "the other worker ran none of the cut-off worker's jobs"
    log = cut.log(tail=200_000)
    assert "heartbeat of instance" in log and "not renewed" in log, log[-3000:]
    assert "were taken over while it was cut off from Redis" in log, log[-3000:]
    jobs = jobs_by_id(rel_store, ids)
    print(f"{len(taken_over)} of {len(ids)} jobs taken over by the other worker; {sum(by_worker[i] == cut.hostname for i in ids)} "
          f"finished by the cut-off one before recovery; max attempts {max(j.attempts for j in jobs.values())}")
