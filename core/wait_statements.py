"""The statements of waiting steps (sleeps, event waits, children), built once with bind
parameters (``wait_statements()``): entering ``waiting``, arming, ending a wait, the
waker's due scan, and the event inbox.

A waiting step is a row, never a message: every statement here is a compare-and-set
on ``status = 'waiting'`` (or ``'pending'`` to enter it), by primary key, except the
waker's scan, which names no execution and leads with ``wake_at``
(``ix_execution_steps_waiting_wake``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    Float,
    Insert,
    Integer,
    Select,
    String,
    Table,
    Update,
    and_,
    bindparam,
    case,
    column,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
    values,
)
from sqlalchemy import cast as cast_
from sqlalchemy.dialects.postgresql import JSONB

from core.models import InboxEvent, StepExecution, WorkflowExecution
from core.sql import utcnow
from core.statements import unlocked_executions
from core.states import STEPS, ExecutionStatus, StepStatus

SE = cast(Table, StepExecution.__table__)
WE = cast(Table, WorkflowExecution.__table__)
IB = cast(Table, InboxEvent.__table__)
# The class of the advisory locks sending an event and establishing its wait take, per
# (name, key), beside core.statements.FINISH_LOCK: "evt".
EVENT_LOCK = 0x657674

WAITING = StepStatus.WAITING.value
# What establishing a wait reads of its execution (its id first).
EXECUTION_COLUMNS = (
    WE.c.execution_id,
    WE.c.workflow_id,
    WE.c.workflow_version,
    WE.c.priority,
    WE.c.input_data,
    WE.c.created_at,
    WE.c.deadline_at,
    WE.c.triggered_by,
    WE.c.depth,
    WE.c.root_execution_id,
    WE.c.status,
)
STEP_COLUMNS = (
    SE.c.execution_id,
    SE.c.step_name,
    SE.c.previous_status,
    SE.c.status,
    SE.c.attempt,
    SE.c.recoveries,
)


def _edge(source: StepStatus, target: StepStatus) -> str:
    STEPS.check(source, target)
    return source.value


@dataclass(frozen=True)
class WaitStatements:
    """The statements of waiting steps (one set per process; both dialects)."""

    release: Update
    arm_roots: Update
    execution: Select[Any]
    arm: Update
    end: Update
    rearm: Update
    defer: Update
    due: Select[Any]
    next_due: Select[Any]
    take_signal: Update
    take_event: Update
    insert_event: Insert
    oldest_wait: Select[Any]
    event_lock: Select[Any]


@cache
def wait_statements() -> WaitStatements:
    """The statements, built on first use, then reused (bind parameters only)."""
    now = utcnow()
    eid = bindparam("eid", type_=String)
    step = bindparam("step", type_=String)
    pending = _edge(StepStatus.PENDING, StepStatus.WAITING)
    reaches_zero = SE.c.unmet_deps == 1
    # Wait nodes downstream of a completed step: the one transaction that brings a
    # node's count to zero moves it to waiting (an atomic decrement, as for task steps).
    release = (
        update(SE)
        .where(
            SE.c.execution_id == eid,
            SE.c.step_name.in_(bindparam("names", expanding=True)),
            SE.c.status == pending,
            SE.c.unmet_deps > 0,
        )
        .values(
            unmet_deps=SE.c.unmet_deps - 1,
            status=case((reaches_zero, WAITING), else_=SE.c.status),
            previous_status=case((reaches_zero, SE.c.status), else_=SE.c.previous_status),
            waiting_since=case((reaches_zero, now), else_=SE.c.waiting_since),
            updated_at=now,
        )
        .returning(*STEP_COLUMNS)
    )
    # Wait nodes with nothing left upstream of a started execution: its root waits, and
    # after an execution retry, waits whose upstream steps had succeeded. Gated ones
    # (``gated``: a condition or a trigger) are decided first, by core.conditions.admit.
    arm_roots = (
        update(SE)
        .where(
            SE.c.execution_id.in_(bindparam("eids", expanding=True)),
            SE.c.status == pending,
            SE.c.unmet_deps == 0,
            SE.c.wait_kind.is_not(None),
            SE.c.step_name.not_in(bindparam("gated", expanding=True)),
        )
        .values(status=WAITING, previous_status=SE.c.status, waiting_since=now, updated_at=now)
        .returning(*STEP_COLUMNS)
    )
    execution = select(
        *EXECUTION_COLUMNS[1:],
        WE.c.parked_at,
    ).where(WE.c.execution_id == eid)
    waiting_here = (
        SE.c.execution_id == eid,
        SE.c.step_name == step,
        SE.c.attempt == bindparam("att", type_=Integer),
        SE.c.status == WAITING,
    )
    # What the wait waits for, and when the waker acts on it (NULL: never by itself).
    arm = (
        update(SE)
        .where(*waiting_here)
        .values(
            wake_at=bindparam("wake_at", type_=SE.c.wake_at.type),
            wait_event=bindparam("event", type_=String),
            wait_key=bindparam("key", type_=String),
            child_execution_id=bindparam("child", type_=String),
            updated_at=now,
        )
        .returning(SE.c.wake_at)
    )
    end = (
        update(SE)
        .where(*waiting_here)
        .values(
            status=bindparam("to", type_=String),
            previous_status=SE.c.status,
            output_data=bindparam("out", type_=SE.c.output_data.type),
            error=bindparam("err", type_=SE.c.error.type),
            finished_at=now,
            updated_at=now,
        )
        .returning(*STEP_COLUMNS)
    )
    _edge(StepStatus.WAITING, StepStatus.WAITING)
    # A wait's Retry after a timeout or a child's failure: waiting again at the next
    # attempt, unarmed, due when the backoff ends; the waker then arms it afresh.
    rearm = (
        update(SE)
        .where(*waiting_here)
        .values(
            attempt=SE.c.attempt + 1,
            previous_status=SE.c.status,
            error=bindparam("err", type_=SE.c.error.type),
            wake_at=utcnow(bindparam("delay", type_=Float)),
            wait_event=None,
            wait_key=None,
            child_execution_id=None,
            updated_at=now,
        )
        .returning(*STEP_COLUMNS)
    )
    # A due wait its waker cannot act on (it does not know the workflow): due later.
    defer = (
        update(SE)
        .where(*waiting_here)
        .values(wake_at=utcnow(bindparam("delay", type_=Float)), updated_at=now)
        .returning(SE.c.wake_at)
    )
    # The waker's scan: exactly the predicate of ix_execution_steps_waiting_wake.
    due_rows = (
        select(
            SE.c.execution_id,
            SE.c.step_name,
            SE.c.attempt,
            SE.c.recoveries,
            SE.c.wait_kind,
            SE.c.wake_at,
            SE.c.wait_event,
            SE.c.wait_key,
            SE.c.child_execution_id,
        )
        .where(SE.c.status == WAITING, SE.c.wake_at.is_not(None), SE.c.wake_at <= now)
        .order_by(SE.c.wake_at)
        .limit(bindparam("limit", type_=Integer))
        .with_for_update(skip_locked=True)
    )
    next_due = select(func.min(SE.c.wake_at)).where(
        SE.c.status == WAITING, SE.c.wake_at.is_not(None)
    )
    consumed = {
        "consumed_at": now,
        "consumed_by_execution": eid,
        "consumed_by_step": step,
    }
    signal_id = (
        select(IB.c.id)
        .where(
            IB.c.consumed_at.is_(None),
            IB.c.target_execution_id == eid,
            IB.c.target_step == step,
        )
        .order_by(IB.c.id)
        .limit(1)
        .scalar_subquery()
    )
    # consumed_at IS NULL again on the row itself: the lock already orders the takes,
    # and an event is never taken twice even where it would not.
    take_signal = (
        update(IB)
        .where(IB.c.id == signal_id, IB.c.consumed_at.is_(None))
        .values(**consumed)
        .returning(IB.c.id, IB.c.payload, IB.c.actor)
    )
    event_id = (
        select(IB.c.id)
        .where(
            IB.c.consumed_at.is_(None),
            IB.c.name == bindparam("ev_name", type_=String),
            IB.c.event_key == bindparam("ev_key", type_=String),
            # Never an event older than the execution: last month's approval of the
            # same invoice is not this execution's.
            IB.c.created_at >= bindparam("since", type_=IB.c.created_at.type),
            IB.c.target_execution_id.is_(None),
        )
        .order_by(IB.c.id)
        .limit(1)
        .scalar_subquery()
    )
    take_event = (
        update(IB)
        .where(IB.c.id == event_id, IB.c.consumed_at.is_(None))
        .values(**consumed)
        .returning(IB.c.id, IB.c.payload, IB.c.actor)
    )
    insert_event = insert(IB).returning(IB.c.id)
    # The oldest open wait for (name, key), with what ending it needs of its execution;
    # only the step row is locked (SKIP LOCKED: whoever holds a waiting row is ending it).
    oldest_wait = (
        select(SE.c.execution_id, SE.c.step_name, SE.c.attempt, *EXECUTION_COLUMNS[1:])
        .join_from(SE, WE, WE.c.execution_id == SE.c.execution_id)
        .where(
            SE.c.status == WAITING,
            SE.c.wait_event == bindparam("name", type_=String),
            SE.c.wait_key == bindparam("key", type_=String),
        )
        .order_by(SE.c.waiting_since, SE.c.execution_id, SE.c.step_name)
        .limit(1)
        .with_for_update(of=SE, skip_locked=True)
    )
    event_lock = select(
        func.pg_advisory_xact_lock(
            literal(EVENT_LOCK),
            func.hashtext(
                bindparam("name", type_=String)
                .op("||")(func.chr(31))
                .op("||")(bindparam("key", type_=String))
            ),
        )
    )
    return WaitStatements(
        release=release,
        arm_roots=arm_roots,
        execution=execution,
        arm=arm,
        end=end,
        rearm=rearm,
        defer=defer,
        due=due_rows,
        next_due=next_due,
        take_signal=take_signal,
        take_event=take_event,
        insert_event=insert_event,
        oldest_wait=oldest_wait,
        event_lock=event_lock,
    )


def repark(execution_ids: list[str]) -> Update:
    """Set ``parked_at`` on those running executions whose open steps all wait (some
    waiting, none queued or running), clear it on the others: a parked execution holds
    no max_concurrency slot. Run after the executions' finish locks
    (``core.statements.lock_executions``): its snapshot then sees every step committed
    by an earlier holder."""

    def has(statuses: list[str]) -> Any:
        return exists().where(SE.c.execution_id == WE.c.execution_id, SE.c.status.in_(statuses))

    busy = or_(
        has([StepStatus.QUEUED.value, StepStatus.RUNNING.value]),
        # A map's items are work in progress, not a wait: its execution keeps its slot.
        exists().where(
            SE.c.execution_id == WE.c.execution_id,
            SE.c.status == WAITING,
            SE.c.wait_kind == "map",
        ),
    )
    parked = and_(~busy, has([WAITING]))
    return (
        update(WE)
        .where(
            # Never waits for an execution row another transaction holds: whoever holds
            # it is ending the execution (a cancel, a time-out), as finish_pg assumes.
            WE.c.execution_id.in_(unlocked_executions(list(execution_ids))),
            WE.c.status == ExecutionStatus.RUNNING.value,
        )
        .values(parked_at=case((parked, func.coalesce(WE.c.parked_at, utcnow())), else_=None))
        .returning(WE.c.execution_id, WE.c.workflow_id, WE.c.parked_at)
    )


def end_many(ends: Sequence[Any]) -> Update:
    """PostgreSQL: end many waits in one UPDATE, each still waiting at its attempt, to
    its own status, output and error (``ends``: objects with execution_id, step_name,
    attempt, to, output, error)."""
    rows = values(
        column("eid", String),
        column("step", String),
        column("att", Integer),
        column("to", String),
        column("out", JSONB),
        column("err", JSONB),
        name="v",
    ).data([(e.execution_id, e.step_name, e.attempt, e.to, e.output, e.error) for e in ends])
    now = utcnow()
    return (
        update(SE)
        .where(
            SE.c.execution_id == rows.c.eid,
            SE.c.step_name == rows.c.step,
            SE.c.attempt == rows.c.att,
            SE.c.status == WAITING,
        )
        .values(
            status=rows.c.to,
            previous_status=SE.c.status,
            # A column of NULLs only would be read as text: cast, as the columns are.
            output_data=cast_(rows.c.out, JSONB),
            error=cast_(rows.c.err, JSONB),
            finished_at=now,
            updated_at=now,
        )
        .returning(*STEP_COLUMNS)
    )


def release_many(countdowns: Mapping[tuple[str, str], int]) -> Update:
    """PostgreSQL: count down many (execution, step) pairs by their number of upstream
    steps just ended, queueing each that reaches zero: the atomic decrement of
    ``hot_path().release``, over a set."""
    rows = values(
        column("eid", String), column("step", String), column("n", Integer), name="r"
    ).data([(eid, step, n) for (eid, step), n in countdowns.items()])
    now = utcnow()
    reaches_zero = SE.c.unmet_deps == rows.c.n
    return (
        update(SE)
        .where(
            SE.c.execution_id == rows.c.eid,
            SE.c.step_name == rows.c.step,
            SE.c.status == StepStatus.PENDING.value,
            SE.c.unmet_deps >= rows.c.n,
        )
        .values(
            unmet_deps=SE.c.unmet_deps - rows.c.n,
            status=case((reaches_zero, StepStatus.QUEUED.value), else_=SE.c.status),
            previous_status=case((reaches_zero, SE.c.status), else_=SE.c.previous_status),
            queued_at=case((reaches_zero, now), else_=SE.c.queued_at),
            updated_at=now,
        )
        .returning(*STEP_COLUMNS)
    )


def executions_many(execution_ids: Sequence[str]) -> Select[Any]:
    """What establishing and ending waits read of many executions: one SELECT."""
    return select(*EXECUTION_COLUMNS).where(WE.c.execution_id.in_(list(execution_ids)))
