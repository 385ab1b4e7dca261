"""Repairing maps: re-running only the failed items of a failed map
(``retry_failed_items``, ``conveyor retry --failed-items``) and the reconciler's pass
over items (``reconcile_items``: stalled items recovered, due and unclaimed ones re-sent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Connection, select, update

from core.errors import NothingToRetry
from core.map_statements import (
    MI,
    due_items,
    recover_items,
    republish_items,
    stalled_items,
)
from core.maps import ItemKey, _event, _events, _item_claim, fail_item, map_counts
from core.models import MapItem, StepExecution
from core.outcomes import TransitionResult, WaitOutcome
from core.states import StepStatus
from core.step_statements import hot_path
from core.waits import DefinitionOf, wait_error

SE_TABLE = StepExecution.__table__


def retry_failed_items(
    conn: Connection,
    execution_id: str,
    graph: Mapping[str, Sequence[str]],
    deadline: timedelta | None,
) -> tuple[TransitionResult, dict[str, int]]:
    """Retry a failed execution keeping what its failed maps' items did: the execution
    goes back to pending (``core.executions.retry_execution``), and the failed and
    cancelled items of each failed map step go pending at their next attempt (their
    retry policy whole again); succeeded items keep their outputs. When the map runs
    again (``expand``) it runs those items only, and aggregates every item's output.
    How many items each map runs again. NothingToRetry when no map step failed with
    items to run again."""
    from core.executions import retry_execution

    failed_maps = list(
        conn.execute(
            select(SE_TABLE.c.step_name).where(
                SE_TABLE.c.execution_id == execution_id,
                SE_TABLE.c.status == StepStatus.FAILED.value,
                SE_TABLE.c.wait_kind == "map",
            )
        ).scalars()
    )
    again = (StepStatus.FAILED.value, StepStatus.CANCELLED.value)
    counts = {
        name: sum(
            n for status, n in map_counts(conn, execution_id, name).items() if status in again
        )
        for name in failed_maps
    }
    counts = {name: n for name, n in counts.items() if n}
    if not counts:
        raise NothingToRetry(
            execution_id,
            "no map step failed with items to run again (retry the execution whole instead)",
        )
    result = retry_execution(conn, execution_id, graph, deadline, reason="retry failed items")
    if not result.applied:
        return result, {}
    conn.execute(
        update(MapItem)
        .where(
            MI.execution_id == execution_id,
            MI.step_name.in_(list(counts)),
            MI.status.in_(again),
        )
        .values(
            status=StepStatus.PENDING.value,
            # SET reads the old values: the attempts so far are this run's base.
            attempt=MI.attempt + 1,
            recoveries=MI.attempt,
            attempt_base=MI.attempt,
            worker=None,
            celery_task_id=None,
            queued_at=None,
            started_at=None,
            finished_at=None,
            heartbeat_at=None,
            next_attempt_at=None,
            republished_at=None,
            republishes=0,
        )
    )
    return result, counts


# --- the reconciler's part -----------------------------------------------------------


@dataclass
class ItemRepair:
    """What a reconciler pass did to map items: those to (re)publish, and counts."""

    publish: list[ItemKey] = field(default_factory=list)
    recovered: int = 0
    crashed: int = 0
    republished: int = 0


def reconcile_items(
    conn: Connection,
    *,
    stall_timeout: float,
    republish_after: float,
    limit: int,
    max_recoveries: int,
    gap: float,
    definition_of: DefinitionOf,
    outcome: WaitOutcome,
) -> ItemRepair:
    """The reconciler's pass over map items, as over steps: running items whose worker
    is gone (old heartbeat, on the evidence of a reachable database) are queued again
    at the next attempt, or failed (StepCrashed) when this run's crash recoveries are
    spent; queued items that are due (a retry's backoff over) or whose message went
    unclaimed (``republish_after``, doubling per re-send) are sent again."""
    from core.errors import StepCrashed

    repair = ItemRepair()
    stalled = conn.execute(stalled_items(stall_timeout, gap, limit)).all()
    give_up = [r for r in stalled if r.recoveries - r.attempt_base >= max_recoveries]
    again = [r for r in stalled if r.recoveries - r.attempt_base < max_recoveries]
    if again:
        keys = [(r.execution_id, r.step_name, r.item_index) for r in again]
        requeued = conn.execute(recover_items(keys)).all()
        repair.recovered = len(requeued)
        repair.publish += [(r.execution_id, r.step_name, r.item_index) for r in requeued]
        _events(
            conn,
            [
                _event(
                    r.execution_id,
                    r.step_name,
                    StepStatus.WAITING.value,
                    r.attempt,
                    f"item {r.item_index}: worker lost, queued again",
                )
                for r in requeued
            ],
        )
    for row in give_up:
        route_row = conn.execute(
            hot_path(conn.dialect.name).execution, {"eid": row.execution_id}
        ).one()
        workflow = definition_of(route_row.workflow_id, route_row.workflow_version)
        step = workflow.steps.get(row.step_name) if workflow else None
        if workflow is None or step is None:
            continue  # a worker that knows the workflow fails it
        claim = _item_claim(
            conn, row.execution_id, step, row.item_index, row.attempt, row.recoveries, False
        )
        crash = StepCrashed(
            f"{row.step_name}[{row.item_index}]",
            row.worker,
            row.attempt - row.attempt_base,
            row.recoveries - row.attempt_base,
        )
        ended = fail_item(conn, claim, wait_error(crash), workflow, definition_of)
        if ended.applied:
            repair.crashed += 1
            repair.publish += ended.queued
            if ended.woken is not None:
                outcome.merge(ended.woken)
    due = conn.execute(due_items(republish_after, limit)).all()
    if due:
        keys = [(r.execution_id, r.step_name, r.item_index) for r in due]
        sent = conn.execute(republish_items(keys)).all()
        repair.republished = len(sent)
        repair.publish += [(r.execution_id, r.step_name, r.item_index) for r in sent]
    return repair
