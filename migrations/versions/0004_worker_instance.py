"""jobs.worker_instance: the worker process that claimed a job, for crash recovery.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Adds the column (NULL for jobs claimed before it existed: any worker may take those over,
    as before) and its index (the recovery of a lost instance looks its jobs up by it)."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("worker_instance", sa.String(length=40), nullable=True))
    op.create_index("ix_jobs_worker_instance", "jobs", ["worker_instance"])


def downgrade() -> None:
    """Drops the index and the column."""
    op.drop_index("ix_jobs_worker_instance", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("worker_instance")
