"""What is open right now: steps queued, running and waiting, by workflow (queued, by
version and step too, for the queue each goes to; waiting, by wait kind), read at
metrics scrapes.

One statement, built once: a scan of each status's partial index on ``execution_steps``
(so its cost follows the open steps, not the table), joined to each step's execution for
its workflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    CompoundSelect,
    Connection,
    Integer,
    String,
    Table,
    func,
    literal,
    select,
    union_all,
)

from core.models import StepExecution, WorkflowExecution
from core.states import StepStatus

SE = cast(Table, StepExecution.__table__)
WE = cast(Table, WorkflowExecution.__table__)


@dataclass(frozen=True)
class OpenSteps:
    """How many steps of one workflow are in one open status (waiting ones: of one wait
    kind, ``sleep``, ``event`` or ``child``; None for the others; queued ones: of one
    version and step, whose definition names their queue; None for the others)."""

    workflow: str
    status: str
    count: int
    kind: str | None = None
    version: int | None = None
    step: str | None = None


@cache
def _open_steps() -> CompoundSelect[Any]:
    # One SELECT per status, each matching its partial index's predicate exactly
    # (an IN over both statuses would match neither, and scan the table).
    joined = SE.join(WE, WE.c.execution_id == SE.c.execution_id)
    no_kind = literal(None, String).label("kind")
    no_version = literal(None, Integer).label("version")
    no_step = literal(None, String).label("step")
    # Queued by step: which queue a step goes to is in its definition (``queue=``), not
    # in its row; the grouping adds no rows read to the partial index's scan.
    queued = (
        select(
            WE.c.workflow_id,
            SE.c.status,
            no_kind,
            func.count().label("steps"),
            WE.c.workflow_version.label("version"),
            SE.c.step_name.label("step"),
        )
        .select_from(joined)
        .where(SE.c.status == StepStatus.QUEUED.value)
        .group_by(WE.c.workflow_id, SE.c.status, WE.c.workflow_version, SE.c.step_name)
    )
    running = (
        select(WE.c.workflow_id, SE.c.status, no_kind, func.count(), no_version, no_step)
        .select_from(joined)
        .where(SE.c.status == StepStatus.RUNNING.value)
        .group_by(WE.c.workflow_id, SE.c.status)
    )
    waiting = (
        select(
            WE.c.workflow_id,
            SE.c.status,
            SE.c.wait_kind.label("kind"),
            func.count(),
            no_version,
            no_step,
        )
        .select_from(joined)
        .where(SE.c.status == StepStatus.WAITING.value)
        .group_by(WE.c.workflow_id, SE.c.status, SE.c.wait_kind)
    )
    return union_all(queued, running, waiting)


def open_steps(conn: Connection) -> list[OpenSteps]:
    """Counts of queued steps by workflow, version and step, of running steps by
    workflow, and of waiting ones by workflow and wait kind (none: absent)."""
    return [
        OpenSteps(row.workflow_id, row.status, int(row.steps), row.kind, row.version, row.step)
        for row in conn.execute(_open_steps())
    ]
