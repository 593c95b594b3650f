"""Jobs and their results: creation (bulk, idempotent), worker claims, finishing in bulk, reads.

The worker-side calls (``mark_running``, ``record_results``, ``mark_failed``, ``requeue``, ``expire``)
take job ids, which are globally unique, and never return another tenant's rows to a client: they
are for workers only. Every read a client can trigger takes the tenant.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection, Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Select, Table, bindparam, case, func, insert, literal_column, or_, select, true, update
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import NotFound
from store.models import JOB_KINDS, JOB_STATUSES, Batch, Job, Result, Tenant, Usage
from store.sql import among, insert_ignoring, new_id, paged_ids, utcnow
from store.types import CreatedJob, FinishedJob, JobClaim, JobFailure, JobPage, JobSpec, OpenJob, RecordOutcome

ACTIVE = ("queued", "running")
MAX_PAGE = 1000

_JOBS = cast(Table, Job.__table__)
_RESULTS = cast(Table, Result.__table__)
_USAGE = cast(Table, Usage.__table__)


def _job_row(tenant_id: str, spec: JobSpec, now: datetime) -> dict[str, Any]:
    if spec.kind not in JOB_KINDS:
        raise ValueError(f"job kind {spec.kind!r} is not one of {', '.join(JOB_KINDS)}")
    if not spec.model:
        raise ValueError("a job needs a model name")
    return {
        "id": spec.id or new_id("job_"),
        "tenant_id": tenant_id,
        "api_key_id": spec.api_key_id,
        "model": spec.model,
        "kind": spec.kind,
        "priority": spec.priority,
        "request": spec.request,
        "status": "queued" if spec.error is None else "failed",
        "attempts": 0,
        "error_code": None if spec.error is None else spec.error[0],
        "error_message": None if spec.error is None else spec.error[1],
        "worker": None,
        "worker_instance": None,
        "idempotency_key": spec.idempotency_key,
        "batch_id": spec.batch_id,
        "custom_id": spec.custom_id,
        "reserved_tokens": spec.reserved_tokens,
        "webhook_url": spec.webhook_url,
        "webhook_status": "pending" if spec.webhook_url else None,
        "created_at": now,
        "expires_at": spec.expires_at,
        "started_at": None,
        "finished_at": None if spec.error is None else now,
    }


def insert_jobs(session: Session, tenant_id: str, specs: Sequence[JobSpec]) -> list[CreatedJob]:
    """Inserts jobs in one transaction (the caller's); see ``JobStore.create_jobs``."""
    now = utcnow()
    rows = [_job_row(tenant_id, spec, now) for spec in specs]
    plain = [r for r in rows if r["idempotency_key"] is None]
    keyed: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["idempotency_key"] is not None:
            keyed.setdefault(r["idempotency_key"], r)  # the first spec with a key wins
    if plain:
        session.execute(insert(_JOBS), plain)
    winners: dict[str, str] = {}
    if keyed:
        dialect = session.get_bind().dialect.name
        session.execute(insert_ignoring(dialect, _JOBS, ["tenant_id", "idempotency_key"]), list(keyed.values()))
        found = session.execute(
            select(Job.idempotency_key, Job.id).where(
                Job.tenant_id == tenant_id, among(_JOBS.c.idempotency_key, list(keyed), dialect)
            )
        )
        winners = {key: job_id for key, job_id in found}
    out: list[CreatedJob] = []
    seen: set[str] = set()
    for r in rows:
        key = r["idempotency_key"]
        if key is None:
            out.append(CreatedJob(r["id"], True))
        else:
            job_id = winners[key]
            created = job_id == r["id"] and job_id not in seen
            seen.add(job_id)
            out.append(CreatedJob(job_id, created))
    return out


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|", 1)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError
        return when, job_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError(f"invalid cursor {cursor!r}: pass the next_cursor of a previous page") from None


def _statuses(status: str | Sequence[str] | None) -> list[str] | None:
    if status is None:
        return None
    wanted = [status] if isinstance(status, str) else list(status)
    bad = [s for s in wanted if s not in JOB_STATUSES]
    if bad:
        raise ValueError(f"unknown job status {bad[0]!r}; statuses are {', '.join(JOB_STATUSES)}")
    return wanted


class JobStore:
    """Jobs and results."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- creation -------------------------------------------------------------------------------

    def create_jobs(self, tenant_id: str, specs: Sequence[JobSpec]) -> list[CreatedJob]:
        """Creates jobs (status ``queued``) in one transaction; returns one entry per spec, in order.

        A spec whose idempotency key the tenant already used gets the existing job back with
        ``created=False`` (also when two specs in the same call share a key). Raises NotFound if a
        spec names a batch the tenant does not own.
        """
        if not specs:
            return []

        def work(s: Session) -> list[CreatedJob]:
            batch_ids = {spec.batch_id for spec in specs if spec.batch_id is not None}
            if batch_ids:
                owned = set(s.scalars(select(Batch.id).where(Batch.id.in_(batch_ids), Batch.tenant_id == tenant_id)))
                if owned != batch_ids:
                    raise NotFound(f"no batch {sorted(batch_ids - owned)[0]!r} for this tenant")
            return insert_jobs(s, tenant_id, specs)

        return self._db.transact(work)

    def create_job(self, tenant_id: str, spec: JobSpec) -> CreatedJob:
        """Creates one job; see ``create_jobs``."""
        return self.create_jobs(tenant_id, [spec])[0]

    # -- reads (tenant-scoped) ------------------------------------------------------------------

    def get_job(self, tenant_id: str, job_id: str) -> Job | None:
        """The tenant's job, or None (also when the job belongs to another tenant)."""
        with self._db.read() as s:
            return s.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))

    def id_for_idempotency_key(self, tenant_id: str, idempotency_key: str) -> str | None:
        """The id of the tenant's job created with this idempotency key, or None."""
        with self._db.read() as s:
            return s.scalar(select(Job.id).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))

    def get_result(self, tenant_id: str, job_id: str) -> Result | None:
        """The result of the tenant's job, or None if it has none yet (or is not the tenant's)."""
        with self._db.read() as s:
            return s.scalar(
                select(Result).join(Job, Job.id == Result.job_id).where(Job.id == job_id, Job.tenant_id == tenant_id)
            )

    def get_usage(self, tenant_id: str, job_id: str) -> Usage | None:
        """The token accounting of the tenant's job, or None."""
        with self._db.read() as s:
            return s.scalar(select(Usage).where(Usage.job_id == job_id, Usage.tenant_id == tenant_id))

    def _filtered(
        self,
        stmt: Select[Any],
        tenant_id: str,
        status: str | Sequence[str] | None,
        batch_id: str | None,
        since: datetime | None,
    ) -> Select[Any]:
        stmt = stmt.where(Job.tenant_id == tenant_id)
        wanted = _statuses(status)
        if wanted is not None:
            stmt = stmt.where(Job.status.in_(wanted))
        if batch_id is not None:
            stmt = stmt.where(Job.batch_id == batch_id)
        if since is not None:
            stmt = stmt.where(Job.created_at >= since)
        return stmt

    def list_jobs(
        self,
        tenant_id: str,
        *,
        status: str | Sequence[str] | None = None,
        batch_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        """The tenant's jobs, newest first, filtered by status(es), batch and creation time.

        ``limit`` is 1 to 1000. Raises ValueError for an unknown status or a malformed cursor.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        stmt = self._filtered(select(Job), tenant_id, status, batch_id, since)
        if cursor is not None:
            when, last_id = _decode_cursor(cursor)
            stmt = stmt.where(or_(Job.created_at < when, (Job.created_at == when) & (Job.id < last_id)))
        stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        with self._db.read() as s:
            jobs = list(s.scalars(stmt))
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return JobPage(jobs, _encode_cursor(jobs[-1]) if more else None)

    def count_jobs(
        self,
        tenant_id: str,
        *,
        status: str | Sequence[str] | None = None,
        batch_id: str | None = None,
        since: datetime | None = None,
    ) -> int:
        """How many of the tenant's jobs match the filters."""
        stmt = self._filtered(select(func.count()).select_from(Job), tenant_id, status, batch_id, since)
        with self._db.read() as s:
            return int(s.scalar(stmt) or 0)

    def count_by_status(self) -> dict[str, int]:
        """How many jobs of every tenant are in each status (for operators' metrics)."""
        stmt = select(Job.status, func.count()).group_by(Job.status)
        with self._db.read() as s:
            counts = {status: 0 for status in JOB_STATUSES}
            counts.update({status: int(n) for status, n in s.execute(stmt)})
            return counts

    def iter_job_ids(
        self,
        tenant_id: str,
        *,
        batch_id: str | None = None,
        status: str | Sequence[str] | None = "queued",
        page_size: int = 1000,
    ) -> Iterator[str]:
        """The ids of the tenant's matching jobs, in id order, fetched a page at a time (e.g. to
        send a batch's tasks to the queue without holding them all)."""
        matching = self._filtered(select(Job.id), tenant_id, status, batch_id, None)
        return paged_ids(self._db, lambda last: matching.where(Job.id > last).order_by(Job.id).limit(page_size),
                         page_size)

    def open_jobs_before(self, *, queued_before: datetime, running_before: datetime,
                         limit: int = 5000) -> list[OpenJob]:
        """Jobs of every tenant still open after a while, oldest first (for the reconciler, which
        checks that Redis still holds their tasks): at most ``limit`` each of interactive jobs
        ``queued`` since before ``queued_before``, of bulk jobs whose batch has been
        ``in_progress`` since before then (a batch's jobs are sent only once it is), and of jobs
        ``running`` since before ``running_before``.

        One index range per tenant and kind of question ((tenant_id, status, created_at)), so the
        cost follows the open jobs, not the whole table."""
        out: list[OpenJob] = []
        with self._db.read() as s:
            tenants = list(s.scalars(select(Tenant.id).order_by(Tenant.id)))
            for kind in JOB_KINDS:
                found: list[tuple[datetime, OpenJob]] = []
                for tenant_id in tenants:
                    stmt = (
                        select(Job.created_at, Job.id, Job.model, Job.kind, Job.status, Job.worker)
                        .where(Job.tenant_id == tenant_id, Job.status == "queued", Job.kind == kind,
                               Job.created_at < queued_before)
                        .order_by(Job.created_at)
                        .limit(limit)
                    )
                    if kind == "bulk":
                        stmt = stmt.join(Batch, Batch.id == Job.batch_id).where(
                            Batch.status == "in_progress", Batch.in_progress_at < queued_before)
                    found += [(row[0], OpenJob(*row[1:])) for row in s.execute(stmt)]
                out += [job for _, job in sorted(found, key=lambda pair: pair[0])[:limit]]
            running: list[tuple[datetime, OpenJob]] = []
            for tenant_id in tenants:
                stmt = (
                    select(Job.started_at, Job.id, Job.model, Job.kind, Job.status, Job.worker, Job.worker_instance)
                    .where(Job.tenant_id == tenant_id, Job.status == "running", Job.started_at < running_before)
                    .order_by(Job.created_at)
                    .limit(limit)
                )
                running += [(row[0], OpenJob(*row[1:])) for row in s.execute(stmt)]
            out += [job for _, job in sorted(running, key=lambda pair: pair[0])[:limit]]
        return out

    def cancel(self, tenant_id: str, job_id: str) -> Job | None:
        """Cancels the tenant's job if it is queued or running; returns the job as it now stands
        (a finished job comes back unchanged), or None if the tenant has no such job."""

        def work(s: Session) -> Job | None:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
                .values(status="cancelled", finished_at=utcnow())
            )
            return s.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))

        return self._db.transact(work)

    # -- worker side (by job id) ----------------------------------------------------------------

    def mark_running(self, job_ids: Sequence[str], worker: str, instance: str | None = None,
                     takeover: Collection[str] | None = None) -> list[JobClaim]:
        """Marks queued (or redelivered running) jobs as running on ``worker`` (process
        ``instance``) and counts the attempt.

        A running job is taken over only when ``takeover`` is None (the caller does not know who
        lives) or its claiming instance is in ``takeover`` (known dead) or unrecorded: a job that a
        live worker process runs is never started a second time. Returns the claims for the jobs
        that may run; a cancelled, finished, unknown or live-owned job is left out, and a job past
        its ``expires_at`` is marked expired and left out.
        """
        if not job_ids:
            return []
        ids = sorted(set(job_ids))
        runnable = _JOBS.c.status.in_(ACTIVE)
        if takeover is not None:
            runnable = or_(_JOBS.c.status == "queued",
                           (_JOBS.c.status == "running") & (_JOBS.c.worker_instance.is_(None)
                                                            | _JOBS.c.worker_instance.in_(sorted(takeover))))

        def work(s: Session) -> list[JobClaim]:
            now = utcnow()
            late = _JOBS.c.expires_at < now
            rows = s.execute(
                update(_JOBS)
                .where(among(_JOBS.c.id, ids, s.get_bind().dialect.name), runnable)
                .values(
                    status=case((late, "expired"), else_="running"),
                    attempts=case((late, _JOBS.c.attempts), else_=_JOBS.c.attempts + 1),
                    started_at=case((late, _JOBS.c.started_at), else_=now),
                    finished_at=case((late, now), else_=None),
                    worker=case((late, _JOBS.c.worker), else_=worker),
                    worker_instance=case((late, _JOBS.c.worker_instance), else_=instance),
                    error_code=case((late, "expired"), else_=None),
                    error_message=case((late, "the job expired before a worker could start it"), else_=None),
                )
                .returning(
                    _JOBS.c.status,
                    _JOBS.c.id,
                    _JOBS.c.tenant_id,
                    _JOBS.c.api_key_id,
                    _JOBS.c.model,
                    _JOBS.c.kind,
                    _JOBS.c.priority,
                    _JOBS.c.request,
                    _JOBS.c.attempts,
                    _JOBS.c.created_at,
                    _JOBS.c.expires_at,
                )
            )
            claims = [JobClaim(*row[1:]) for row in rows if row[0] == "running"]
            tenants = {c.tenant_id for c in claims}
            if tenants:
                weights = dict(s.execute(select(Tenant.id, Tenant.weight).where(Tenant.id.in_(tenants))).all())
                claims = [replace(c, tenant_weight=float(weights.get(c.tenant_id) or 1.0)) for c in claims]
            return sorted(claims, key=lambda c: c.id)

        return self._db.transact(work)

    def running_instances(self, job_ids: Sequence[str]) -> dict[str, str | None]:
        """The claiming instance of each of the given jobs that is ``running`` (None when the claim
        predates instance ids): what a claim checks for liveness before it takes one over."""
        if not job_ids:
            return {}
        ids = sorted(set(job_ids))
        with self._db.read() as s:
            rows = s.execute(select(_JOBS.c.id, _JOBS.c.worker_instance)
                             .where(among(_JOBS.c.id, ids, s.get_bind().dialect.name),
                                    _JOBS.c.status == "running"))
            return {job_id: instance for job_id, instance in rows}

    def requeue_lost(self, instance: str) -> list[str]:
        """Puts the jobs that the lost worker process ``instance`` was running back to ``queued``
        (the attempt stays counted: the process died with it); returns their ids.

        Conditional on the job still being ``running`` under that instance, so when several
        recoverers act on the same lost instance each job changes once, and a job that another
        worker has claimed since (or that finished) is left alone."""

        def work(s: Session) -> list[str]:
            rows = s.execute(
                update(_JOBS)
                .where(_JOBS.c.worker_instance == instance, _JOBS.c.status == "running")
                .values(status="queued", started_at=None, worker=None, worker_instance=None)
                .returning(_JOBS.c.id)
            )
            return sorted(r[0] for r in rows)

        return self._db.transact(work)

    def claimed_by(self, job_ids: Sequence[str], instance: str) -> set[str]:
        """Which of the jobs are still ``running`` under ``instance`` (a worker that lost Redis for
        a while asks which of its jobs were taken over meanwhile)."""
        return {job_id for job_id, owner in self.running_instances(job_ids).items() if owner == instance}

    def record_results(self, finished: Sequence[FinishedJob]) -> RecordOutcome:
        """Records finished jobs: result, usage row, status ``succeeded`` (``expired`` for a job
        stopped at its deadline), all in one transaction.

        Idempotent: a job that already has a result is reported in ``duplicates`` and nothing of it
        is written again (the primary keys of ``results`` and ``usage`` enforce it, so concurrent
        writers of the same job cannot both count). Ids with no job are reported in ``unknown``.
        A job cancelled or expired meanwhile keeps its status, but its result and usage are kept:
        the tokens were spent.
        """
        if not finished:
            return RecordOutcome()
        by_id: dict[str, FinishedJob] = {}
        repeated: list[str] = []
        for f in finished:
            if f.job_id in by_id:
                repeated.append(f.job_id)
            else:
                by_id[f.job_id] = f
        # One lock order for every writer (sorted ids), so concurrent batches cannot deadlock.
        ids = sorted(by_id)
        return self._db.transact(lambda s: _record(s, ids, by_id, repeated))

    def mark_failed(self, failures: Sequence[JobFailure]) -> int:
        """Marks queued or running jobs as failed with their error; returns how many changed."""
        if not failures:
            return 0
        now = utcnow()
        params = [
            {"b_id": f.job_id, "b_code": f.code[:64], "b_message": f.message, "b_now": now}
            for f in sorted(failures, key=lambda f: f.job_id)
        ]
        stmt = (
            update(_JOBS)
            # Literal statuses: an expanding IN cannot be used in an executemany.
            .where(
                _JOBS.c.id == bindparam("b_id"), or_(*(_JOBS.c.status == literal_column(f"'{st}'") for st in ACTIVE))
            )
            .values(
                status="failed",
                error_code=bindparam("b_code"),
                error_message=bindparam("b_message"),
                finished_at=bindparam("b_now"),
            )
        )
        return self._db.transact(lambda s: s.connection().execute(stmt, params).rowcount)

    def requeue(self, job_ids: Sequence[str]) -> int:
        """Puts running jobs back to queued (a retry after a transient failure); returns how many."""
        return self._set_status(job_ids, "queued", ("running",))

    def give_back(self, job_ids: Sequence[str], worker: str, instance: str | None = None) -> int:
        """Puts jobs that ``worker`` (process ``instance``, when given) is running back to
        ``queued`` without counting the attempt (a worker that stops gracefully hands back what it
        could not finish); returns how many."""
        if not job_ids:
            return 0
        ids = sorted(set(job_ids))

        def work(s: Session) -> int:
            where = among(_JOBS.c.id, ids, s.get_bind().dialect.name)
            return s.execute(
                update(_JOBS)
                .where(where, _JOBS.c.status == "running", _JOBS.c.worker == worker,
                       true() if instance is None else _JOBS.c.worker_instance == instance)
                .values(status="queued", attempts=case((_JOBS.c.attempts > 0, _JOBS.c.attempts - 1), else_=0),
                        started_at=None, worker=None, worker_instance=None)
            ).rowcount

        return self._db.transact(work)

    def expire(self, job_ids: Sequence[str]) -> int:
        """Marks queued or running jobs as expired; returns how many changed."""
        return self._set_status(job_ids, "expired", ACTIVE)

    def _set_status(self, job_ids: Sequence[str], status: str, allowed_from: Sequence[str]) -> int:
        if not job_ids:
            return 0
        values: dict[str, Any] = {"status": status}
        if status in ("expired", "cancelled", "failed"):
            values["finished_at"] = utcnow()
        ids = sorted(set(job_ids))

        def work(s: Session) -> int:
            where = among(_JOBS.c.id, ids, s.get_bind().dialect.name)
            return s.execute(update(_JOBS).where(where, _JOBS.c.status.in_(allowed_from)).values(**values)).rowcount

        return self._db.transact(work)


