"""results.choices: every completion of a job that asked for n > 1.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Adds the column (NULL: the job made one completion, held by the other columns)."""
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("choices", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Drops the column."""
    with op.batch_alter_table("results") as batch:
        batch.drop_column("choices")
