"""Running for years: retention, workflow shapes for rolling deploys, failure groups.

- workflow_executions.shape_hash: the shape (``workflow_shapes``) an execution started
  with; payloads_cleared_at: when retention cleared its payloads.
- ix_workflow_executions_workflow_finished: retention's scan of one workflow's finished
  executions of one status, oldest first.
- workflow_shapes: each shape by digest; worker_shapes: the shapes live workers run.
- execution_steps.error_group and ix_execution_steps_failed_group: failed steps by
  failure group; ix_execution_steps_waiting_version: steps handed back for a worker
  with a compatible shape.

The new columns are nullable, so SQLite needs no table copy.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.types import UTCDateTime, json_type

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The partial indexes' predicates, as core.models writes them at this revision.
WAITING_VERSION = "status = 'waiting' AND wait_kind = 'version'"
FAILED_STEP = "status = 'failed'"


def upgrade() -> None:
    op.add_column(
        "workflow_executions", sa.Column("shape_hash", sa.String(length=64), nullable=True)
    )
    op.add_column(
        "workflow_executions", sa.Column("payloads_cleared_at", UTCDateTime(), nullable=True)
    )
    op.create_index(
        "ix_workflow_executions_workflow_finished",
        "workflow_executions",
        ["workflow_id", "status", "finished_at"],
    )
    op.add_column("execution_steps", sa.Column("error_group", sa.String(length=16), nullable=True))
    op.create_index(
        "ix_execution_steps_waiting_version",
        "execution_steps",
        ["waiting_since"],
        postgresql_where=sa.text(WAITING_VERSION),
        sqlite_where=sa.text(WAITING_VERSION),
    )
    op.create_index(
        "ix_execution_steps_failed_group",
        "execution_steps",
        ["error_group", "finished_at"],
        postgresql_where=sa.text(FAILED_STEP),
        sqlite_where=sa.text(FAILED_STEP),
    )
    op.create_table(
        "workflow_shapes",
        sa.Column("shape_hash", sa.String(length=64), nullable=False),
        sa.Column("workflow", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("shape", json_type(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("shape_hash", name=op.f("pk_workflow_shapes")),
    )
    op.create_index("ix_workflow_shapes_workflow", "workflow_shapes", ["workflow", "created_at"])
    op.create_table(
        "worker_shapes",
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("shape_hash", sa.String(length=64), nullable=False),
        sa.Column("workflow", sa.String(length=200), nullable=False),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("worker", "shape_hash", name=op.f("pk_worker_shapes")),
    )
    op.create_index("ix_worker_shapes_shape", "worker_shapes", ["shape_hash", "seen_at"])


def downgrade() -> None:
    op.drop_index("ix_worker_shapes_shape", table_name="worker_shapes")
    op.drop_table("worker_shapes")
    op.drop_index("ix_workflow_shapes_workflow", table_name="workflow_shapes")
    op.drop_table("workflow_shapes")
    op.drop_index("ix_execution_steps_failed_group", table_name="execution_steps")
    op.drop_index("ix_execution_steps_waiting_version", table_name="execution_steps")
    op.drop_index("ix_workflow_executions_workflow_finished", table_name="workflow_executions")
    with op.batch_alter_table("execution_steps") as batch:
        batch.drop_column("error_group")
    with op.batch_alter_table("workflow_executions") as batch:
        batch.drop_column("payloads_cleared_at")
        batch.drop_column("shape_hash")
