"""The reconciler's pass: stalled steps recovered or failed, lost messages republished,
unstarted executions started, deadlines enforced, finished executions closed, parents
of ended child executions told, expired events dropped.

One pass is one transaction of a handful of bounded, set-based statements, idempotent:
passes may overlap, and every change is a compare-and-set only one of them wins. Its
cost follows the work it finds (partial indexes), not the size of the tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection

from core import statements as sql
from core.children import wake_parents_of, wake_unwoken
from core.errors import StepCrashed
from core.events import expire_events
from core.executions import execution_routes, finish_executions, time_out
from core.limits import readmit_recovered, sweep
from core.models import ExecutionEvent
from core.outcomes import (
    ReconcileReport,
    StallRecovery,
    StepCrash,
    TransitionResult,
    WaitOutcome,
)
from core.states import ExecutionStatus
from core.steps import skip_descendants
from core.transitions import event_rows, transition_of
from core.waits import registered
from core.workflows import Dag, Workflow

# A workflow's definition by (name, version); None when this process does not know it.
DagOf = Callable[[str, int], Dag | None]


def recover_stalled_steps(
    conn: Connection, keys: Sequence[tuple[str, str]], max_recoveries: int
) -> StallRecovery:
    """Requeue stalled running steps that may be recovered again (attempt + 1); fail
    the rest with StepCrashed, naming the worker and the attempts."""
    if not keys:
        return StallRecovery()
    requeued_rows = (
        conn.execute(sql.recover_stalled(keys, requeue=True, max_recoveries=max_recoveries))
    ).all()
    failed_rows = (
        conn.execute(sql.recover_stalled(keys, requeue=False, max_recoveries=max_recoveries))
    ).all()
    crashes = [
        StepCrash(
            row.execution_id,
            row.step_name,
            row.attempt,
            str(
                StepCrashed(
                    row.step_name, row.worker, row.attempt, row.recoveries - row.attempt_base
                )
            ),
        )
        for row in failed_rows
    ]
    if failed_rows:
        errors = [
            {
                "eid": row.execution_id,
                "name": row.step_name,
                "err": {
                    "type": "StepCrashed",
                    "module": StepCrashed.__module__,
                    "message": crash.message,
                    "worker": row.worker,
                    "attempts": row.attempt,
                },
            }
            for row, crash in zip(failed_rows, crashes, strict=True)
        ]
        conn.execute(sql.set_step_errors(), errors)
    requeued = [transition_of(row, step=True) for row in requeued_rows]
    failed = [transition_of(row, step=True) for row in failed_rows]
    events = event_rows(requeued, "stalled: requeued") + event_rows(
        failed, "stalled: crashed too often"
    )
    if events:
        conn.execute(sql.insert_rows(ExecutionEvent), events)
    return StallRecovery(requeued=requeued, failed=failed, crashes=crashes)


def outage_gap(stall_timeout: float, reconcile_interval: float = 0.0) -> float:
    """How long the database may go unseen by reconciler passes before it is taken to
    have been out of reach (see ``statements.database_seen``): half the stall timeout,
    and never less than two reconcile intervals.

    Half the stall timeout is as long as it can safely be: an outage shorter than the
    gap goes unseen, and a live worker must still beat within the timeout after it (the
    other half is for its heartbeat interval and reconnecting). As long as it can be,
    because mistaking a quiet spell for an outage delays stall recovery by a timeout:
    beat sends a pass every interval and drops one unrun after two (``expires``), and a
    pass may wait for a free pool process. Two intervals at least, or every pass would
    reset the evidence and no stall would ever be judged (a reconcile interval longer
    than a quarter of the stall timeout: an outage shorter than the gap may then cost a
    re-run, as a lost worker would).
    """
    return max(stall_timeout / 2, 2 * reconcile_interval)


def observe_database(conn: Connection, gap_seconds: float) -> None:
    """Record that the database is reachable now (``database_liveness``): the evidence the
    stall scan judges on. The first statement of a pass, and of a lone stall scan."""
    conn.execute(sql.database_seen(conn.dialect.name, gap_seconds))


def find_stalled_steps(
    conn: Connection, stall_timeout_seconds: float, limit: int, gap_seconds: float | None = None
) -> list[tuple[str, str]]:
    """Keys of running steps whose heartbeat is older than the timeout, counted on time
    the database was reachable (see ``statements.stalled_steps``)."""
    gap = outage_gap(stall_timeout_seconds) if gap_seconds is None else gap_seconds
    observe_database(conn, gap)
    rows = conn.execute(sql.stalled_steps(stall_timeout_seconds, gap, limit)).all()
    return [(row.execution_id, row.step_name) for row in rows]


def restore_unsent(conn: Connection, undo: Sequence[Mapping[str, Any]]) -> int:
    """Make steps whose reconciler message failed to publish due at the next pass (the
    rows of ``ReconcileReport.unsent``); how many were still as the pass left them."""
    if not undo:
        return 0
    return conn.execute(sql.restore_unsent(), list(undo)).rowcount


def restore_unsent_starts(conn: Connection, undo: Sequence[Mapping[str, Any]]) -> int:
    """Make pending executions whose start message failed to publish due at the next
    pass (the rows of ``ReconcileReport.unsent_starts``); how many were still as the pass
    left them."""
    if not undo:
        return 0
    return conn.execute(sql.restore_unsent_starts(), list(undo)).rowcount


def _definition(dag_of: DagOf, workflow: str, version: int) -> Workflow | None:
    found = dag_of(workflow, version)
    return found if isinstance(found, Workflow) else registered(workflow, version)


def reconcile_pass(
    conn: Connection,
    *,
    stall_timeout: float,
    republish_after: float,
    start_after: float,
    limit: int,
    max_recoveries: int,
    dag_of: DagOf,
    gap: float | None = None,
) -> ReconcileReport:
    """One reconciler pass over stalled, unclaimed and unstarted work and deadlines.

    Each part is one bounded, set-based statement (or two), and idempotent: passes
    may overlap, and every change is a compare-and-set that only one of them wins.
    The whole pass is one transaction: a stalled step failed here has its descendants
    skipped and its execution finished in the same commit, so a crash cannot strand it.
    It first records that the database is reachable (``gap``: see ``outage_gap``; the
    row's lock makes overlapping passes take turns), and judges stalls on that evidence.
    """

    stalled = find_stalled_steps(conn, stall_timeout, limit, gap)
    recovery = recover_stalled_steps(conn, stalled, max_recoveries)
    if recovery.failed:
        routes = execution_routes(conn, sorted({r.execution_id for r in recovery.failed}))
        for failed in recovery.failed:
            route = routes[failed.execution_id]
            dag = dag_of(route.workflow, route.version)
            step_name = failed.step_name or ""
            skip_descendants(
                conn, failed.execution_id, step_name, dag.descendants(step_name) if dag else None
            )
    # Recovered steps behind limits are admitted again (waiting, due now), not sent.
    readmitted = readmit_recovered(
        conn,
        [(r.execution_id, r.step_name or "") for r in recovery.requeued],
        lambda workflow, version: _definition(dag_of, workflow, version),
    )
    if readmitted:
        recovery = replace(
            recovery,
            requeued=[
                r for r in recovery.requeued if (r.execution_id, r.step_name) not in readmitted
            ],
        )
    due_rows = conn.execute(sql.due_queued_steps(republish_after, limit)).all()
    due = {(r.execution_id, r.step_name): r for r in due_rows}
    republished: list[TransitionResult] = []
    # What each step sent by this pass returns to if its publish fails (restore_unsent).
    unsent: dict[tuple[str, str], dict[str, Any]] = {}
    if due:
        sent_rows = conn.execute(sql.republish(list(due))).all()
        republished = [transition_of(row, step=True) for row in sent_rows]
        conn.execute(sql.insert_rows(ExecutionEvent), event_rows(republished, "republished"))
        for row in sent_rows:
            before = due[(row.execution_id, row.step_name)]
            unsent[(row.execution_id, row.step_name)] = {
                "eid": row.execution_id,
                "name": row.step_name,
                "att": row.attempt,
                "sent_count": row.republishes,
                "prev_at": before.republished_at,
                "prev_count": before.republishes,
                "prev_next": before.next_attempt_at,
                "due_now": False,
            }
    for step in recovery.requeued:
        # Queued anew, never sent: if its first message fails, it is due at once.
        unsent[(step.execution_id, step.step_name or "")] = {
            "eid": step.execution_id,
            "name": step.step_name,
            "att": step.attempt,
            "sent_count": 0,
            "prev_at": None,
            "prev_count": 0,
            "prev_next": None,
            "due_now": True,
        }
    due_starts = {r.execution_id: r for r in conn.execute(sql.due_starts(start_after, limit))}
    start_rows = conn.execute(sql.resend_starts(list(due_starts))).all() if due_starts else []
    # What each start sent by this pass returns to if its publish fails.
    unsent_starts = {
        row.execution_id: {
            "eid": row.execution_id,
            "sent_count": row.starts_resent,
            "prev_at": due_starts[row.execution_id].start_resent_at,
            "prev_count": due_starts[row.execution_id].starts_resent,
        }
        for row in start_rows
    }

    def definition_of(workflow: str, version: int) -> Workflow | None:
        return _definition(dag_of, workflow, version)

    # What ending children set in motion in their parents (published by the caller).
    woken = WaitOutcome()
    # Map items, as steps above: stalled ones queued again (or failed), due ones re-sent.
    from core.map_repair import reconcile_items

    items = reconcile_items(
        conn,
        stall_timeout=stall_timeout,
        republish_after=republish_after,
        limit=limit,
        max_recoveries=max_recoveries,
        gap=outage_gap(stall_timeout) if gap is None else gap,
        definition_of=definition_of,
        outcome=woken,
    )
    overdue = list(conn.execute(sql.overdue_executions(limit)).scalars().all())
    # A child timed out here fails its parent step in this transaction.
    told: list[str] = []
    timed_out = time_out(conn, overdue, woken, definition_of, told)
    finishable = set(conn.execute(sql.finishable_executions(limit)).scalars().all())
    finishable.update(r.execution_id for r in recovery.failed)

    def sinks_of(workflow: str, version: int) -> list[str]:
        dag = dag_of(workflow, version)
        return dag.sinks if dag else []

    finished = finish_executions(conn, sorted(finishable), sinks_of)
    told += wake_parents_of(conn, [r.execution_id for r in finished], woken, definition_of)
    # The safety net: children whose end did not reach their parent (see wake_unwoken).
    told += wake_unwoken(conn, limit, woken, definition_of)
    events_expired = expire_events(conn, limit)
    # Slots whose holder ended by a path that did not free them, and waiters behind keys
    # with room: freed and admitted (published with ``woken``).
    slots_freed = sweep(conn, limit, woken, definition_of)
    freed_ids = [r.execution_id for r in finished] + [eid for eid, _ in timed_out]
    recovered_ids = [r.execution_id for r in recovery.requeued + recovery.failed]
    named = execution_routes(conn, sorted({*freed_ids, *recovered_ids}))
    ended = {r.execution_id: r.to_status for r in finished}
    ended.update((eid, ExecutionStatus.TIMED_OUT.value) for eid, _ in timed_out)
    return ReconcileReport(
        requeued=[(r.execution_id, r.step_name or "") for r in recovery.requeued],
        stalled_failed=[(r.execution_id, r.step_name or "") for r in recovery.failed],
        crashes=recovery.crashes,
        republish=[(r.execution_id, r.step_name or "") for r in republished]
        + [(r.execution_id, r.step_name or "") for r in recovery.requeued],
        start=[(r.execution_id, r.workflow_id, r.priority) for r in start_rows],
        timed_out=[eid for eid, _ in timed_out],
        finished=[r.execution_id for r in finished],
        freed=sorted({named[eid].workflow for eid in freed_ids if eid in named}),
        workflows={eid: route.workflow for eid, route in named.items()},
        ended=ended,
        unsent=unsent,
        unsent_starts=unsent_starts,
        waiting=list(conn.execute(sql.waiting_workflows(start_after, limit)).scalars()),
        events_expired=events_expired,
        parents_woken=told,
        woken=woken,
        items=items.publish,
        items_recovered=items.recovered,
        items_crashed=items.crashed,
        items_republished=items.republished,
        slots_freed=slots_freed,
    )
