"""A worker given SIGTERM mid-batch: it takes no new work, lets what it holds finish for its grace
period (`TOKENMILL_SHUTDOWN_GRACE_S`), hands the rest back to the queue, and exits with code 0 in
time. Another worker then finishes what was handed back; nothing runs or counts twice."""

from __future__ import annotations

import random
import signal
import time
from datetime import datetime, timedelta, timezone

from relworker import (assert_each_stored_once, jobs_by_id, payloads, status_counts, submit, unacked,
                       wait_final)

# Shorter than the default grace (90 s) on purpose: the test needs the grace period to run out
# while long jobs still run, to see them handed back; at 90 s they would all finish first.
GRACE_S = 2.0


def stop_handled_at(log_path, sent_at: datetime) -> datetime:
    """When the worker logged that it is stopping (its log times are local, to the millisecond)."""
    for line in log_path.read_text().splitlines():
        if " stopping: " in line:
            logged = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").astimezone(timezone.utc)
            return max(logged + timedelta(milliseconds=1), sent_at)  # + the truncated millisecond
    raise AssertionError("the worker never logged that it is stopping")


def test_sigterm_finishes_or_hands_back_held_jobs_and_exits_cleanly_within_grace(
        rel_store, rel_celery, rel_redis, rel_tenant, spawn_worker):
    rng = random.Random(12)
    # Long jobs first (they cannot finish within the grace period), then short ones, then a backlog
    # that the worker cannot hold (48 tasks at a time): it must not start any of it after SIGTERM.
    long = payloads(rng, 24, (4, 12), (440, 480))
    short = payloads(rng, 24, (4, 12), (4, 8))
    backlog = payloads(rng, 48, (4, 12), (4, 8))
    bodies = long + short + backlog
    # At the default visibility timeout (an hour): handed-back jobs return by being requeued, never
    # by the timeout.
    first = spawn_worker(concurrency=48,
                         extra_env={"TOKENMILL_SHUTDOWN_GRACE_S": str(GRACE_S)})
    ids = submit(rel_store, rel_celery, rel_tenant, bodies)
    long_ids = set(ids[:len(long)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # mid-batch: short jobs done, long ones generating
        counts = status_counts(rel_store, rel_tenant)
        running = int(rel_redis.hget(first.stats_key, "running") or 0)
        if counts["succeeded"] >= 8 and running >= 16:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the worker never got mid-batch: {dict(counts)}")

    sigterm_at = datetime.now(timezone.utc)
    t0 = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    code = first.proc.wait(60)
    took = time.monotonic() - t0
    print(f"SIGTERM with {dict(counts)}: exit code {code} after {took:.1f}s (grace {GRACE_S:.0f}s)")
    assert code == 0, first.log()
    assert took < GRACE_S + 15, f"took {took:.1f}s to stop"
    assert "handing" in first.log_path.read_text(), "the grace period never ran out: no hand-back tested"

    # Right after it exits: nothing it held is left running or unacknowledged.
    after = status_counts(rel_store, rel_tenant)
    assert after["running"] == 0, dict(after)
    assert unacked(rel_redis) == 0
    jobs = jobs_by_id(rel_store, ids)
    done_first = {i for i, j in jobs.items() if j.status == "succeeded"}
    handed_back = long_ids - done_first
    assert handed_back, "every long job finished within the grace period: nothing was handed back"
    assert all(jobs[i].status == "queued" for i in handed_back)
    # "After SIGTERM" counts from the moment the worker handled the signal (its "stopping:" log
    # line): a claim that commits between our kill() and the worker's signal handler is not late.
    late = [i for i in done_first if jobs[i].started_at > stop_handled_at(first.log_path, sigterm_at)]
    assert not late, f"{len(late)} jobs were started after SIGTERM"

    second = spawn_worker(concurrency=48)
    final = wait_final(rel_store, rel_tenant, len(ids), timeout=120)
    assert final == {"succeeded": len(ids)}, dict(final)
    usage = assert_each_stored_once(rel_store, ids, bodies)
    jobs = jobs_by_id(rel_store, ids)
    # A hand-back is not an attempt: every job was counted as started once.
    assert {j.attempts for j in jobs.values()} == {1}
    assert {usage[i].worker for i in done_first} == {first.hostname}
    assert {usage[i].worker for i in set(ids) - done_first} == {second.hostname}
    print(f"{len(done_first)} finished by the stopping worker, {len(handed_back)} long jobs handed back, "
          f"{len(ids) - len(done_first)} run by the next worker; each stored once")
