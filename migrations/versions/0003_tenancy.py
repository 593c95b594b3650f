"""Tenancy: per-tenant and per-key limits, token reservations on jobs, retention, hourly usage,
completion webhooks (URLs, secrets, the delivery outbox), fair-share weights.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Adds the limit and retention columns, the jobs' reservation column and finished_at index,
    and the hourly usage table that purged jobs' usage moves to."""
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("limits", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("retention_days", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("weight", sa.Float(), server_default="1", nullable=False))
        batch.add_column(sa.Column("webhook_url", sa.String(2000), nullable=True))
        batch.add_column(sa.Column("webhook_secret", sa.String(100), nullable=True))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("limits", sa.JSON(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("reserved_tokens", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("webhook_url", sa.String(2000), nullable=True))
        batch.add_column(sa.Column("webhook_status", sa.String(16), nullable=True))
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
    op.create_index("ix_jobs_webhook_status", "jobs", ["webhook_status"])
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("webhook_url", sa.String(2000), nullable=True))
        batch.add_column(sa.Column("webhook_status", sa.String(16), nullable=True))
    op.create_index("ix_batches_webhook_status", "batches", ["webhook_status"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("batch_id", sa.String(40), nullable=True),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="ck_webhook_deliveries_status"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_webhook_deliveries_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_webhook_deliveries_job_id_jobs", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name="fk_webhook_deliveries_batch_id_batches",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
        sa.UniqueConstraint("job_id", name="uq_webhook_deliveries_job_id"),
        sa.UniqueConstraint("batch_id", name="uq_webhook_deliveries_batch_id"),
    )
    op.create_index("ix_webhook_deliveries_status_next_attempt_at", "webhook_deliveries",
                    ["status", "next_attempt_at"])
    op.create_table(
        "usage_hourly",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("api_key_id", sa.String(40), nullable=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("hour", sa.SmallInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_usage_hourly_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], name="fk_usage_hourly_api_key_id_api_keys",
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_usage_hourly"),
    )
    op.create_index("ix_usage_hourly_tenant_id_day", "usage_hourly", ["tenant_id", "day"])


def downgrade() -> None:
    """Drops what upgrade added (limits, retention settings and hourly usage are lost)."""
    op.drop_index("ix_webhook_deliveries_status_next_attempt_at", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_batches_webhook_status", table_name="batches")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("webhook_status")
        batch.drop_column("webhook_url")
    op.drop_index("ix_jobs_webhook_status", table_name="jobs")
    op.drop_index("ix_usage_hourly_tenant_id_day", table_name="usage_hourly")
    op.drop_table("usage_hourly")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("webhook_status")
        batch.drop_column("webhook_url")
        batch.drop_column("reserved_tokens")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("limits")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("webhook_secret")
        batch.drop_column("webhook_url")
        batch.drop_column("retention_days")
        batch.drop_column("weight")
        batch.drop_column("limits")
