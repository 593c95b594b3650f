"""Tenancy: per-tenant and per-key limits, token reservations on jobs, retention, hourly usage.

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
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("limits", sa.JSON(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("reserved_tokens", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
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
    op.drop_index("ix_usage_hourly_tenant_id_day", table_name="usage_hourly")
    op.drop_table("usage_hourly")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reserved_tokens")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("limits")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("retention_days")
        batch.drop_column("limits")
