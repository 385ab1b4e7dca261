"""Idempotency keys per scope, the reconciler's republish bookkeeping, database liveness.

- workflow_executions.idempotency_scope: keys are unique per (scope, key), the scope
  being the API user's id or '' for producers, replacing the table-wide unique key.
- execution_steps.republished_at / republishes: when the reconciler last re-sent a
  queued step's message and how often.
- workflow_executions.start_resent_at / starts_resent: the same for a pending
  execution's start message.
- execution_steps.attempt_base: the attempts a step took before its execution's latest
  retry, from which the retry's run counts its attempts and crash recoveries.
- database_liveness: one row the reconciler's passes keep, the evidence a stall is
  judged on (time the database was reachable, not the wall clock alone).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.types import UTCDateTime

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


OPEN_DEADLINE = "deadline_at IS NOT NULL AND status IN ('pending', 'running')"


def _executions_as_of_0004() -> sa.Table:
    """workflow_executions as revision 0004 left it, written out: SQLite can drop a
    table's unique constraint only by copying the table, and offline (--sql) mode has
    no database to read the table's shape from."""
    json = sa.JSON()
    return sa.Table(
        "workflow_executions",
        sa.MetaData(),
        sa.Column("execution_id", sa.String(length=36), nullable=False),
        sa.Column("workflow_id", sa.String(length=200), nullable=False),
        sa.Column("workflow_version", sa.Integer(), nullable=False),
        sa.Column("input_data", json, nullable=True),
        sa.Column("output_data", json, nullable=True),
        sa.Column("error", json, nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("previous_status", sa.String(length=20), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("triggered_by", sa.String(length=36), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("deadline_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["triggered_by"],
            ["users.id"],
            name="fk_workflow_executions_triggered_by_users",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("execution_id", name="pk_workflow_executions"),
        sa.UniqueConstraint("idempotency_key", name="uq_workflow_executions_idempotency_key"),
        sa.Index("ix_workflow_executions_status_created", "status", "created_at"),
        sa.Index("ix_workflow_executions_workflow_status", "workflow_id", "status", "created_at"),
        sa.Index("ix_workflow_executions_created", "created_at", "execution_id"),
        sa.Index("ix_workflow_executions_triggered_by_created", "triggered_by", "created_at"),
        sa.Index(
            "ix_workflow_executions_open_deadline",
            "deadline_at",
            sqlite_where=sa.text(OPEN_DEADLINE),
        ),
    )


def upgrade() -> None:
    scope = sa.Column(
        "idempotency_scope", sa.String(length=36), server_default=sa.text("''"), nullable=False
    )
    if op.get_context().dialect.name == "sqlite":
        with op.batch_alter_table(
            "workflow_executions", copy_from=_executions_as_of_0004()
        ) as batch:
            batch.add_column(scope)
            batch.drop_constraint("uq_workflow_executions_idempotency_key", type_="unique")
            batch.create_unique_constraint(
                "uq_workflow_executions_idempotency", ["idempotency_scope", "idempotency_key"]
            )
    else:
        op.add_column("workflow_executions", scope)
        op.drop_constraint(
            "uq_workflow_executions_idempotency_key", "workflow_executions", type_="unique"
        )
        op.create_unique_constraint(
            "uq_workflow_executions_idempotency",
            "workflow_executions",
            ["idempotency_scope", "idempotency_key"],
        )
    # Outside the batch on SQLite too: adding a nullable or defaulted column is a plain
    # ALTER TABLE there (the copy above is only for the unique constraint).
    op.add_column("workflow_executions", sa.Column("start_resent_at", UTCDateTime(), nullable=True))
    op.add_column(
        "workflow_executions",
        sa.Column("starts_resent", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column("execution_steps", sa.Column("republished_at", UTCDateTime(), nullable=True))
    op.add_column(
        "execution_steps",
        sa.Column("republishes", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "execution_steps",
        sa.Column("attempt_base", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.create_table(
        "database_liveness",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
        sa.Column("reachable_since", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_database_liveness")),
    )


def downgrade() -> None:
    op.drop_table("database_liveness")
    with op.batch_alter_table("execution_steps") as batch:
        batch.drop_column("attempt_base")
        batch.drop_column("republishes")
        batch.drop_column("republished_at")
    with op.batch_alter_table("workflow_executions") as batch:
        batch.drop_column("starts_resent")
        batch.drop_column("start_resent_at")
        batch.drop_constraint("uq_workflow_executions_idempotency", type_="unique")
        batch.create_unique_constraint(
            "uq_workflow_executions_idempotency_key", ["idempotency_key"]
        )
        batch.drop_column("idempotency_scope")
