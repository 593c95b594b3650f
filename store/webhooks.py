"""Completion webhooks, the SQL side: tenants' webhook settings, and the delivery outbox.

A job or batch with a webhook carries ``webhook_status = 'pending'`` from its creation. Once it is
final, the API's webhook loop composes its body and queues a delivery row here, in the same
transaction that moves the job's webhook status to ``queued``; deliveries are then attempted
until one succeeds or their time is up. Nothing is lost between the steps: each is a committed
row state that the next pass picks up again.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import NotFound
from store.models import Batch, Job, Tenant, WebhookDelivery
from store.sql import insert_ignoring, new_id, utcnow

FINAL_JOBS = ("succeeded", "failed", "cancelled", "expired")
FINAL_BATCHES = ("completed", "failed", "expired", "cancelled")


def new_secret() -> str:
    """A fresh signing secret in the Standard Webhooks form: ``whsec_`` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass(frozen=True)
class NewDelivery:
    """A delivery to queue for a final job or batch."""

    tenant_id: str
    url: str
    event_type: str
    body: str
    job_id: str | None = None
    batch_id: str | None = None


class WebhookStore:
    """Webhook settings of tenants and the delivery outbox."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- tenant settings ---------------------------------------------------------------------------
    def set_tenant_webhook(self, tenant_id: str, url: str | None) -> Tenant:
        """Sets the tenant's default webhook URL (None: none); a secret is made on first use."""

        def work(s: Session) -> Tenant:
            tenant = s.get(Tenant, tenant_id, with_for_update=True)
            if tenant is None:
                raise NotFound(f"no tenant {tenant_id!r}")
            tenant.webhook_url = url
            if tenant.webhook_secret is None:
                tenant.webhook_secret = new_secret()
            return tenant

        return self._db.transact(work)

    def secret(self, tenant_id: str, *, rotate: bool = False) -> str:
        """The tenant's signing secret (made on first use; ``rotate``: replaced by a new one)."""

        def work(s: Session) -> str:
            tenant = s.get(Tenant, tenant_id, with_for_update=True)
            if tenant is None:
                raise NotFound(f"no tenant {tenant_id!r}")
            if rotate or tenant.webhook_secret is None:
                tenant.webhook_secret = new_secret()
            return tenant.webhook_secret

        return self._db.transact(work)

    # -- the outbox ------------------------------------------------------------------------------
    def final_pending_jobs(self, limit: int = 500) -> list[Job]:
        """Jobs whose webhook waits for them to be final and that now are."""
        with self._db.read() as s:
            return list(s.scalars(select(Job).where(Job.webhook_status == "pending", Job.status.in_(FINAL_JOBS))
                                  .order_by(Job.id).limit(limit)))

    def final_pending_batches(self, limit: int = 100) -> list[Batch]:
        """Batches whose webhook waits for them to end and that did (their files written)."""
        with self._db.read() as s:
            return list(s.scalars(select(Batch).where(
                Batch.webhook_status == "pending", Batch.status.in_(FINAL_BATCHES),
                Batch.output_file_id.is_not(None) | (Batch.status == "failed")).order_by(Batch.id).limit(limit)))

    def queue(self, deliveries: Sequence[NewDelivery]) -> int:
        """Queues deliveries and marks their jobs and batches ``queued``, in one transaction.
        A job or batch queued before keeps its first delivery. Returns how many were queued."""
        if not deliveries:
            return 0
        now = utcnow()
        rows = [{"id": new_id("msg_"), "tenant_id": d.tenant_id, "job_id": d.job_id, "batch_id": d.batch_id,
                 "url": d.url, "event_type": d.event_type, "body": d.body, "status": "pending", "attempts": 0,
                 "last_status_code": None, "last_error": None, "created_at": now, "next_attempt_at": now,
                 "delivered_at": None} for d in deliveries]

        def work(s: Session) -> int:
            dialect = s.get_bind().dialect.name
            table: Any = WebhookDelivery.__table__
            n = 0
            for column in ("job_id", "batch_id"):
                mine = [r for r in rows if r[column] is not None]
                if mine:
                    n += s.execute(insert_ignoring(dialect, table, [column]), mine).rowcount or 0
            job_ids = [d.job_id for d in deliveries if d.job_id]
            batch_ids = [d.batch_id for d in deliveries if d.batch_id]
            if job_ids:
                s.execute(update(Job).where(Job.id.in_(job_ids), Job.webhook_status == "pending")
                          .values(webhook_status="queued"))
            if batch_ids:
                s.execute(update(Batch).where(Batch.id.in_(batch_ids), Batch.webhook_status == "pending")
                          .values(webhook_status="queued"))
            return n

        return self._db.transact(work)

    def due(self, now: datetime | None = None, limit: int = 100) -> list[WebhookDelivery]:
        """Deliveries whose next attempt is due, oldest first."""
        now = now or utcnow()
        with self._db.read() as s:
            return list(s.scalars(select(WebhookDelivery).where(
                WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at).limit(limit)))

    def record_attempt(self, delivery_id: str, *, delivered: bool, status_code: int | None, error: str | None,
                       next_attempt_at: datetime | None) -> None:
        """Records one attempt: delivered, to be retried at ``next_attempt_at``, or (None) failed
        for good. The job's or batch's webhook status follows."""
        now = utcnow()
        status = "delivered" if delivered else ("pending" if next_attempt_at is not None else "failed")

        def work(s: Session) -> None:
            d = s.get(WebhookDelivery, delivery_id, with_for_update=True)
            if d is None or d.status != "pending":
                return
            d.status = status
            d.attempts += 1
            d.last_status_code = status_code
            d.last_error = None if delivered else (error or "")[:2000]
            d.delivered_at = now if delivered else None
            if next_attempt_at is not None:
                d.next_attempt_at = next_attempt_at
            shown = {"delivered": "delivered", "failed": "failed", "pending": "retrying"}[status]
            if d.job_id:
                s.execute(update(Job).where(Job.id == d.job_id).values(webhook_status=shown))
            if d.batch_id:
                s.execute(update(Batch).where(Batch.id == d.batch_id).values(webhook_status=shown))

        self._db.transact(work)

    def delivery_of(self, tenant_id: str, *, job_id: str | None = None,
                    batch_id: str | None = None) -> WebhookDelivery | None:
        """The delivery of the tenant's job or batch, or None."""
        stmt = select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant_id)
        stmt = stmt.where(WebhookDelivery.job_id == job_id) if job_id else stmt.where(
            WebhookDelivery.batch_id == batch_id)
        with self._db.read() as s:
            return s.scalar(stmt)
