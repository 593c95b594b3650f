"""Table definitions (SQLAlchemy 2.x typed declarative). Migrations in ``migrations/`` mirror these;
a test fails if the two disagree.

The models carry no ``relationship()`` attributes on purpose: the store hands out rows as detached
snapshots, and a snapshot with no lazy attributes can be read anywhere, after its session is gone.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
JOB_KINDS = ("interactive", "bulk")
FILE_STATUSES = ("uploading", "uploaded", "error")
BATCH_STATUSES = (
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so the value is stored as naive
    UTC and the zone is put back on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime (UTC)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base; the naming convention keeps constraint names stable across backends."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
        date: Date(),
    }


class Tenant(Base):
    """An account: every job, file, batch, key and usage row belongs to exactly one tenant."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime]
    # Rate, queue and budget limits ({"requests_per_minute": ..., ...}; None or a missing field:
    # no limit). Validated by the API's Limits schema before they are stored.
    limits: Mapped[dict[str, Any] | None]
    # Finished jobs, results, files and batches older than this are purged (None: the default).
    retention_days: Mapped[int | None] = mapped_column(Integer)
    # Fair share: workers' engines share their capacity between tenants in proportion to this.
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    # Completion webhooks: the default URL of the tenant's jobs and batches, and the secret their
    # deliveries are signed with ("whsec_" + base64, the Standard Webhooks form).
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    webhook_secret: Mapped[str | None] = mapped_column(String(100))


class ApiKey(Base):
    """An API key. Only the SHA-256 of the key is stored; ``prefix`` is kept to tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    # Limits of this key alone, on top of its tenant's (same shape as Tenant.limits).
    limits: Mapped[dict[str, Any] | None]


class File(Base):
    """An uploaded or generated file (OpenAI Files API). Its bytes live in ``file_chunks``."""

    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint(_in("status", FILE_STATUSES), name="status"),
        Index(None, "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    line_count: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]


class FileChunk(Base):
    """One slice (about a mebibyte) of a file's content, so files stream in and out in pieces."""

    __tablename__ = "file_chunks"

    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Batch(Base):
    """An OpenAI-style batch: one input file of requests, run as bulk jobs linked by ``batch_id``.

    ``total`` is set when the input is ingested; ``completed`` and ``failed`` are snapshotted when the
    batch reaches a final state (while it runs, the store counts its jobs instead).
    """

    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint(_in("status", BATCH_STATUSES), name="status"),
        Index(None, "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    output_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"))
    error_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    errors: Mapped[list[Any] | None]
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))  # as Job.webhook_url
    webhook_status: Mapped[str | None] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]


class Job(Base):
    """One generation request and its lifecycle. The id doubles as the Celery task id."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint(_in("kind", JOB_KINDS), name="kind"),
        # A client's idempotency key names one job per tenant; NULLs never collide.
        UniqueConstraint("tenant_id", "idempotency_key"),
        UniqueConstraint("batch_id", "custom_id"),
        Index(None, "tenant_id", "created_at", "id"),
        Index(None, "tenant_id", "status", "created_at"),
        # Jobs finished lately (settling their token reservations) or long ago (retention).
        Index(None, "finished_at"),
        # The recovery of a lost worker instance finds its running jobs by this.
        Index(None, "worker_instance"),
        # Jobs by batch use the (batch_id, custom_id) unique index: one index less to maintain on
        # every status change of the hot path.
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    model: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    request: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))
    # The worker process (a new id on every start, even under the same hostname) that claimed the
    # job last: its liveness decides whether the job may be taken over (docs/reliability.md).
    worker_instance: Mapped[str | None] = mapped_column(String(40))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    custom_id: Mapped[str | None] = mapped_column(String(200))
    # Tokens (prompt + max_tokens) held against the tenant's limits while the job is open; settled
    # against its usage once it finishes. None: no limit applied when it was submitted.
    reserved_tokens: Mapped[int | None] = mapped_column(Integer)
    # Where to POST the job once it is final, and how that stands: "pending" until the job is
    # final and its delivery queued, then "queued", "delivered" or "failed". None: no webhook.
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    webhook_status: Mapped[str | None] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Result(Base):
    """The output of a finished job; at most one per job (the primary key is the job id)."""

    __tablename__ = "results"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    output_text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(32))
    token_ids: Mapped[list[Any] | None]
    logprobs: Mapped[list[Any] | None]
    # n > 1: every completion, {"index", "text", "finish_reason", "token_ids", "logprobs"}; the
    # columns above hold the first. None for a job of one completion.
    choices: Mapped[list[Any] | None]
    created_at: Mapped[datetime]


class Usage(Base):
    """Token accounting for the attempt of a job that produced its output (the ledger).

    The job id is the primary key, so a redelivered task that writes again is a no-op enforced by
    the schema. Tenant, key and model are copied from the job so aggregates need no join; ``day``
    and ``hour`` (UTC) are stored so that grouping by them works the same on every backend.
    """

    __tablename__ = "usage"
    __table_args__ = (Index(None, "tenant_id", "day"),)

    # No foreign key to jobs on purpose: usage is the accounting ledger and outlives a purged job
    # (and the hot path saves a key-share lock per row). It goes with its tenant.
    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    model: Mapped[str] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    queue_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float] = mapped_column(Float)
    total_ms: Mapped[float] = mapped_column(Float)
    worker: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    day: Mapped[date]
    hour: Mapped[int] = mapped_column(SmallInteger)


class UsageHourly(Base):
    """Usage of purged jobs, summed per tenant, key, model and UTC hour (retention keeps the
    accounting: a purge moves per-job ``usage`` rows here, so totals never change).

    Several rows may hold the same hour (one per purge pass); readers sum them.
    """

    __tablename__ = "usage_hourly"
    __table_args__ = (Index(None, "tenant_id", "day"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    model: Mapped[str] = mapped_column(String(200))
    day: Mapped[date]
    hour: Mapped[int] = mapped_column(SmallInteger)
    requests: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)


WEBHOOK_STATUSES = ("pending", "delivered", "failed")


class WebhookDelivery(Base):
    """The outbox of completion webhooks: one row per final job or batch that has a webhook,
    written before anything is sent, so a crash loses no notification. Its id is the Standard
    Webhooks ``webhook-id`` (the same on every retry); ``body`` is what is sent, fixed once."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(_in("status", WEBHOOK_STATUSES), name="status"),
        UniqueConstraint("job_id"),
        UniqueConstraint("batch_id"),
        Index(None, "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2000))
    event_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
