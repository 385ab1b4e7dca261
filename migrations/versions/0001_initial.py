"""Initial schema: users, their sessions, workflow executions, their steps and events.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 01:37:10.477393
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from core.types import UTCDateTime

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The reconciler's scans: partial indexes, so their cost follows the open work.
OPEN_DEADLINE = "deadline_at IS NOT NULL AND status IN ('pending', 'running')"
RUNNING = "status = 'running'"
QUEUED = "status = 'queued'"


def json_column_type() -> Any:
    """JSON, JSONB on PostgreSQL: ``core.types.json_type()`` as of this revision."""
    # Written out rather than imported, so this revision keeps its meaning if
    # json_type() changes later (that change gets a revision of its own).
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("first_name", sa.String(length=200), nullable=True),
        sa.Column("last_name", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
    )

    op.create_table(
        "user_sessions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("last_used_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_user_sessions_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_sessions")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_user_sessions_token_hash")),
    )
    op.create_index(op.f("ix_user_sessions_user_id"), "user_sessions", ["user_id"])

    op.create_table(
        "workflow_executions",
        sa.Column("execution_id", sa.String(length=36), nullable=False),
        sa.Column("workflow_id", sa.String(length=200), nullable=False),
        sa.Column("workflow_version", sa.Integer(), nullable=False),
        sa.Column("input_data", json_column_type(), nullable=True),
        sa.Column("output_data", json_column_type(), nullable=True),
        sa.Column("error", json_column_type(), nullable=True),
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
            name=op.f("fk_workflow_executions_triggered_by_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("execution_id", name=op.f("pk_workflow_executions")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_workflow_executions_idempotency_key")),
    )
    op.create_index(
        op.f("ix_workflow_executions_triggered_by"), "workflow_executions", ["triggered_by"]
    )
    op.create_index(
        "ix_workflow_executions_status_created", "workflow_executions", ["status", "created_at"]
    )
    op.create_index(
        "ix_workflow_executions_workflow_status",
        "workflow_executions",
        ["workflow_id", "status", "created_at"],
    )
    op.create_index(
        "ix_workflow_executions_open_deadline",
        "workflow_executions",
        ["deadline_at"],
        postgresql_where=sa.text(OPEN_DEADLINE),
        sqlite_where=sa.text(OPEN_DEADLINE),
    )

    op.create_table(
        "execution_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("execution_id", sa.String(length=36), nullable=False),
        sa.Column("step_name", sa.String(length=200), nullable=True),
        sa.Column("from_status", sa.String(length=20), nullable=True),
        sa.Column("to_status", sa.String(length=20), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["workflow_executions.execution_id"],
            name=op.f("fk_execution_events_execution_id_workflow_executions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_execution_events")),
    )
    op.create_index("ix_execution_events_execution", "execution_events", ["execution_id", "id"])

    op.create_table(
        "execution_steps",
        sa.Column("execution_id", sa.String(length=36), nullable=False),
        sa.Column("step_name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("previous_status", sa.String(length=20), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("unmet_deps", sa.Integer(), nullable=False),
        sa.Column("output_data", json_column_type(), nullable=True),
        sa.Column("error", json_column_type(), nullable=True),
        sa.Column("celery_task_id", sa.String(length=255), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("queued_at", UTCDateTime(), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=True),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["workflow_executions.execution_id"],
            name=op.f("fk_execution_steps_execution_id_workflow_executions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("execution_id", "step_name", name=op.f("pk_execution_steps")),
    )
    op.create_index(
        "ix_execution_steps_running_heartbeat",
        "execution_steps",
        ["heartbeat_at"],
        postgresql_where=sa.text(RUNNING),
        sqlite_where=sa.text(RUNNING),
    )
    op.create_index(
        "ix_execution_steps_queued_due",
        "execution_steps",
        ["next_attempt_at"],
        postgresql_where=sa.text(QUEUED),
        sqlite_where=sa.text(QUEUED),
    )
    op.create_index(
        "ix_execution_steps_running_worker",
        "execution_steps",
        ["worker"],
        postgresql_where=sa.text(RUNNING),
        sqlite_where=sa.text(RUNNING),
    )


def downgrade() -> None:
    # Dependents first; dropping a table drops its indexes on both backends.
    op.drop_table("execution_steps")
    op.drop_table("execution_events")
    op.drop_table("workflow_executions")
    op.drop_table("user_sessions")
    op.drop_table("users")
