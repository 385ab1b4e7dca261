"""Crash recoveries counted apart from error retries: execution_steps.recoveries.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 22:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN, which SQLite supports too (and offline --sql mode can render).
    op.add_column(
        "execution_steps",
        sa.Column("recoveries", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )


def downgrade() -> None:
    with op.batch_alter_table("execution_steps") as batch:
        batch.drop_column("recoveries")
