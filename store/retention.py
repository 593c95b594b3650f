"""Retention: purging a tenant's finished work once it is older than its retention.

What goes: finished jobs (with their results), finished batches (with their jobs and output and
error files), and files, once older than the tenant's ``retention_days`` (or the operator's
default). What stays: the accounting. A purged job's usage row is folded into ``usage_hourly``
(summed per tenant, key, model and UTC hour) in the same transaction that deletes the job, so
usage totals never change.

Everything is done in small transactions (``CHUNK`` rows each) found through indexes, so writers
are never blocked for long and a purge stopped half-way simply resumes on the next run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.orm import Session

from store.db import Database
from store.models import Batch, File, Job, Tenant, Usage, UsageHourly
from store.sql import among, utcnow

CHUNK = 500
FINISHED_JOBS = ("succeeded", "failed", "cancelled", "expired")
FINISHED_BATCHES = ("completed", "failed", "expired", "cancelled")

_USAGE = cast(Table, Usage.__table__)
_HOURLY = cast(Table, UsageHourly.__table__)


@dataclass
class PurgeReport:
    """What a purge removed."""

    jobs: int = 0
    batches: int = 0
    files: int = 0
    usage_rows_folded: int = 0

    def add(self, other: "PurgeReport") -> None:
        self.jobs += other.jobs
        self.batches += other.batches
        self.files += other.files
        self.usage_rows_folded += other.usage_rows_folded


def _fold_and_delete_jobs(s: Session, ids: list[str]) -> int:
    """Moves the jobs' usage into the hourly sums and deletes the jobs (their results go with them
    by cascade); returns how many usage rows were folded."""
    dialect = s.get_bind().dialect.name
    where = among(_USAGE.c.job_id, ids, dialect)
    sums = select(_USAGE.c.tenant_id, _USAGE.c.api_key_id, _USAGE.c.model, _USAGE.c.day, _USAGE.c.hour,
                  func.count(), func.sum(_USAGE.c.prompt_tokens), func.sum(_USAGE.c.cached_prompt_tokens),
                  func.sum(_USAGE.c.completion_tokens)).where(where).group_by(
        _USAGE.c.tenant_id, _USAGE.c.api_key_id, _USAGE.c.model, _USAGE.c.day, _USAGE.c.hour)
    s.execute(insert(_HOURLY).from_select(
        ["tenant_id", "api_key_id", "model", "day", "hour", "requests", "prompt_tokens", "cached_prompt_tokens",
         "completion_tokens"], sums))
    folded = s.execute(delete(_USAGE).where(where)).rowcount
    s.execute(delete(Job).where(among(cast(Table, Job.__table__).c.id, ids, dialect)))
    return int(folded)


class RetentionStore:
    """Purges finished work past each tenant's retention."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def purge(self, default_days: int, *, now: datetime | None = None, tenant_id: str | None = None) -> PurgeReport:
        """Purges every tenant's (or one tenant's) finished jobs, batches and files older than its
        retention (``retention_days``, else ``default_days``)."""
        if default_days < 1:
            raise ValueError(f"the default retention must be at least 1 day, got {default_days}")
        now = now or utcnow()
        with self._db.read() as s:
            stmt = select(Tenant.id, Tenant.retention_days).order_by(Tenant.id)
            if tenant_id is not None:
                stmt = stmt.where(Tenant.id == tenant_id)
            tenants = list(s.execute(stmt))
        report = PurgeReport()
        for tid, days in tenants:
            report.add(self.purge_tenant(tid, now - timedelta(days=days or default_days)))
        return report

    def purge_tenant(self, tenant_id: str, cutoff: datetime) -> PurgeReport:
        """Purges the tenant's work finished before ``cutoff``, a chunk per transaction."""
        report = PurgeReport()
        # Batches first: their jobs, then the batch and its output files.
        finished_at = func.coalesce(Batch.completed_at, Batch.failed_at, Batch.expired_at, Batch.cancelled_at)
        while True:
            with self._db.read() as s:
                batch = s.execute(select(Batch.id, Batch.output_file_id, Batch.error_file_id).where(
                    Batch.tenant_id == tenant_id, Batch.status.in_(FINISHED_BATCHES), finished_at < cutoff)
                    .limit(1)).first()
            if batch is None:
                break
            batch_id, *files = batch
            report.add(self._purge_jobs(select(Job.id).where(Job.tenant_id == tenant_id, Job.batch_id == batch_id)))

            def drop_batch(s: Session, batch_id: str = batch_id, files: list[Any] = files) -> None:
                s.execute(delete(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))
                kept = [f for f in files if f is not None]
                if kept:
                    s.execute(delete(File).where(File.id.in_(kept), File.tenant_id == tenant_id))

            self._db.transact(drop_batch)
            report.batches += 1
            report.files += sum(1 for f in files if f is not None)
        # Jobs sent one by one.
        report.add(self._purge_jobs(select(Job.id).where(
            Job.tenant_id == tenant_id, Job.batch_id.is_(None), Job.status.in_(FINISHED_JOBS),
            Job.finished_at < cutoff)))
        # Files, unless an unfinished batch still reads one.
        open_inputs = select(Batch.input_file_id).where(
            Batch.tenant_id == tenant_id, Batch.status.not_in(FINISHED_BATCHES), Batch.input_file_id.is_not(None))
        while True:
            with self._db.read() as s:
                ids = list(s.scalars(select(File.id).where(
                    File.tenant_id == tenant_id, File.created_at < cutoff, File.id.not_in(open_inputs))
                    .limit(CHUNK)))
            if not ids:
                break
            self._db.transact(lambda s, ids=ids: s.execute(delete(File).where(File.id.in_(ids))))
            report.files += len(ids)
        return report

    def _purge_jobs(self, matching: Any) -> PurgeReport:
        report = PurgeReport()
        while True:
            with self._db.read() as s:
                ids = list(s.scalars(matching.limit(CHUNK)))
            if not ids:
                return report
            report.usage_rows_folded += self._db.transact(lambda s, ids=ids: _fold_and_delete_jobs(s, ids))
            report.jobs += len(ids)
