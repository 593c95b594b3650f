"""Limits of tenants and keys, and the SQL side of what counts against them: tokens spent in a
period, tokens held by open jobs, open jobs, and the finished jobs whose reservations are to be
settled. The live counters are in Redis (the API's `api.limits`); these are what they start from
and are checked against."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import NotFound
from store.models import ApiKey, Batch, Job, Tenant, Usage, UsageHourly
from store.types import Settlement

OPEN = ("queued", "running")


def _counted(stmt: Select[Any]) -> Select[Any]:
    """Leaves out the jobs of a batch still being ingested: their reservation is made (or refused)
    only once the whole file is read."""
    return stmt.outerjoin(Batch, Batch.id == Job.batch_id).where(
        or_(Job.batch_id.is_(None), Batch.status != "validating"))


class LimitStore:
    """Per-tenant and per-key limits and retention, and the sums the limit counters reconcile with."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- settings ----------------------------------------------------------------------------------
    def set_tenant_limits(self, tenant_id: str, limits: dict[str, Any] | None) -> Tenant:
        """Replaces the tenant's limits (already validated; None or {}: none). NotFound if unknown."""

        def work(s: Session) -> Tenant:
            n = s.execute(update(Tenant).where(Tenant.id == tenant_id).values(limits=limits or None)).rowcount
            if n != 1:
                raise NotFound(f"no tenant {tenant_id!r}")
            return s.get_one(Tenant, tenant_id)

        return self._db.transact(work)

    def set_key_limits(self, tenant_id: str, key_id: str, limits: dict[str, Any] | None) -> ApiKey:
        """Replaces the limits of the tenant's key. NotFound if the tenant has no such key."""

        def work(s: Session) -> ApiKey:
            n = s.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id)
                          .values(limits=limits or None)).rowcount
            if n != 1:
                raise NotFound(f"no key {key_id!r} for tenant {tenant_id!r}")
            return s.get_one(ApiKey, key_id)

        return self._db.transact(work)

    def set_retention(self, tenant_id: str, days: int | None) -> Tenant:
        """Sets how many days the tenant's finished work is kept (None: the operator's default)."""
        if days is not None and days < 1:
            raise ValueError(f"retention_days must be at least 1, got {days}")

        def work(s: Session) -> Tenant:
            n = s.execute(update(Tenant).where(Tenant.id == tenant_id).values(retention_days=days)).rowcount
            if n != 1:
                raise NotFound(f"no tenant {tenant_id!r}")
            return s.get_one(Tenant, tenant_id)

        return self._db.transact(work)

    def set_weight(self, tenant_id: str, weight: float) -> Tenant:
        """Sets the tenant's fair-share weight (positive; 1 is the default)."""
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")

        def work(s: Session) -> Tenant:
            n = s.execute(update(Tenant).where(Tenant.id == tenant_id).values(weight=weight)).rowcount
            if n != 1:
                raise NotFound(f"no tenant {tenant_id!r}")
            return s.get_one(Tenant, tenant_id)

        return self._db.transact(work)

    def key_limits(self, key_id: str) -> dict[str, Any] | None:
        """The key's own limits (None: none)."""
        with self._db.read() as s:
            return s.scalar(select(ApiKey.limits).where(ApiKey.id == key_id))

    # -- what counts against them ------------------------------------------------------------------
    def spent_tokens(self, tenant_id: str, *, since: date, api_key_id: str | None = None) -> int:
        """Prompt plus completion tokens of the tenant's (or the key's) usage on UTC days from
        ``since`` on, purged jobs' hourly sums included."""
        total = 0
        with self._db.read() as s:
            for table in (Usage, UsageHourly):
                stmt = select(func.coalesce(func.sum(table.prompt_tokens + table.completion_tokens), 0)).where(
                    table.tenant_id == tenant_id, table.day >= since)
                if api_key_id is not None:
                    stmt = stmt.where(table.api_key_id == api_key_id)
                total += int(s.scalar(stmt) or 0)
        return total

    def held_tokens(self, tenant_id: str, *, api_key_id: str | None = None, bulk: bool | None = None) -> int:
        """Tokens reserved by the tenant's (or the key's) open jobs (``bulk``: only batch jobs, or
        only the others)."""
        stmt = _counted(select(func.coalesce(func.sum(Job.reserved_tokens), 0)).select_from(Job).where(
            Job.tenant_id == tenant_id, Job.status.in_(OPEN)))
        if api_key_id is not None:
            stmt = stmt.where(Job.api_key_id == api_key_id)
        if bulk is not None:
            stmt = stmt.where(Job.batch_id.is_not(None) if bulk else Job.batch_id.is_(None))
        with self._db.read() as s:
            return int(s.scalar(stmt) or 0)

    def open_jobs(self, tenant_id: str, *, api_key_id: str | None = None) -> int:
        """The tenant's (or the key's) open jobs submitted one by one (batch jobs not counted)
        that hold a reservation."""
        stmt = select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant_id, Job.status.in_(OPEN), Job.batch_id.is_(None),
            Job.reserved_tokens.is_not(None))
        if api_key_id is not None:
            stmt = stmt.where(Job.api_key_id == api_key_id)
        with self._db.read() as s:
            return int(s.scalar(stmt) or 0)

    def finished_since(self, since: datetime, *, limit: int = 5000) -> list[Settlement]:
        """Jobs with a reservation that finished at or after ``since``, oldest first, with the
        tokens they spent: their usage row's prompt plus completion tokens; 0 for a job that
        produced nothing; a job cancelled while it ran may still get its usage row later (the
        worker records what it spent), so it keeps its whole reservation (an over-count, never an
        under-count)."""
        stmt = (
            select(Job.id, Job.tenant_id, Job.reserved_tokens, Usage.prompt_tokens + Usage.completion_tokens,
                   Job.status, Job.started_at, Job.finished_at)
            .outerjoin(Usage, Usage.job_id == Job.id)
            .where(Job.finished_at >= since, Job.reserved_tokens.is_not(None))
            .order_by(Job.finished_at)
            .limit(limit)
        )
        out = []
        with self._db.read() as s:
            for job_id, tenant_id, reserved, spent, status, started_at, finished_at in s.execute(stmt):
                if spent is None:
                    spent = reserved if status == "cancelled" and started_at is not None else 0
                out.append(Settlement(job_id, tenant_id, int(reserved), int(spent), finished_at))
        return out
