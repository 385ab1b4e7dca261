"""Waits are rows: waiting steps, child executions, parked executions, the event inbox.

- execution_steps.wait_kind / waiting_since / wake_at / wait_event / wait_key /
  child_execution_id: what a waiting step waits for and when the waker acts on it.
- workflow_executions.parent_execution_id / parent_step_name / parent_attempt /
  root_execution_id / depth / parent_woken_at: a child execution's place in its tree.
- workflow_executions.parked_at: running with only waiting steps (holds no
  max_concurrency slot).
- event_inbox: events by (name, key) and signals to one execution's wait, consumed once.

Every new column is nullable or has a server default, so SQLite needs no table copy.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.types import UTCDateTime, json_type

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The partial indexes' predicates, as core.models writes them at this revision.
WAITING_WAKE = "status = 'waiting' AND wake_at IS NOT NULL"
WAITING_EVENT = "status = 'waiting' AND wait_event IS NOT NULL"
OPEN_SIGNAL = "consumed_at IS NULL AND target_execution_id IS NOT NULL"
UNWOKEN_CHILD = (
    "parent_execution_id IS NOT NULL AND parent_woken_at IS NULL "
    "AND status IN ('succeeded', 'failed', 'cancelled', 'timed_out')"
)
OPEN_EVENT = "consumed_at IS NULL"


def _partial(name: str, table: str, columns: list[str], where: str) -> None:
    op.create_index(
        name,
        table,
        columns,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    for column in (
        sa.Column("wait_kind", sa.String(length=10), nullable=True),
        sa.Column("waiting_since", UTCDateTime(), nullable=True),
        sa.Column("wake_at", UTCDateTime(), nullable=True),
        sa.Column("wait_event", sa.String(length=200), nullable=True),
        sa.Column("wait_key", sa.String(length=255), nullable=True),
        sa.Column("child_execution_id", sa.String(length=36), nullable=True),
    ):
        op.add_column("execution_steps", column)
    for column in (
        sa.Column("parent_execution_id", sa.String(length=36), nullable=True),
        sa.Column("parent_step_name", sa.String(length=200), nullable=True),
        sa.Column("parent_attempt", sa.Integer(), nullable=True),
        sa.Column("root_execution_id", sa.String(length=36), nullable=True),
        sa.Column("depth", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("parent_woken_at", UTCDateTime(), nullable=True),
        sa.Column("parked_at", UTCDateTime(), nullable=True),
    ):
        op.add_column("workflow_executions", column)
    _partial("ix_execution_steps_waiting_wake", "execution_steps", ["wake_at"], WAITING_WAKE)
    _partial("ix_execution_steps_waiting", "execution_steps", ["wait_kind"], "status = 'waiting'")
    _partial(
        "ix_execution_steps_waiting_event",
        "execution_steps",
        ["wait_event", "wait_key", "waiting_since"],
        WAITING_EVENT,
    )
    _partial(
        "ix_workflow_executions_parent",
        "workflow_executions",
        ["parent_execution_id"],
        "parent_execution_id IS NOT NULL",
    )
    _partial(
        "ix_workflow_executions_unwoken_child",
        "workflow_executions",
        ["finished_at"],
        UNWOKEN_CHILD,
    )
    op.create_table(
        "event_inbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("event_key", sa.String(length=255), nullable=True),
        sa.Column("target_execution_id", sa.String(length=36), nullable=True),
        sa.Column("target_step", sa.String(length=200), nullable=True),
        sa.Column("payload", json_type(), nullable=True),
        sa.Column(
            "idempotency_scope", sa.String(length=36), server_default=sa.text("''"), nullable=False
        ),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("sent_by", sa.String(length=36), nullable=True),
        sa.Column("actor", sa.String(length=320), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("consumed_at", UTCDateTime(), nullable=True),
        sa.Column("consumed_by_execution", sa.String(length=36), nullable=True),
        sa.Column("consumed_by_step", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(
            ["sent_by"],
            ["users.id"],
            name=op.f("fk_event_inbox_sent_by_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_inbox")),
        sa.UniqueConstraint(
            "idempotency_scope", "idempotency_key", name="uq_event_inbox_idempotency"
        ),
    )
    _partial("ix_event_inbox_open", "event_inbox", ["name", "event_key", "id"], OPEN_EVENT)
    _partial(
        "ix_event_inbox_signal",
        "event_inbox",
        ["target_execution_id", "target_step", "id"],
        OPEN_SIGNAL,
    )
    _partial("ix_event_inbox_expiry", "event_inbox", ["expires_at"], OPEN_EVENT)


def downgrade() -> None:
    op.drop_table("event_inbox")
    for name, table in (
        ("ix_workflow_executions_unwoken_child", "workflow_executions"),
        ("ix_workflow_executions_parent", "workflow_executions"),
        ("ix_execution_steps_waiting_event", "execution_steps"),
        ("ix_execution_steps_waiting_wake", "execution_steps"),
        ("ix_execution_steps_waiting", "execution_steps"),
    ):
        op.drop_index(name, table_name=table)
    with op.batch_alter_table("workflow_executions") as batch:
        for column in (
            "parked_at",
            "parent_woken_at",
            "depth",
            "root_execution_id",
            "parent_attempt",
            "parent_step_name",
            "parent_execution_id",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("execution_steps") as batch:
        for column in (
            "child_execution_id",
            "wait_key",
            "wait_event",
            "wake_at",
            "waiting_since",
            "wait_kind",
        ):
            batch.drop_column(column)