def _record(s: Session, ids: list[str], by_id: dict[str, FinishedJob], repeated: list[str]) -> RecordOutcome:
    if s.get_bind().dialect.name == "postgresql":
        return _record_postgresql(s, ids, by_id, repeated)
    return _record_portable(s, ids, by_id, repeated)


def _record_portable(s: Session, ids: list[str], by_id: dict[str, FinishedJob], repeated: list[str]) -> RecordOutcome:
    """Four statements (read jobs, insert results, insert usage, update jobs), each a bulk one."""
    dialect = s.get_bind().dialect.name
    conn = s.connection()
    jobs = {
        row.id: row
        for row in conn.execute(
            select(_JOBS.c.id, _JOBS.c.tenant_id, _JOBS.c.api_key_id, _JOBS.c.model, _JOBS.c.attempts,
                   _JOBS.c.worker_instance).where(_JOBS.c.id.in_(ids))
        )
    }
    unknown = [i for i in ids if i not in jobs]
    fenced = [i for i in ids if i in jobs and not _owned(by_id[i], jobs[i].worker_instance)]
    known = [i for i in ids if i in jobs and i not in fenced]
    if not known:
        return RecordOutcome([], repeated, unknown, fenced)
    now = utcnow()
    result_rows = [
        {
            "job_id": i,
            "output_text": by_id[i].output_text,
            "finish_reason": by_id[i].finish_reason,
            "token_ids": by_id[i].token_ids,
            "logprobs": by_id[i].logprobs,
            "choices": by_id[i].choices,
            "created_at": now,
        }
        for i in known
    ]
    inserted = set(
        conn.execute(insert_ignoring(dialect, _RESULTS, ["job_id"]).returning(_RESULTS.c.job_id), result_rows).scalars()
    )
    recorded = [i for i in known if i in inserted]
    duplicates = [i for i in known if i not in inserted] + repeated
    if recorded:
        day, hour = now.date(), now.hour
        usage_rows = []
        for i in recorded:
            f, job = by_id[i], jobs[i]
            usage_rows.append(
                {
                    "job_id": i,
                    "tenant_id": job.tenant_id,
                    "api_key_id": job.api_key_id,
                    "model": job.model,
                    "attempt": max(job.attempts, 1),
                    "prompt_tokens": f.prompt_tokens,
                    "cached_prompt_tokens": f.cached_prompt_tokens,
                    "completion_tokens": f.completion_tokens,
                    "queue_ms": f.queue_ms,
                    "ttft_ms": f.ttft_ms,
                    "total_ms": f.total_ms,
                    "worker": f.worker[:200],
                    "device": f.device[:64],
                    "created_at": now,
                    "day": day,
                    "hour": hour,
                }
            )
        conn.execute(insert_ignoring(dialect, _USAGE, ["job_id"]), usage_rows)
        for expired in (False, True):
            ids = [i for i in recorded if by_id[i].expired is expired]
            if ids:
                conn.execute(
                    update(_JOBS)
                    .where(_JOBS.c.id.in_(ids), _JOBS.c.status.in_(ACTIVE))
                    .values(finished_at=now, **_finished_status(expired))
                )
    return RecordOutcome(recorded, duplicates, unknown, fenced)


