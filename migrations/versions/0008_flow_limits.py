"""Per-key concurrency and rate limits (core.limits).

- flow_keys: one row per key, locked by each admission under it; rate-limit state
  (GCRA) and pauses.
- key_slots: the slots held under concurrency keys, by step attempts and executions.
- ix_execution_steps_waiting_key: the steps waiting for a key, in arrival order.
- workflow_executions.limit_key: the key a pending execution takes turns under.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 22:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.types import UTCDateTime

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WAITING_KEY = "status = 'waiting' AND wait_kind = 'key'"


def upgrade() -> None:
    op.add_column(
        "workflow_executions", sa.Column("limit_key", sa.String(length=255), nullable=True)
    )
    op.create_table(
        "flow_keys",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("concurrency_limit", sa.Integer(), nullable=True),
        sa.Column("rate_interval", sa.Float(), nullable=True),
        sa.Column("rate_burst", sa.Integer(), nullable=True),
        sa.Column("rate_tat", UTCDateTime(), nullable=True),
        sa.Column("paused_until", UTCDateTime(), nullable=True),
        sa.Column("last_admitted_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_flow_keys")),
    )
    op.create_table(
        "key_slots",
        sa.Column("execution_id", sa.String(length=36), nullable=False),
        sa.Column("step_name", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("execution_id", "step_name", "key", name=op.f("pk_key_slots")),
    )
    op.create_index("ix_key_slots_key", "key_slots", ["key"])
    op.create_index(
        "ix_execution_steps_waiting_key",
        "execution_steps",
        ["wait_key", "waiting_since"],
        postgresql_where=sa.text(WAITING_KEY),
        sqlite_where=sa.text(WAITING_KEY),
    )


def downgrade() -> None:
    op.drop_index("ix_execution_steps_waiting_key", table_name="execution_steps")
    op.drop_index("ix_key_slots_key", table_name="key_slots")
    op.drop_table("key_slots")
    op.drop_table("flow_keys")
    with op.batch_alter_table("workflow_executions") as batch:
        batch.drop_column("limit_key")
