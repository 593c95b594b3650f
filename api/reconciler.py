"""The reconciler: sends again the tasks of jobs the store says are waiting (or running) but that
Redis no longer holds, so that a job stored is a job that runs, whatever happened to Redis.

How a job's task goes missing:

- the send failed after the commit (Redis down or refusing: the API answered 503 with the job id),
  or the API process died between its commit and its send;
- Redis restarted without persistence, or lost its last second of writes: every task it held is
  gone, waiting ones and delivered-but-unacknowledged ones alike;
- a batch's bulk tasks were refused half-way through sending.

Each pass (every ``interval_s``, in one API process at a time: a renewable Redis lock) reads from
the store the jobs open for longer than ``min_age_s`` (``queued`` ones, a batch's ones once the
batch has been ``in_progress`` that long; ``running`` ones whose worker publishes no figures any
more, i.e. is gone; or whose worker instance has no heartbeat: a worker restarted under the same
hostname is a new instance) and looks for their tasks in Redis: the model's queue at every priority, and
the tasks delivered to workers and not yet acknowledged. A queued job found in neither place on
two passes in a row is sent again, with the task it had (same id, queue and priority); a running
one once it has been missing, and its worker silent, for ``RUNNING_GRACE_S`` (15 s).

Why so careful: a task that exists twice is not harmless. The worker claims a job through the
store, so a duplicate of a finished, cancelled or expired job is skipped; but the claim also takes
a ``running`` job (that is how a lost worker's redelivered task resumes it), so a duplicate of a job
that is waiting or running would start it a second time. Redis is read a page at a time while
workers take tasks: a task that moves from its queue to the ``unacked`` hash between the reads of
the two (and, from a consumer not using `contract.redis_transport`, one popped but not yet
recorded) is seen in neither place: hence a queued job must be missing on two passes, seconds
apart, and still queued in the store. A task taken by a worker that dies is not this module's
business: it is recorded against the worker in the step that takes it (`contract.redis_delivery`)
and the workers' recovery (`workers.recovery`) puts it back. A running job's task is gone for good only if Redis lost it, and
its worker's figures vanish at the same moment even if the worker lives; a live worker publishes
them again within a second, so a running job is taken only after its worker has been silent for
15 s.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

from api.periodic import Periodic
from api.queue import Dispatcher, QueueUnavailable
from contract.liveness import live_instances
from contract.redis_keys import WORKER_STATS_TTL_S
from store import Store
from store.sql import utcnow
from store.types import OpenJob

log = logging.getLogger(__name__)

LOCK = "reconciler"
# A running job is sent again only once its worker has published nothing for this long: a live
# worker refreshes its figures every second, but they vanish at once when Redis loses its data.
RUNNING_GRACE_S = float(WORKER_STATS_TTL_S)


@dataclass
class ReconcileReport:
    """What one pass did."""

    ran: bool = False  # False: another process holds the lock, or Redis or the store is down
    open_jobs: int = 0  # jobs old enough to be looked for
    missing: int = 0  # of which Redis held no task
    resent: dict[str, int] = field(default_factory=dict)  # by job status at the time: queued, running


class Reconciler(Periodic):
    """Finds the open jobs whose tasks Redis lost and sends them again (one API process at a time)."""

    thread_name = "reconciler"
    what = "reconciler pass"

    def __init__(self, store: Store, dispatcher: Dispatcher, *, interval_s: float = 10.0, min_age_s: float = 30.0,
                 page: int = 5000, on_resent: Callable[[str], None] | None = None) -> None:
        super().__init__(interval_s)
        self._store = store
        self._on_resent = on_resent  # metrics hook: called with the job's status for each job sent again
        self._dispatcher = dispatcher
        self.min_age_s = min_age_s
        self._page = page
        self._token = uuid.uuid4().hex
        self._suspects: dict[str, float] = {}  # job id -> when it was first seen missing (monotonic)
        self.resent_total: dict[str, int] = defaultdict(int)  # for /metrics (this process)

    def tick(self) -> ReconcileReport:
        """One pass; see the module's docstring."""
        report = ReconcileReport()
        # The lock outlives a few passes so a holder that skips one keeps it; a dead holder's
        # lock lapses and another process takes over.
        if not self._dispatcher.hold(LOCK, self._token, max(3 * self.interval_s, 5.0)):
            return report
        report.ran = True
        now = utcnow()
        cutoff = now - timedelta(seconds=self.min_age_s)
        jobs = self._store.jobs.open_jobs_before(queued_before=cutoff, running_before=cutoff, limit=self._page)
        if any(j.status == "running" for j in jobs):
            # A worker process is judged by its instance's heartbeat (a restart under the same
            # hostname is another instance); a claim from before instance ids, by its hostname.
            live = {w["hostname"] for w in self._dispatcher.workers()}
            alive = live_instances(self._dispatcher.redis, {j.worker_instance for j in jobs if j.worker_instance})
            jobs = [j for j in jobs if j.status == "queued"
                    or (j.worker_instance not in alive if j.worker_instance else j.worker not in live)]
        report.open_jobs = len(jobs)
        by_model: dict[str, list[OpenJob]] = defaultdict(list)
        for j in jobs:
            by_model[j.model].append(j)
        missing: list[OpenJob] = []
        for model, group in by_model.items():
            present = self._dispatcher.job_ids_in_queue(model, {j.id for j in group})
            missing += [j for j in group if j.id not in present]
        report.missing = len(missing)
        seen = time.monotonic()
        confirmed = [j for j in missing if j.id in self._suspects
                     and (j.status == "queued" or seen - self._suspects[j.id] >= RUNNING_GRACE_S)]
        # Only jobs missing in this pass stay suspects: one found meanwhile (or finished) is cleared.
        self._suspects = {j.id: self._suspects.get(j.id, seen) for j in missing}
        if confirmed:
            sent = self._resend(confirmed)
            for j in confirmed:
                if j.id in sent:
                    self._suspects.pop(j.id, None)
                    report.resent[j.status] = report.resent.get(j.status, 0) + 1
                    self.resent_total[j.status] += 1
                    if self._on_resent is not None:
                        self._on_resent(j.status)
            log.warning("reconciler: Redis held no task for %d job(s) of %d open; sent again: %s", len(confirmed),
                        len(jobs), ", ".join(f"{n} {status}" for status, n in sorted(report.resent.items())) or "none")
        return report

    def run_once(self) -> ReconcileReport:
        return self.tick()

    def _resend(self, jobs: list[OpenJob]) -> set[str]:
        """Sends the jobs' tasks again as they were first sent: interactive jobs one task each,
        bulk jobs in bulk tasks. Returns the ids sent (Redis may refuse part of them)."""
        sent: set[str] = set()
        interactive = [j for j in jobs if j.kind != "bulk"]
        if interactive:
            n = self._dispatcher.send_many([(j.id, j.model, False) for j in interactive])
            sent |= {j.id for j in interactive[:n]}
        bulk: dict[str, list[str]] = defaultdict(list)
        for j in jobs:
            if j.kind == "bulk":
                bulk[j.model].append(j.id)
        for model, ids in bulk.items():
            try:
                self._dispatcher.send_bulk(ids, model)
            except QueueUnavailable as exc:
                log.warning("reconciler: Redis refused bulk tasks of %s: %s", model, exc)
                continue
            sent |= set(ids)
        return sent