def _owned(finished: FinishedJob, claimed_by: str | None) -> bool:
    """Fencing: a result carrying its worker instance counts only while that instance holds the job."""
    return finished.worker_instance is None or finished.worker_instance == claimed_by


EXPIRED_MESSAGE = "the job reached its deadline and was stopped; its output so far is kept"


def _finished_status(expired: bool) -> dict[str, Any]:
    if expired:
        return {"status": "expired", "error_code": "expired", "error_message": EXPIRED_MESSAGE}
    return {"status": "succeeded", "error_code": None, "error_message": None}


# PostgreSQL: the whole write is one statement over arrays (one round trip, one plan, and the
# parameters travel as a dozen arrays instead of thousands of scalars). The data-modifying CTEs
# share one snapshot; ON CONFLICT on the primary keys keeps it idempotent under concurrency.
_RECORD_PG = """
WITH input AS (
    SELECT * FROM unnest(
        %(job_id)s::varchar[], %(output_text)s::text[], %(finish_reason)s::varchar[],
        %(token_ids)s::text[], %(logprobs)s::text[], %(choices)s::text[], %(prompt_tokens)s::int[],
        %(cached_prompt_tokens)s::int[], %(completion_tokens)s::int[], %(queue_ms)s::float8[],
        %(ttft_ms)s::float8[], %(total_ms)s::float8[], %(worker)s::varchar[], %(device)s::varchar[],
        %(expired)s::bool[], %(worker_instance)s::varchar[]
    ) AS t(job_id, output_text, finish_reason, token_ids, logprobs, choices, prompt_tokens,
           cached_prompt_tokens, completion_tokens, queue_ms, ttft_ms, total_ms, worker, device, expired,
           writer_instance)
), known AS (
    -- OFFSET 0 keeps the lookup a primary-key probe per finished job, whatever the statistics say
    -- (a freshly loaded jobs table has none, and a hash join would scan all of it).
    -- owned: fencing (a result carrying its writer's instance counts only while that instance
    -- still holds the job).
    SELECT input.*, j.tenant_id, j.api_key_id, j.model, j.attempts,
           (input.writer_instance IS NULL OR input.writer_instance IS NOT DISTINCT FROM j.worker_instance) AS owned
    FROM input CROSS JOIN LATERAL (
        SELECT tenant_id, api_key_id, model, attempts, worker_instance FROM jobs
        WHERE jobs.id = input.job_id OFFSET 0
    ) j
), inserted AS (
    INSERT INTO results (job_id, output_text, finish_reason, token_ids, logprobs, choices, created_at)
    SELECT job_id, output_text, finish_reason, token_ids::json, logprobs::json, choices::json, %(now)s
    FROM known WHERE owned ORDER BY job_id
    ON CONFLICT (job_id) DO NOTHING
    RETURNING job_id
), counted AS (
    INSERT INTO usage (job_id, tenant_id, api_key_id, model, attempt, prompt_tokens,
                       cached_prompt_tokens, completion_tokens, queue_ms, ttft_ms, total_ms,
                       worker, device, created_at, day, hour)
    SELECT k.job_id, k.tenant_id, k.api_key_id, k.model, greatest(k.attempts, 1), k.prompt_tokens,
           k.cached_prompt_tokens, k.completion_tokens, k.queue_ms, k.ttft_ms, k.total_ms,
           k.worker, k.device, %(now)s, %(day)s, %(hour)s
    FROM known k JOIN inserted USING (job_id) ORDER BY k.job_id
    ON CONFLICT (job_id) DO NOTHING
), finished AS (
    UPDATE jobs SET status = CASE WHEN input.expired THEN 'expired' ELSE 'succeeded' END,
                    finished_at = %(now)s,
                    error_code = CASE WHEN input.expired THEN 'expired' END,
                    error_message = CASE WHEN input.expired THEN %(expired_message)s END
    FROM inserted JOIN input USING (job_id)
    WHERE jobs.id = inserted.job_id AND jobs.status IN ('queued', 'running')
)
SELECT known.job_id, inserted.job_id IS NOT NULL, known.owned FROM known LEFT JOIN inserted USING (job_id)
"""


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _record_postgresql(s: Session, ids: list[str], by_id: dict[str, FinishedJob], repeated: list[str]) -> RecordOutcome:
    now = utcnow()
    done = [by_id[i] for i in ids]
    params = {
        "job_id": ids,
        # PostgreSQL text cannot hold NUL; a model can emit it (a byte token), so it is replaced.
        "output_text": [f.output_text.replace("\x00", "\ufffd") for f in done],
        "finish_reason": [f.finish_reason for f in done],
        "token_ids": [_json_or_none(f.token_ids) for f in done],
        "logprobs": [_json_or_none(f.logprobs) for f in done],
        "choices": [_json_or_none(f.choices) for f in done],
        "prompt_tokens": [f.prompt_tokens for f in done],
        "cached_prompt_tokens": [f.cached_prompt_tokens for f in done],
        "completion_tokens": [f.completion_tokens for f in done],
        "queue_ms": [float(f.queue_ms) for f in done],
        "ttft_ms": [float(f.ttft_ms) for f in done],
        "total_ms": [float(f.total_ms) for f in done],
        "worker": [f.worker[:200] for f in done],
        "device": [f.device[:64] for f in done],
        "expired": [f.expired for f in done],
        "worker_instance": [f.worker_instance for f in done],
        "expired_message": EXPIRED_MESSAGE,
        "now": now,
        "day": now.date(),
        "hour": now.hour,
    }
    rows = list(s.connection().exec_driver_sql(_RECORD_PG, params))
    status: dict[str, bool] = {row[0]: row[1] for row in rows}
    fenced = sorted(row[0] for row in rows if not row[2])
    recorded = [i for i in ids if status.get(i) is True]
    duplicates = [i for i in ids if status.get(i) is False and i not in fenced] + repeated
    unknown = [i for i in ids if i not in status]
    return RecordOutcome(recorded, duplicates, unknown, fenced)
