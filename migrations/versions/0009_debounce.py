"""Debounce: a pending execution that collects enqueues with one key until it starts.

- workflow_executions.debounce_key: the open window's key (NULL once it closed);
  start_at: when it starts; latest_start_at: the first enqueue's time + max_wait.
- uq_workflow_executions_debounce: one open window per (workflow, scope, key), the
  target of the enqueue's INSERT ... ON CONFLICT DO UPDATE.
- ix_workflow_executions_debounce_due: the waker's scan for windows due to start.

The new columns are nullable, so SQLite needs no table copy.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 22:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.types import UTCDateTime

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The partial indexes' predicate, as core.models writes it at this revision.
DEBOUNCE_OPEN = "status = 'pending' AND debounce_key IS NOT NULL"


def upgrade() -> None:
    op.add_column(
        "workflow_executions", sa.Column("debounce_key", sa.String(length=255), nullable=True)
    )
    op.add_column("workflow_executions", sa.Column("start_at", UTCDateTime(), nullable=True))
    op.add_column("workflow_executions", sa.Column("latest_start_at", UTCDateTime(), nullable=True))
    op.create_index(
        "uq_workflow_executions_debounce",
        "workflow_executions",
        ["workflow_id", "idempotency_scope", "debounce_key"],
        unique=True,
        postgresql_where=sa.text(DEBOUNCE_OPEN),
        sqlite_where=sa.text(DEBOUNCE_OPEN),
    )
    op.create_index(
        "ix_workflow_executions_debounce_due",
        "workflow_executions",
        ["start_at"],
        postgresql_where=sa.text(DEBOUNCE_OPEN),
        sqlite_where=sa.text(DEBOUNCE_OPEN),
    )


def downgrade() -> None:
    op.drop_index("ix_workflow_executions_debounce_due", table_name="workflow_executions")
    op.drop_index("uq_workflow_executions_debounce", table_name="workflow_executions")
    with op.batch_alter_table("workflow_executions") as batch:
        batch.drop_column("latest_start_at")
        batch.drop_column("start_at")
        batch.drop_column("debounce_key")
