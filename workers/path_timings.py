"""Where a worker's time goes on the job path: a few clock reads per job, summed per stage.

Each stage keeps a count and a total in seconds (no per-job records, so the cost stays a lock and
two additions per reading, whatever the rate). The runtime publishes them with the engine figures
(the worker's Redis stats hash and Flower's worker stats) as ``path.<stage>.n`` and
``path.<stage>.s``; a reader takes the difference of two snapshots to cover a time window.

Stages of one job, in order (``n`` counts what the comment names):

- ``delivery``: from the send (the task's ``enqueued_at``) to the task starting in a worker
  thread: waiting in Redis plus Celery's delivery; one per task;
- ``claim``: the task's claim, from handing its jobs to the claimer (workers.claim_batcher) to
  holding its claims (the group's transaction, and any group claimed before it); one per task;
- ``inbox``: from the task handing its request to the engine loop to the engine having added it
  (the loop takes its inbox between steps); one per job;
- ``engine``: from the engine adding the request to its last token; one per job;
- ``handoff``: from the last token to the task thread holding the output (a bulk task takes its
  jobs' outputs in the order it submitted them, so an early finisher waits for those before it);
  one per job;
- ``write``: from the task handing the result to the writer to the result being stored (the
  writer's batching wait and its transaction); one per job; ``write_txn``: one per transaction;
- ``ack``: the task's acknowledgement to the broker; one per task;
- ``task``: a task's whole run inside the worker thread (claim to stored results); one per task.

And the engine loop's thread, which is what keeps the GPU fed: ``loop_step`` (inside
``Engine.step``, one per step), ``loop_inbox`` (adding and aborting requests between steps, one
per item) and ``loop_idle`` (waiting for work with nothing to run, one per wait).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery.worker.request import Request

STAGES = ("delivery", "claim", "inbox", "engine", "handoff", "write", "write_txn", "ack", "task",
          "loop_step", "loop_inbox", "loop_idle")


class PathTimings:
    """Thread-safe per-stage counts and total seconds of one worker process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = dict.fromkeys(STAGES, 0)
        self._seconds = dict.fromkeys(STAGES, 0.0)

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        """Adds ``count`` readings that took ``seconds`` together to ``stage`` (one of STAGES)."""
        with self._lock:
            self._count[stage] += count
            self._seconds[stage] += seconds

    def snapshot(self) -> dict[str, float]:
        """``{"path.<stage>.n": count, "path.<stage>.s": seconds}`` for every stage."""
        with self._lock:
            out: dict[str, float] = {}
            for stage in STAGES:
                out[f"path.{stage}.n"] = self._count[stage]
                out[f"path.{stage}.s"] = round(self._seconds[stage], 6)
            return out


def timed_request_class(timings: PathTimings) -> type[Request]:
    """A Celery request class (a task's ``Request`` option) that times its acknowledgement."""

    class TimedRequest(Request):
        """Celery's worker-side request, with the broker acknowledgement timed."""

        def acknowledge(self) -> None:
            if self.acknowledged:
                return
            start = time.monotonic()
            super().acknowledge()
            timings.add("ack", time.monotonic() - start)

    return TimedRequest


def stage_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per stage, the count and seconds between two snapshots (as read back from Redis, where
    values are strings): ``{stage: {"n": ..., "s": ...}}``."""
    out: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        n = float(after.get(f"path.{stage}.n", 0)) - float(before.get(f"path.{stage}.n", 0))
        s = float(after.get(f"path.{stage}.s", 0)) - float(before.get(f"path.{stage}.s", 0))
        out[stage] = {"n": n, "s": s}
    return out
