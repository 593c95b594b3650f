"""Batched, idempotent writes of finished jobs to the store, from one thread.

Tasks hand their finished job to the writer and wait for it to be stored before they return (the
task is acknowledged only then). The writer gathers whatever has arrived, up to `max_batch`, and
records it in one transaction, so a worker finishing hundreds of jobs a second makes a few writes a
second. A failed write (the database restarting, say) is retried with backoff and never dropped;
the store's primary keys make a repeated write a no-op, so nothing is counted twice.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

from store import Store
from store.types import FinishedJob
from workers.path_timings import PathTimings

log = logging.getLogger(__name__)


class ResultWriter:
    """A background thread that records `store.types.FinishedJob`s in batches."""

    def __init__(self, store: Store, *, max_batch: int = 512, max_wait_s: float = 0.05,
                 max_backoff_s: float = 5.0, timings: PathTimings | None = None) -> None:
        self.store = store
        self.timings = timings or PathTimings()
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_backoff_s = max_backoff_s
        # (finished job, its future, time.monotonic() at submit)
        self._inbox: queue.SimpleQueue[tuple[FinishedJob, Future, float] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="result-writer", daemon=True)
        self._stopping = False
        self.batches_written = 0
        self.jobs_written = 0

    def start(self) -> "ResultWriter":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Writes what is queued, then stops."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    def submit(self, finished: FinishedJob) -> Future:
        """Queues one finished job; the future resolves to True once it is stored (False when the
        job already had a result: a redelivered task)."""
        fut: Future = Future()
        self._inbox.put((finished, fut, time.monotonic()))
        return fut

    def _gather(self) -> list[tuple[FinishedJob, Future, float]]:
        try:
            first = self._inbox.get(timeout=0.5)
        except queue.Empty:
            return []
        items = [] if first is None else [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(items) < self.max_batch:
            timeout = deadline - time.monotonic()
            try:
                item = self._inbox.get(timeout=max(timeout, 0)) if timeout > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                items.append(item)
        return items

    def _run(self) -> None:
        while True:
            items = self._gather()
            if not items:
                if self._stopping and self._inbox.empty():
                    return
                continue
            self._write(items)

    def _write(self, items: list[tuple[FinishedJob, Future, float]]) -> None:
        backoff = 0.1
        while True:
            try:
                start = time.monotonic()
                outcome = self.store.jobs.record_results([f for f, _, _ in items])
                done = time.monotonic()
                self.timings.add("write_txn", done - start)
                self.timings.add("write", sum(done - t for _, _, t in items), len(items))
                break
            except Exception as e:  # noqa: BLE001 - sorted below
                if not _transient(e):
                    # The data itself is refused: find the culprit(s) alone, keep the rest.
                    self._isolate(items, e)
                    return
                # The database is away (restarting, unreachable): retry, never drop.
                log.warning("recording %d results failed (%r); retrying in %.1fs", len(items), e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        recorded = set(outcome.recorded)
        if outcome.fenced:
            log.warning("%d result(s) not recorded: their jobs were taken over by another worker while this one "
                        "was presumed dead (%s)", len(outcome.fenced), ", ".join(outcome.fenced[:5]))
        self.batches_written += 1
        self.jobs_written += len(recorded)
        for finished, fut, _ in items:
            if not fut.done():
                fut.set_result(finished.job_id in recorded)

    def _isolate(self, items: list[tuple[FinishedJob, Future, float]], error: Exception) -> None:
        if len(items) > 1:
            half = len(items) // 2
            self._write(items[:half])
            self._write(items[half:])
            return
        finished, fut, _ = items[0]
        log.error("the store refused the result of %s: %r", finished.job_id, error)
        fut.set_exception(ResultRejected(f"the store refused this job's result: {error}"))


class ResultRejected(Exception):
    """The store refused a result for what it holds (not for being unreachable)."""


def _transient(error: Exception) -> bool:
    """Whether the error is about reaching the database rather than about the data."""
    from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError, TimeoutError

    if isinstance(error, (OperationalError, DisconnectionError, TimeoutError)):
        return True
    if isinstance(error, DBAPIError):
        return bool(error.connection_invalidated)
    return True  # unknown failures are retried: dropping a result is worse than waiting
