"""Batches (OpenAI Batches API): lifecycle, the jobs of an ingestion, counts.

The store takes a batch's jobs already checked (the batch-line rules live with the API, in
api/batch_lines.py); here ingestion is three steps: start, add groups of jobs, finish.

Lifecycle::

    validating -> in_progress -> finalizing -> completed
         |             |             +-------> failed | expired
         +-> failed    +-> expired
         +-> cancelling <-+ (from validating, in_progress or finalizing) -> cancelled

While a batch runs its request counts are counted from its jobs; when it reaches a final state
they are written into the batch row.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import InvalidTransition, NotFound
from store.files import FileStore
from store.jobs import insert_jobs
from store.models import Batch, Job, Result, Usage
from store.sql import new_id, paged_ids, utcnow
from store.types import BatchCounts, JobSpec

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
FINAL = ("completed", "failed", "expired", "cancelled")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "validating": ("in_progress", "failed", "cancelling"),
    "in_progress": ("finalizing", "expired", "cancelling"),
    "finalizing": ("completed", "failed", "expired", "cancelling"),
    "cancelling": ("cancelled",),
}
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")


def _window(completion_window: str) -> timedelta:
    m = _WINDOW.match(completion_window)
    if not m:
        raise ValueError(f"completion_window {completion_window!r} must be hours, like '24h'")
    return timedelta(hours=int(m.group(1)))


def _locked_status(s: Session, tenant_id: str, batch_id: str) -> str | None:
    """The tenant's batch's status, its row locked until the transaction ends (None: no such batch)."""
    return s.scalar(select(Batch.status).where(Batch.id == batch_id, Batch.tenant_id == tenant_id).with_for_update())


def _left_validating(s: Session, tenant_id: str, batch_id: str) -> str | None:
    """None while the batch is ``validating`` (its row now locked until the transaction ends);
    otherwise the status it moved to ("deleted" if gone). A batch cancelled while it was being
    ingested keeps no queued job: its cancel may have run before the last jobs were inserted."""
    status = _locked_status(s, tenant_id, batch_id)
    if status == "validating":
        return None
    if status in ("cancelling", "cancelled"):
        s.execute(update(Job).where(Job.batch_id == batch_id, Job.status == "queued")
                  .values(status="cancelled", finished_at=utcnow()))
    return status or "deleted"


def _counts(s: Session, batch: Batch) -> BatchCounts:
    if batch.status in FINAL:
        done = batch.completed + batch.failed
        return BatchCounts(batch.total, batch.completed, batch.failed, max(batch.total - done, 0), 0)
    rows = dict(s.execute(select(Job.status, func.count()).where(Job.batch_id == batch.id).group_by(Job.status)).all())
    return BatchCounts(
        total=batch.total,
        completed=rows.get("succeeded", 0),
        failed=rows.get("failed", 0) + rows.get("expired", 0),
        cancelled=rows.get("cancelled", 0),
        pending=rows.get("queued", 0) + rows.get("running", 0),
    )


class BatchStore:
    """Batches, their jobs and their counts."""

    def __init__(self, db: Database, files: FileStore) -> None:
        self._db = db
        self._files = files

    def create(
        self,
        tenant_id: str,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        api_key_id: str | None = None,
        webhook_url: str | None = None,
    ) -> Batch:
        """Creates a batch in ``validating`` status over one of the tenant's ``batch`` files
        (``webhook_url``, already checked: where to POST the batch once it ends).

        Raises NotFound if the tenant has no such uploaded file, ValueError for a file of another
        purpose, an endpoint not in ENDPOINTS or a malformed completion window.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint {endpoint!r} is not supported; use one of {', '.join(ENDPOINTS)}")
        window = _window(completion_window)
        file = self._files.get(tenant_id, input_file_id)
        if file is None or file.status != "uploaded":
            raise NotFound(f"no file {input_file_id!r} for this tenant; upload it with purpose 'batch' first")
        if file.purpose != "batch":
            raise ValueError(f"file {input_file_id!r} has purpose {file.purpose!r}; a batch input needs 'batch'")
        now = utcnow()
        batch = Batch(
            id=new_id("batch_"),
            tenant_id=tenant_id,
            api_key_id=api_key_id,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            status="validating",
            metadata_=metadata,
            errors=None,
            total=0,
            completed=0,
            failed=0,
            created_at=now,
            expires_at=now + window,
            webhook_url=webhook_url,
            webhook_status="pending" if webhook_url else None,
        )
        self._db.transact(lambda s: s.add(batch))
        return batch

    def get(self, tenant_id: str, batch_id: str) -> Batch | None:
        """The tenant's batch, or None."""
        with self._db.read() as s:
            return s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))

    def list_batches(self, tenant_id: str, *, limit: int = 20, after: str | None = None) -> list[Batch]:
        """The tenant's batches, newest first; ``after`` is the id of the last batch of the previous page."""
        stmt = select(Batch).where(Batch.tenant_id == tenant_id)
        with self._db.read() as s:
            if after is not None:
                anchor = s.scalar(select(Batch).where(Batch.id == after, Batch.tenant_id == tenant_id))
                if anchor is None:
                    raise NotFound(f"no batch {after!r} for this tenant to list after")
                stmt = stmt.where(
                    (Batch.created_at < anchor.created_at)
                    | ((Batch.created_at == anchor.created_at) & (Batch.id < anchor.id))
                )
            return list(s.scalars(stmt.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))

    def list_open(self, *, limit: int = 1000) -> list[Batch]:
        """Batches of every tenant that still need attention, oldest first (for the process that
        moves batches along): not final, or final (cancelled or expired) with no output file yet.
        """
        stmt = (
            select(Batch)
            .where(
                Batch.status.not_in(FINAL)
                | (Batch.status.in_(("cancelled", "expired")) & Batch.output_file_id.is_(None))
            )
            .order_by(Batch.created_at, Batch.id)
            .limit(limit)
        )
        with self._db.read() as s:
            return list(s.scalars(stmt))

    def attach_files(
        self, tenant_id: str, batch_id: str, *, output_file_id: str | None, error_file_id: str | None
    ) -> Batch:
        """Sets the output and error files of a batch that ended cancelled or expired (the requests
        that ran before it stopped are kept). Raises NotFound, or InvalidTransition for a batch in
        another status."""

        def work(s: Session) -> Batch:
            batch = s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))
            if batch is None:
                raise NotFound(f"no batch {batch_id!r} for this tenant")
            if batch.status not in ("cancelled", "expired"):
                raise InvalidTransition(f"batch {batch_id} is {batch.status}; files attach only to a cancelled or expired batch")
            s.execute(
                update(Batch)
                .where(Batch.id == batch_id)
                .values(output_file_id=output_file_id, error_file_id=error_file_id)
            )
            s.refresh(batch)
            return batch

        return self._db.transact(work)

    def token_totals(self, tenant_id: str, batch_id: str) -> tuple[int, int, int]:
        """Prompt, cached prompt and completion tokens spent so far by the batch's requests."""
        stmt = (
            select(
                func.coalesce(func.sum(Usage.prompt_tokens), 0),
                func.coalesce(func.sum(Usage.cached_prompt_tokens), 0),
                func.coalesce(func.sum(Usage.completion_tokens), 0),
            )
            .select_from(Job)
            .join(Usage, Usage.job_id == Job.id)
            .where(Job.batch_id == batch_id, Job.tenant_id == tenant_id)
        )
        with self._db.read() as s:
            row = s.execute(stmt).one()
            return int(row[0]), int(row[1]), int(row[2])

    def count_batches(self, tenant_id: str) -> int:
        """How many batches the tenant has."""
        with self._db.read() as s:
            return int(s.scalar(select(func.count()).select_from(Batch).where(Batch.tenant_id == tenant_id)) or 0)

    def counts(self, tenant_id: str, batch_id: str) -> BatchCounts | None:
        """The batch's request counts, or None if the tenant has no such batch."""
        with self._db.read() as s:
            batch = s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))
            return None if batch is None else _counts(s, batch)

    def job_by_custom_id(self, tenant_id: str, batch_id: str, custom_id: str) -> Job | None:
        """The batch's job for one input line, or None."""
        with self._db.read() as s:
            return s.scalar(
                select(Job).where(Job.batch_id == batch_id, Job.custom_id == custom_id, Job.tenant_id == tenant_id)
            )

    # -- ingestion ----------------------------------------------------------------------------
    # The API reads the input file and checks its lines (api/batch_ingest.py); the store takes the
    # good lines' jobs in three plain steps: start, add groups of jobs, finish. Every write locks
    # the batch row and checks that it is still validating: a cancel (which takes the same lock,
    # then cancels the batch's queued jobs) either comes first and stops the ingestion, or comes
    # after and cancels what was inserted. No job of a batch cancelled while validating is ever
    # left queued, so none is ever sent.

    def start_ingest(self, tenant_id: str, batch_id: str) -> Batch:
        """Readies a ``validating`` batch for ingestion and returns it; jobs left by an ingestion
        that died half-way are deleted (it starts over). Raises NotFound (no such batch, or its
        input file was deleted) or InvalidTransition (the batch is not ``validating``)."""
        batch = self.get(tenant_id, batch_id)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r} for this tenant")
        if batch.status != "validating":
            raise InvalidTransition(f"batch {batch_id} is {batch.status}; only a validating batch can be ingested")
        if batch.input_file_id is None:
            raise NotFound(f"the input file of batch {batch_id} was deleted")
        self._db.transact(lambda s: self._start_over(s, tenant_id, batch_id))
        return batch

    def add_jobs(self, tenant_id: str, batch_id: str, specs: Sequence[JobSpec]) -> str | None:
        """Inserts one group of the batch's jobs (each spec's ``batch_id`` is this batch) while it
        is ``validating``, and returns None. A batch that left ``validating`` meanwhile gets
        nothing inserted, its queued jobs cancelled, and its status returned ("deleted" if gone)."""
        if any(spec.batch_id != batch_id for spec in specs):
            raise ValueError(f"every job added to batch {batch_id} must name it as its batch_id")

        def work(s: Session) -> str | None:
            left = _left_validating(s, tenant_id, batch_id)
            if left is None:
                insert_jobs(s, tenant_id, specs)
            return left

        return self._db.transact(work)

    def finish_ingest(self, tenant_id: str, batch_id: str, *, total: int, errors: list[dict[str, Any]]) -> str | None:
        """Ends the ingestion and returns None: with no ``errors`` the batch moves to
        ``in_progress`` holding ``total`` requests; with errors its jobs are deleted and it moves to
        ``failed``, ``errors`` stored as its ``errors`` (OpenAI's ``{"code", "message", "line"}``
        entries). A batch that left ``validating`` meanwhile keeps no queued job and its status is
        returned ("deleted" if gone)."""

        def work(s: Session) -> str | None:
            left = _left_validating(s, tenant_id, batch_id)
            if left is not None:
                return left
            now = utcnow()
            if errors:
                s.execute(delete(Job).where(Job.batch_id == batch_id, Job.tenant_id == tenant_id))
                s.execute(update(Batch).where(Batch.id == batch_id)
                          .values(status="failed", errors=errors, failed_at=now, total=0))
            else:
                s.execute(update(Batch).where(Batch.id == batch_id)
                          .values(status="in_progress", total=total, in_progress_at=now))
            return None

        return self._db.transact(work)

    @staticmethod
    def _start_over(s: Session, tenant_id: str, batch_id: str) -> None:
        status = _locked_status(s, tenant_id, batch_id)
        if status != "validating":
            raise InvalidTransition(f"batch {batch_id} is {status}; only a validating batch can be ingested")
        s.execute(delete(Job).where(Job.batch_id == batch_id, Job.tenant_id == tenant_id))

    def queued_job_ids(self, tenant_id: str, batch_id: str, *, page_size: int = 1000) -> Iterator[str]:
        """The ids of the batch's queued jobs, in id order, a page at a time, for sending their
        tasks; only while the batch is ``in_progress``: once it is cancelled (or expired) the next
        page is empty, so a batch that left ``in_progress`` has nothing more sent."""
        queued = (
            select(Job.id)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.batch_id == batch_id, Job.tenant_id == tenant_id, Job.status == "queued",
                   Batch.status == "in_progress")
        )
        return paged_ids(self._db, lambda last: queued.where(Job.id > last).order_by(Job.id).limit(page_size),
                         page_size)

    # -- lifecycle ------------------------------------------------------------------------------

    def transition(self, tenant_id: str, batch_id: str, status: str, **fields: str | None) -> Batch:
        """Moves the batch to ``status`` (see TRANSITIONS), stamping ``<status>_at``.

        ``fields`` may set ``output_file_id`` and ``error_file_id`` (e.g. when completing).
        Entering a final state writes the request counts into the batch. Raises NotFound or
        InvalidTransition (whose message names the current status and the allowed next ones).
        """
        allowed = {"output_file_id", "error_file_id"}
        if set(fields) - allowed:
            raise ValueError(f"transition can only set {', '.join(sorted(allowed))}")
        return self._db.transact(lambda s: self._transition(s, tenant_id, batch_id, status, dict(fields)))

    def _transition(self, s: Session, tenant_id: str, batch_id: str, status: str, fields: dict[str, Any]) -> Batch:
        batch = s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id).with_for_update())
        if batch is None:
            raise NotFound(f"no batch {batch_id!r} for this tenant")
        nexts = TRANSITIONS.get(batch.status, ())
        if status not in nexts:
            raise InvalidTransition(
                f"batch {batch_id} is {batch.status}; it can move to "
                + (", ".join(nexts) if nexts else "nothing (it is final)")
                + f", not {status}"
            )
        if status in FINAL:
            counts = _counts(s, batch)
            fields.update(completed=counts.completed, failed=counts.failed)
        fields.update(status=status, **{f"{status}_at": utcnow()})
        s.execute(update(Batch).where(Batch.id == batch_id).values(**fields))
        s.refresh(batch)
        return batch

    def cancel(self, tenant_id: str, batch_id: str) -> Batch:
        """Cancels the batch: its queued jobs are cancelled at once; the batch is ``cancelling``
        while some jobs still run, and ``cancelled`` when none do. A final batch is returned as is.
        Raises NotFound if the tenant has no such batch."""

        def work(s: Session) -> Batch:
            batch = s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))
            if batch is None:
                raise NotFound(f"no batch {batch_id!r} for this tenant")
            if batch.status in FINAL:
                return batch
            if batch.status != "cancelling":
                batch = self._transition(s, tenant_id, batch_id, "cancelling", {})
            s.execute(
                update(Job)
                .where(Job.batch_id == batch_id, Job.status == "queued")
                .values(status="cancelled", finished_at=utcnow())
            )
            return self._advance(s, batch)

        return self._db.transact(work)

    def advance(self, tenant_id: str, batch_id: str) -> Batch:
        """Moves a running batch along when its jobs say so, and returns it:
        ``in_progress`` with no pending job -> ``finalizing``; ``in_progress`` past its window ->
        its queued jobs expire and the batch is ``expired``; ``cancelling`` with nothing running ->
        ``cancelled``. Call it when jobs of the batch finish (cheap; idempotent)."""

        def work(s: Session) -> Batch:
            batch = s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))
            if batch is None:
                raise NotFound(f"no batch {batch_id!r} for this tenant")
            return self._advance(s, batch)

        return self._db.transact(work)

    def _advance(self, s: Session, batch: Batch) -> Batch:
        if batch.status not in ("in_progress", "cancelling"):
            return batch
        pending = dict(
            s.execute(
                select(Job.status, func.count())
                .where(Job.batch_id == batch.id, Job.status.in_(("queued", "running")))
                .group_by(Job.status)
            ).all()
        )
        if batch.status == "cancelling":
            if not pending.get("running"):
                return self._transition(s, batch.tenant_id, batch.id, "cancelled", {})
            return batch
        now = utcnow()
        if pending and batch.expires_at is not None and batch.expires_at <= now:
            s.execute(
                update(Job)
                .where(Job.batch_id == batch.id, Job.status == "queued")
                .values(
                    status="expired",
                    finished_at=now,
                    error_code="batch_expired",
                    error_message="the batch's completion window ended before this request ran",
                )
            )
            return self._transition(s, batch.tenant_id, batch.id, "expired", {})
        if not pending:
            return self._transition(s, batch.tenant_id, batch.id, "finalizing", {})
        return batch

    def iter_outcomes(
        self, tenant_id: str, batch_id: str, *, page_size: int = 500
    ) -> Iterator[tuple[Job, Result | None, Usage | None]]:
        """Each job of the batch with its result and usage (None where missing), in job id order
        (for a batch's jobs, the order of its input lines: `store.sql.batch_job_id`),
        a page at a time: what an output or error file is built from. Raises NotFound at once."""
        if self.get(tenant_id, batch_id) is None:
            raise NotFound(f"no batch {batch_id!r} for this tenant")
        return self._outcomes(tenant_id, batch_id, page_size)

    def _outcomes(
        self, tenant_id: str, batch_id: str, page_size: int
    ) -> Iterator[tuple[Job, Result | None, Usage | None]]:
        last = ""
        while True:
            stmt = (
                select(Job, Result, Usage)
                .outerjoin(Result, Result.job_id == Job.id)
                .outerjoin(Usage, Usage.job_id == Job.id)
                .where(Job.batch_id == batch_id, Job.tenant_id == tenant_id, Job.id > last)
                .order_by(Job.id)
                .limit(page_size)
            )
            with self._db.read() as s:
                rows: list[tuple[Job, Result | None, Usage | None]] = [(r[0], r[1], r[2]) for r in s.execute(stmt)]
            yield from rows
            if len(rows) < page_size:
                return
            last = rows[-1][0].id
