"""Tasks held by a live worker are never run twice.

- The visibility timeout is a backstop only: a worker keeps pushing the delivery time of the tasks
  it holds forward, so a job that runs longer than the timeout is not handed to a second worker (or
  back to its own).
- A second copy of a task whose job this worker runs (sent twice, say) waits for the original and
  then finds the job done: the job runs once, is counted once, and ends `succeeded`.
"""

from __future__ import annotations

import random
import time

from contract.queues import queue_for
from relworker import MODEL, assert_each_stored_once, jobs_by_id, payloads, send, submit, wait_final

JOBS = 16


def test_jobs_longer_than_the_visibility_timeout_on_a_live_worker_are_not_redelivered(
        rel_store, rel_celery, rel_redis, rel_tenant, spawn_worker):
    rng = random.Random(16)
    bodies = payloads(rng, JOBS, (4, 8), (440, 480))  # seconds each: well past the timeout below
    # Shortened on purpose: the test shows that the backstop does NOT fire while the worker lives;
    # at the default (3600 s) that would take an hour to show.
    worker = spawn_worker(concurrency=64, visibility_timeout_s=2)
    ids = submit(rel_store, rel_celery, rel_tenant, bodies)
    final = wait_final(rel_store, rel_tenant, JOBS, timeout=120)
    worker.terminate()  # the module's next test counts on its own worker only
    assert final == {"succeeded": JOBS}, dict(final)
    assert_each_stored_once(rel_store, ids, bodies)
    assert {j.attempts for j in jobs_by_id(rel_store, ids).values()} == {1}
    log = worker.log_path.read_text(errors="replace")
    assert "'duplicate': 1" not in log and "'skipped': 1" not in log, "a held task was delivered again"


def test_a_second_copy_of_a_running_task_runs_nothing_twice(rel_store, rel_celery, rel_redis, rel_tenant,
                                                            spawn_worker):
    rng = random.Random(17)
    bodies = payloads(rng, JOBS, (4, 8), (200, 240))
    worker = spawn_worker(concurrency=64, visibility_timeout_s=3600)  # the default
    ids = submit(rel_store, rel_celery, rel_tenant, bodies)
    send(rel_celery, ids)  # every task a second time, while the first copies run
    final = wait_final(rel_store, rel_tenant, JOBS, timeout=120)
    assert final == {"succeeded": JOBS}, dict(final)
    assert_each_stored_once(rel_store, ids, bodies)
    assert {j.attempts for j in jobs_by_id(rel_store, ids).values()} == {1}
    deadline = time.monotonic() + 30
    while rel_redis.llen(queue_for(MODEL)) or rel_redis.hlen("unacked"):  # every copy acknowledged
        assert time.monotonic() < deadline, "copies still held"
        time.sleep(0.2)
    time.sleep(0.5)
    log = worker.log_path.read_text(errors="replace")
    copies = log.count("'duplicate': 1") + log.count("'skipped': 1")
    worker.terminate()
    print(f"{copies} second copies acknowledged without running their job again")
    assert copies == JOBS, "not every second copy was acknowledged as one"
