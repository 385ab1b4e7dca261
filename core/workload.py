"""What is open right now: steps queued and running, by workflow (read at metrics scrapes).

One statement, built once: a scan of each status's partial index on ``execution_steps``
(so its cost follows the open steps, not the table), joined to each step's execution for
its workflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import CompoundSelect, Connection, Table, func, select, union_all

from core.models import StepExecution, WorkflowExecution
from core.states import StepStatus

SE = cast(Table, StepExecution.__table__)
WE = cast(Table, WorkflowExecution.__table__)
OPEN_STATUSES = (StepStatus.QUEUED, StepStatus.RUNNING)


@dataclass(frozen=True)
class OpenSteps:
    """How many steps of one workflow are in one open status."""

    workflow: str
    status: str
    count: int


@cache
def _open_steps() -> CompoundSelect[Any]:
    # One SELECT per status, each matching its partial index's predicate exactly
    # (an IN over both statuses would match neither, and scan the table).
    parts = [
        select(WE.c.workflow_id, SE.c.status, func.count().label("steps"))
        .select_from(SE.join(WE, WE.c.execution_id == SE.c.execution_id))
        .where(SE.c.status == status.value)
        .group_by(WE.c.workflow_id, SE.c.status)
        for status in OPEN_STATUSES
    ]
    return union_all(*parts)


def open_steps(conn: Connection) -> list[OpenSteps]:
    """Counts of queued and running steps by workflow (workflows with none are absent)."""
    return [
        OpenSteps(row.workflow_id, row.status, int(row.steps))
        for row in conn.execute(_open_steps())
    ]
