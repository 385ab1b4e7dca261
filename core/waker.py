"""The waker: due waits (a sleep's end, an event wait's timeout, a retry's backoff over),
taken in batches by ``wake_due`` (beat's ``conveyor.wake``, through ``Engine.wake``).

It names no execution: its scan leads with ``wake_at`` (``ix_execution_steps_waiting_wake``)
and takes rows ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so overlapping passes take
disjoint rows; with nothing due it is one probe of that index and writes nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row

from core.errors import WaitTimedOut
from core.outcomes import WaitOutcome
from core.states import StepStatus
from core.wait_statements import wait_statements
from core.waits import (
    DefinitionOf,
    WaitEnd,
    end_waits,
    establish,
    executions_of,
    fail_or_retry,
)
from core.workflows import EventWait, Sleep

log = logging.getLogger(__name__)

# How far a due wait of a workflow this process does not know is put off, for a waker
# that knows it (its wake_at would otherwise make it due on every tick here).
UNKNOWN_DEFER_SECONDS = 30.0


def wake_due(conn: Connection, limit: int, definition_of: DefinitionOf) -> WaitOutcome:
    """Take up to ``limit`` waits due now (``wake_at`` passed; ``FOR UPDATE SKIP LOCKED``
    on PostgreSQL, so overlapping wakers take disjoint rows) and act on each: a sleep
    succeeds with its wake time, an event wait times out, a wait whose retry backoff
    ended is armed afresh. With nothing due this is one index probe and writes nothing."""
    ws = wait_statements()
    rows = conn.execute(ws.due, {"limit": limit}).all()
    outcome = WaitOutcome(taken=len(rows))
    if not rows:
        # Nothing is due now: when the next one is, for the caller's next tick.
        outcome.next_due = conn.execute(ws.next_due).scalar()
        return outcome
    executions = executions_of(conn, sorted({row.execution_id for row in rows}), definition_of)
    ends: list[WaitEnd] = []
    known = {k: v for k, v in executions.items() if v is not None}
    for row in rows:
        execution = executions[row.execution_id]
        if execution is None:
            _defer_unknown(conn, row)
            continue
        step = execution.workflow.steps.get(row.step_name)
        wait = None if step is None else step.wait
        if step is None or (wait is None and not step.limits):
            _defer_unknown(conn, row)
        elif isinstance(wait, Sleep):
            late = (datetime.now(UTC) - row.wake_at).total_seconds()
            outcome.lags.append((execution.workflow.name, max(0.0, late)))
            ends.append(
                WaitEnd(
                    row.execution_id,
                    row.step_name,
                    row.attempt,
                    StepStatus.SUCCEEDED.value,
                    output=row.wake_at.isoformat(),
                    reason="woke up",
                    how="due",
                )
            )
        elif isinstance(wait, EventWait) and row.wait_event is not None:
            message = f"no event {wait.event} for key {row.wait_key!r} within {wait.timeout}"
            if wait.fails_on_timeout:
                fail_or_retry(
                    conn,
                    execution,
                    step,
                    row.attempt,
                    row.recoveries,
                    WaitTimedOut(message),
                    "timeout",
                    definition_of,
                    outcome,
                )
            else:
                ends.append(
                    WaitEnd(
                        row.execution_id,
                        row.step_name,
                        row.attempt,
                        StepStatus.SUCCEEDED.value,
                        output=wait.on_timeout,
                        reason=f"timed out: {message}; using on_timeout",
                        how="timeout",
                    )
                )
        elif row.wait_event is None and row.child_execution_id is None:
            # A retry's backoff ended: arm the wait afresh at its new attempt.
            establish(conn, execution, [row], {}, definition_of, outcome)
    if ends:
        end_waits(conn, ends, known, definition_of, outcome)
    if len(rows) < limit:
        # Read after the ends: the rows just taken were still waiting before them, and
        # would make the next due look past (so no follow-up would be sent).
        outcome.next_due = conn.execute(ws.next_due).scalar()
    return outcome


def _defer_unknown(conn: Connection, row: Row[Any]) -> None:
    """A due wait of a workflow (or step) this process does not know, as in a rolling
    deploy where older and newer workers share the beat: never failed here. Its wake
    time moves UNKNOWN_DEFER_SECONDS on, so a waker that knows the workflow takes it
    then, and it stays visibly waiting (and cancellable) until one does."""
    deferred = conn.execute(
        wait_statements().defer,
        {
            "eid": row.execution_id,
            "step": row.step_name,
            "att": row.attempt,
            "delay": UNKNOWN_DEFER_SECONDS,
        },
    ).first()
    if deferred is not None:
        log.warning(
            "wait %s/%s is due but this process does not know its workflow or step: "
            "left waiting for a worker that does (again in %.0f s)",
            row.execution_id,
            row.step_name,
            UNKNOWN_DEFER_SECONDS,
        )
