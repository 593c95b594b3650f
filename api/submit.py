"""Write-then-enqueue, in groups: concurrent job submissions of one process are gathered and
stored in one transaction per tenant, then each new job's task is sent.

Committing many jobs at once is what lets one API process accept thousands of jobs a second: the
commit (a disk flush on PostgreSQL) is shared. The order per job is unchanged: its row is committed
before its task is sent, so a worker never sees a task whose job is missing, and a job whose task
could not be sent stays ``queued`` in the store (the reconciler sends it later).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from api.queue import Dispatcher
from contract import tracing
from store import Store
from store.types import JobSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submitted:
    """The outcome of one submission: the job id, whether it is new (False: an idempotency key
    matched an earlier job) and whether its task was sent."""

    id: str
    created: bool
    enqueued: bool


@dataclass
class _Pending:
    tenant_id: str
    spec: JobSpec
    future: asyncio.Future[Submitted]
    trace: dict[str, str] | None = None  # the submit span's context (contract.tracing), when traced


class Submitter:
    """Gathers submissions on the event loop and writes them in groups on worker threads."""

    def __init__(self, store: Store, dispatcher: Dispatcher, *, max_group: int = 256, writers: int = 4) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._max_group = max_group
        self._writers = writers
        self._queue: asyncio.Queue[_Pending] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Starts the writer tasks on the running event loop."""
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._run(), name=f"job-writer-{i}") for i in range(self._writers)]

    async def stop(self) -> None:
        """Stops the writers (submissions already taken are finished first)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass

    async def submit(self, tenant_id: str, spec: JobSpec, *, trace: dict[str, str] | None = None) -> Submitted:
        """Stores the job and sends its task; returns once both are done (or the send failed).
        ``trace``: the trace context the task carries to its worker."""
        if self._queue is None:
            raise RuntimeError("the submitter is not started")
        future: asyncio.Future[Submitted] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(tenant_id, spec, future, trace))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            group = [await self._queue.get()]
            while len(group) < self._max_group and not self._queue.empty():
                group.append(self._queue.get_nowait())
            try:
                outcomes = await asyncio.to_thread(self._write, group)
            except Exception as exc:
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, outcome in zip(group, outcomes):
                if not p.future.done():
                    p.future.set_result(outcome)

    def _write(self, group: list[_Pending]) -> list[Submitted]:
        started = time.time()
        by_tenant: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(group):
            by_tenant[p.tenant_id].append(i)
        created: list[tuple[str, bool] | None] = [None] * len(group)
        for tenant_id, indexes in by_tenant.items():
            rows = self._store.jobs.create_jobs(tenant_id, [group[i].spec for i in indexes])
            for i, row in zip(indexes, rows):
                created[i] = (row.id, row.created)
        pairs = [pair for pair in created if pair is not None]
        new = [(job_id, group[i].spec.model, group[i].spec.kind == "bulk")
               for i, (job_id, is_new) in enumerate(pairs) if is_new]
        traced = [group[i].trace for i, (_, is_new) in enumerate(pairs) if is_new]
        requests = [group[i].spec.request for i, (_, is_new) in enumerate(pairs) if is_new]
        # One span per traced job, from the group's write to its send: its context rides in the task.
        spans = [tracing.start_span("tokenmill.enqueue", t, kind=tracing.SpanKind.PRODUCER, start_s=started)
                 if t is not None else None for t in traced]
        headers = [tracing.carrier(s) if s is not None else None for s in spans] if any(spans) else None
        # Sent in order, so the first `sent` new jobs are the ones Redis took.
        sent = self._dispatcher.send_many(new, headers=headers, requests=requests) if new else 0
        for s in spans:
            if s is not None:
                tracing.end(s)
        out: list[Submitted] = []
        n_new = 0
        for job_id, is_new in pairs:
            out.append(Submitted(job_id, is_new, is_new and n_new < sent))
            n_new += int(is_new)
        return out
