"""Schedules: workflow_schedules, one row of state per declared schedule.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.types import UTCDateTime

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workflow_schedules",
        sa.Column("workflow", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("spec", sa.String(length=300), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_tick_at", UTCDateTime(), nullable=True),
        sa.Column("last_tick_at", UTCDateTime(), nullable=True),
        sa.Column("last_execution_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("workflow", "name", name=op.f("pk_workflow_schedules")),
    )


def downgrade() -> None:
    op.drop_table("workflow_schedules")
