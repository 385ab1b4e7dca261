"""What is open right now: steps queued, running and waiting, by workflow (and, waiting,
by wait kind), read at metrics scrapes.

One statement, built once: a scan of each status's partial index on ``execution_steps``
(so its cost follows the open steps, not the table), joined to each step's execution for
its workflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import CompoundSelect, Connection, String, Table, func, literal, select, union_all

from core.models import StepExecution, WorkflowExecution
from core.states import StepStatus

SE = cast(Table, StepExecution.__table__)
WE = cast(Table, WorkflowExecution.__table__)
OPEN_STATUSES = (StepStatus.QUEUED, StepStatus.RUNNING)


@dataclass(frozen=True)
class OpenSteps:
    """How many steps of one workflow are in one open status (waiting ones: of one wait
    kind, ``sleep``, ``event`` or ``child``; None for the others)."""

    workflow: str
    status: str
    count: int
    kind: str | None = None


@cache
def _open_steps() -> CompoundSelect[Any]:
    # One SELECT per status, each matching its partial index's predicate exactly
    # (an IN over both statuses would match neither, and scan the table).
    joined = SE.join(WE, WE.c.execution_id == SE.c.execution_id)
    no_kind = literal(None, String).label("kind")
    parts = [
        select(WE.c.workflow_id, SE.c.status, no_kind, func.count().label("steps"))
        .select_from(joined)
        .where(SE.c.status == status.value)
        .group_by(WE.c.workflow_id, SE.c.status)
        for status in OPEN_STATUSES
    ]
    waiting = (
        select(WE.c.workflow_id, SE.c.status, SE.c.wait_kind.label("kind"), func.count())
        .select_from(joined)
        .where(SE.c.status == StepStatus.WAITING.value)
        .group_by(WE.c.workflow_id, SE.c.status, SE.c.wait_kind)
    )
    return union_all(*parts, waiting)


def open_steps(conn: Connection) -> list[OpenSteps]:
    """Counts of queued, running and waiting steps by workflow, the waiting ones by wait
    kind (workflows with none are absent)."""
    return [
        OpenSteps(row.workflow_id, row.status, int(row.steps), row.kind)
        for row in conn.execute(_open_steps())
    ]
