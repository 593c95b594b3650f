"""Claims in groups: one claim transaction for the jobs of every task that asks at about the same
time, from one thread.

A worker running hundreds of one-job tasks at once would otherwise make a claim (a liveness read
and an update, two transactions) per task from its task threads, and every one of them holds the
GIL that the engine loop's thread needs (docs/workers.md, "The hot path"). Here each task hands its
job ids over and waits; the claimer takes whatever has arrived (no wait beyond that: an idle worker
claims a lone job at once, and under load the requests that came during one transaction make the
next), claims the union in one go, and hands each task its own claims. A failed group claim fails
every task of the group with the error (each task then goes back to the queue, as a failed claim
of its own did).
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable

from store.types import JobClaim

log = logging.getLogger(__name__)

ClaimFn = Callable[[list[str]], list[JobClaim]]


class ClaimBatcher:
    """A background thread that claims the jobs of concurrent tasks together."""

    def __init__(self, claim: ClaimFn, *, max_jobs: int = 512) -> None:
        self._claim = claim
        self.max_jobs = max_jobs
        self._inbox: queue.SimpleQueue[tuple[list[str], Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="claimer", daemon=True)
        self._stopped = False
        self.groups = 0  # claim calls made (for tests and figures)

    def start(self) -> "ClaimBatcher":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Claims what was handed over already, then stops; later requests fail at once."""
        self._stopped = True
        self._inbox.put(None)
        self._thread.join(timeout)

    def claim(self, job_ids: list[str]) -> list[JobClaim]:
        """Claims the jobs (with those of other tasks asking now); returns this task's claims, in
        the order the claim function gave them, or raises what the claim raised."""
        return self.submit(job_ids).result()

    def submit(self, job_ids: list[str]) -> Future:
        """Hands the jobs over; the future resolves to their claims."""
        fut: Future = Future()
        if self._stopped:
            fut.set_exception(RuntimeError("the claimer has stopped"))
            return fut
        self._inbox.put((list(job_ids), fut))
        return fut

    def _gather(self, first: tuple[list[str], Future]) -> list[tuple[list[str], Future]]:
        group, size = [first], len(first[0])
        while size < self.max_jobs:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._inbox.put(None)  # seen again once this group is claimed
                break
            group.append(item)
            size += len(item[0])
        return group

    def _run(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                self._fail_rest()
                return
            self._claim_group(self._gather(first))

    def _claim_group(self, group: list[tuple[list[str], Future]]) -> None:
        ids = [job_id for job_ids, _ in group for job_id in job_ids]
        try:
            claims = self._claim(ids)
        except BaseException as e:  # noqa: BLE001 - every waiting task must hear of it
            for _, fut in group:
                fut.set_exception(e)
            return
        finally:
            self.groups += 1
        rank = {c.id: i for i, c in enumerate(claims)}
        for job_ids, fut in group:
            fut.set_result([claims[i] for i in sorted(rank[j] for j in set(job_ids) if j in rank)])

    def _fail_rest(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].set_exception(RuntimeError("the claimer has stopped"))
