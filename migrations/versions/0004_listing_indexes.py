"""Indexes of the API's keyset-paginated listings: by creation, and by who triggered.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 01:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_workflow_executions_created", "workflow_executions", ["created_at", "execution_id"]
    )
    # Leads with triggered_by like the index it replaces, so foreign-key checks on
    # deleting a user still use an index.
    op.create_index(
        "ix_workflow_executions_triggered_by_created",
        "workflow_executions",
        ["triggered_by", "created_at"],
    )
    op.drop_index("ix_workflow_executions_triggered_by", table_name="workflow_executions")


def downgrade() -> None:
    op.create_index("ix_workflow_executions_triggered_by", "workflow_executions", ["triggered_by"])
    op.drop_index("ix_workflow_executions_triggered_by_created", table_name="workflow_executions")
    op.drop_index("ix_workflow_executions_created", table_name="workflow_executions")
