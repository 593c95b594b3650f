"""A task held longer than the visibility timeout: Redis hands a copy of it out again while the
worker still runs the original (here the only worker, so the copy comes back to it). The copy must
wait for the original: the job runs once, is counted once, and ends `succeeded`."""

from __future__ import annotations

import random

from relworker import assert_each_stored_once, jobs_by_id, payloads, submit, wait_final

JOBS = 16


def test_task_redelivered_to_the_worker_still_running_it_runs_once(
        rel_store, rel_celery, rel_redis, rel_tenant, spawn_worker):
    rng = random.Random(16)
    bodies = payloads(rng, JOBS, (4, 8), (440, 480))  # seconds each: well past the timeout
    worker = spawn_worker(concurrency=64, visibility_timeout_s=1)
    ids = submit(rel_store, rel_celery, rel_tenant, bodies)
    final = wait_final(rel_store, rel_tenant, JOBS, timeout=120)
    assert final == {"succeeded": JOBS}, dict(final)
    assert_each_stored_once(rel_store, ids, bodies)
    assert {j.attempts for j in jobs_by_id(rel_store, ids).values()} == {1}
    copies = worker.log_path.read_text(errors="replace").count("'duplicate': 1")
    print(f"{copies} copies of running tasks were delivered to the worker running them; each job ran once")
    assert copies > 0, "no task was delivered twice: nothing was tested"
