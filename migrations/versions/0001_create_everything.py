"""Create everything: tenants, API keys, files, batches, jobs, results, usage.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id(name: str = "id", nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(40), nullable=nullable)


def _at(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk(column: str, table: str, referred: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{referred}.id"], name=f"fk_{table}_{column}_{referred}", ondelete=ondelete
    )


def upgrade() -> None:
    """Creates every table and index of the store."""
    op.create_table(
        "tenants",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        _at("created_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
    )
    op.create_table(
        "api_keys",
        _id(),
        _id("tenant_id"),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        _at("created_at", nullable=False),
        _at("revoked_at"),
        _fk("tenant_id", "api_keys", "tenants", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])

    op.create_table(
        "files",
        _id(),
        _id("tenant_id"),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("line_count", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _at("created_at", nullable=False),
        sa.CheckConstraint("status IN ('uploading', 'uploaded', 'error')", name="ck_files_status"),
        _fk("tenant_id", "files", "tenants", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
    )
    op.create_index("ix_files_tenant_id_created_at", "files", ["tenant_id", "created_at"])
    op.create_table(
        "file_chunks",
        _id("file_id"),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        _fk("file_id", "file_chunks", "files", "CASCADE"),
        sa.PrimaryKeyConstraint("file_id", "seq", name="pk_file_chunks"),
    )

    op.create_table(
        "batches",
        _id(),
        _id("tenant_id"),
        _id("api_key_id", nullable=True),
        sa.Column("endpoint", sa.String(64), nullable=False),
        _id("input_file_id", nullable=True),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _id("output_file_id", nullable=True),
        _id("error_file_id", nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        _at("created_at", nullable=False),
        *(
            _at(f"{stamp}_at")
            for stamp in (
                "expires",
                "in_progress",
                "finalizing",
                "completed",
                "failed",
                "expired",
                "cancelling",
                "cancelled",
            )
        ),
        sa.CheckConstraint(
            "status IN ('validating', 'in_progress', 'finalizing', 'completed', 'failed', 'expired', "
            "'cancelling', 'cancelled')",
            name="ck_batches_status",
        ),
        _fk("tenant_id", "batches", "tenants", "CASCADE"),
        _fk("api_key_id", "batches", "api_keys", "SET NULL"),
        _fk("input_file_id", "batches", "files", "SET NULL"),
        _fk("output_file_id", "batches", "files", "SET NULL"),
        _fk("error_file_id", "batches", "files", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
    )
    op.create_index("ix_batches_tenant_id_created_at", "batches", ["tenant_id", "created_at"])

    op.create_table(
        "jobs",
        _id(),
        _id("tenant_id"),
        _id("api_key_id", nullable=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        _id("batch_id", nullable=True),
        sa.Column("custom_id", sa.String(200), nullable=True),
        _at("created_at", nullable=False),
        _at("expires_at"),
        _at("started_at"),
        _at("finished_at"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired')", name="ck_jobs_status"
        ),
        sa.CheckConstraint("kind IN ('interactive', 'bulk')", name="ck_jobs_kind"),
        _fk("tenant_id", "jobs", "tenants", "CASCADE"),
        _fk("api_key_id", "jobs", "api_keys", "SET NULL"),
        _fk("batch_id", "jobs", "batches", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_id_idempotency_key"),
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_jobs_batch_id_custom_id"),
    )
    op.create_index("ix_jobs_tenant_id_created_at_id", "jobs", ["tenant_id", "created_at", "id"])
    op.create_index("ix_jobs_tenant_id_status_created_at", "jobs", ["tenant_id", "status", "created_at"])

    op.create_table(
        "results",
        _id("job_id"),
        sa.Column("output_text", sa.Text(), nullable=False),
        sa.Column("finish_reason", sa.String(32), nullable=False),
        sa.Column("token_ids", sa.JSON(), nullable=True),
        sa.Column("logprobs", sa.JSON(), nullable=True),
        _at("created_at", nullable=False),
        _fk("job_id", "results", "jobs", "CASCADE"),
        sa.PrimaryKeyConstraint("job_id", name="pk_results"),
    )
    op.create_table(
        "usage",
        _id("job_id"),
        _id("tenant_id"),
        _id("api_key_id", nullable=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("queue_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=False),
        sa.Column("total_ms", sa.Float(), nullable=False),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        _at("created_at", nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("hour", sa.SmallInteger(), nullable=False),
        _fk("tenant_id", "usage", "tenants", "CASCADE"),
        _fk("api_key_id", "usage", "api_keys", "SET NULL"),
        sa.PrimaryKeyConstraint("job_id", name="pk_usage"),
    )
    op.create_index("ix_usage_tenant_id_day", "usage", ["tenant_id", "day"])


def downgrade() -> None:
    """Drops every table of the store (their indexes go with them)."""
    for table in ("usage", "results", "jobs", "batches", "file_chunks", "files", "api_keys", "tenants"):
        op.drop_table(table)
