"""A worker killed with SIGKILL mid-batch, three times over, while 1,000 jobs run: no cleanup, no
acknowledgement; the tasks it held come back as soon as its heartbeat is gone (`workers.recovery`,
run by every live worker), at the default visibility timeout. Afterwards every job
has succeeded exactly once (one result, one usage row), and the usage adds up to exactly what the
requests forced (prompt lengths; max_tokens with ignore_eos).

A task that Redis was handing to the worker
at the very moment of the kill is recorded against it all the same (`contract.redis_delivery`) and
comes back the same way: the reconciler, which API processes run, runs at its defaults and sends
nothing again. Worker losses the worker cannot explain (SIGKILL, the OOM killer) are never charged to a job as a
failure (`workers.suspects`): a job lost three times only runs alone next time."""

from __future__ import annotations

import random
import time

from relworker import (assert_each_stored_once, jobs_by_id, payloads, status_counts, submit, unacked,
                       wait_final)

JOBS = 1000
KILL_AT = (150, 400, 650)  # succeeded jobs at each kill


def test_three_sigkills_mid_batch_lose_no_job_and_count_none_twice(
        rel_store, rel_celery, rel_redis, rel_tenant, spawn_worker, rel_reconciler):
    rng = random.Random(11)
    bodies = payloads(rng, JOBS, (4, 16), (4, 10))
    options = {"concurrency": 64, "visibility_timeout_s": 3600}  # the default: recovery needs no timeout
    t0 = time.monotonic()
    worker = spawn_worker(**options)
    ids = submit(rel_store, rel_celery, rel_tenant, bodies)
    kills = []
    for target in KILL_AT:
        deadline = time.monotonic() + 120
        while True:  # mid-batch: enough done, and the engine generating for many jobs at once
            counts = status_counts(rel_store, rel_tenant)
            in_engine = int(rel_redis.hget(worker.stats_key, "running") or 0)
            if counts["succeeded"] >= target and in_engine >= 8:
                break
            assert counts["succeeded"] < JOBS and time.monotonic() < deadline, f"no kill point: {dict(counts)}"
            time.sleep(0.05)
        worker.kill()
        kills.append((counts["succeeded"], in_engine))
        # The replacement loads while the lost instance's heartbeat runs out.
        worker = spawn_worker(wait=False, **options)

    final = wait_final(rel_store, rel_tenant, JOBS, timeout=180)
    took = time.monotonic() - t0
    assert final == {"succeeded": JOBS}, dict(final)
    assert_each_stored_once(rel_store, ids, bodies)
    jobs = jobs_by_id(rel_store, ids)
    starts = [j.attempts for j in jobs.values()]
    assert sum(a > 1 for a in starts) >= 8 * len(KILL_AT) // 2, "the kills hit almost no running job"
    time.sleep(1.0)
    assert unacked(rel_redis) == 0  # every task acknowledged in the end
    assert dict(rel_reconciler.resent_total) == {}, "a task was lost from Redis: the reconciler sent it again"
    print(f"{JOBS} jobs, SIGKILL at (succeeded, in the engine) {kills}: {sum(a > 1 for a in starts)} jobs ran "
          f"again (at most {max(starts)} starts), tasks re-sent by the reconciler "
          f"{dict(rel_reconciler.resent_total)}; all {JOBS} stored once; {took:.0f}s")
