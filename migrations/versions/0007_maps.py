"""Map steps: the counters on the map step's row and one row per item.

- execution_steps.map_total / map_left / map_failed / map_max_failed: set when a map
  step expands; ``map_left`` is the atomic fan-in counter of its items.
- map_items: one row per (execution, map step, item index), with its own status,
  attempts, output and error.
- workflow_executions.parent_item_index: the item a child map's child execution runs.

The new columns are nullable, so SQLite needs no table copy.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.types import UTCDateTime, json_type

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTERS = ("map_total", "map_left", "map_failed", "map_max_failed")


def _partial(name: str, columns: list[str], where: str) -> None:
    op.create_index(
        name,
        "map_items",
        columns,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    for name in COUNTERS:
        op.add_column("execution_steps", sa.Column(name, sa.Integer(), nullable=True))
    op.add_column(
        "workflow_executions", sa.Column("parent_item_index", sa.Integer(), nullable=True)
    )
    op.create_table(
        "map_items",
        sa.Column("execution_id", sa.String(length=36), nullable=False),
        sa.Column("step_name", sa.String(length=200), nullable=False),
        sa.Column("item_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("recoveries", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempt_base", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("output_data", json_type(), nullable=True),
        sa.Column("error", json_type(), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("celery_task_id", sa.String(length=255), nullable=True),
        sa.Column("queued_at", UTCDateTime(), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=True),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("republished_at", UTCDateTime(), nullable=True),
        sa.Column("republishes", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["workflow_executions.execution_id"],
            name=op.f("fk_map_items_execution_id_workflow_executions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "execution_id", "step_name", "item_index", name=op.f("pk_map_items")
        ),
    )
    _partial(
        "ix_map_items_pending", ["execution_id", "step_name", "item_index"], "status = 'pending'"
    )
    _partial("ix_map_items_running_heartbeat", ["heartbeat_at"], "status = 'running'")
    _partial("ix_map_items_queued_due", ["next_attempt_at"], "status = 'queued'")
    _partial("ix_map_items_running_worker", ["worker"], "status = 'running'")


def downgrade() -> None:
    op.drop_table("map_items")
    with op.batch_alter_table("workflow_executions") as batch:
        batch.drop_column("parent_item_index")
    with op.batch_alter_table("execution_steps") as batch:
        for name in reversed(COUNTERS):
            batch.drop_column(name)
