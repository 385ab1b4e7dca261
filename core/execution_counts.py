"""How many executions are in each status (the dashboard's counts), as one statement.

The statement takes the listing's filters but its status set (counts are per status):
workflow, who triggered them (members count their own), and the creation range. One
statement is built per combination of filters present and cached; values are bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import Connection, Select, Table, bindparam, func, select

from core.executions import ExecutionFilter
from core.models import WorkflowExecution

WE = cast(Table, WorkflowExecution.__table__)


@dataclass(frozen=True)
class StatusCount:
    """How many executions (of one workflow, when counted by workflow) have one status."""

    status: str
    count: int
    workflow: str | None = None


@cache
def _statement(
    by_workflow: bool, workflow: bool, owner: bool, after: bool, before: bool
) -> Select[Any]:
    keys = [WE.c.workflow_id, WE.c.status] if by_workflow else [WE.c.status]
    query = select(*keys, func.count().label("n")).group_by(*keys)
    if workflow:
        query = query.where(WE.c.workflow_id == bindparam("workflow_id"))
    if owner:
        query = query.where(WE.c.triggered_by == bindparam("triggered_by"))
    if after:
        query = query.where(WE.c.created_at >= bindparam("created_after"))
    if before:
        query = query.where(WE.c.created_at < bindparam("created_before"))
    return query


def count_by_status(
    conn: Connection, where: ExecutionFilter, *, by_workflow: bool = False
) -> list[StatusCount]:
    """Counts of the executions ``where`` selects (its statuses ignored), by status, and
    by workflow too with ``by_workflow``; statuses with none are absent."""
    statement = _statement(
        by_workflow,
        where.workflow_id is not None,
        where.triggered_by is not None,
        where.created_after is not None,
        where.created_before is not None,
    )
    values = {
        "workflow_id": where.workflow_id,
        "triggered_by": where.triggered_by,
        "created_after": where.created_after,
        "created_before": where.created_before,
    }
    bound = {name: value for name, value in values.items() if value is not None}
    return [
        StatusCount(
            status=row.status,
            count=int(row.n),
            workflow=row.workflow_id if by_workflow else None,
        )
        for row in conn.execute(statement, bound)
    ]
