"""The statements of a step's claim and completion: built once per dialect, with bind
parameters (``hot_path``), the compare-and-set sources read from ``core.states``.

On PostgreSQL each unit is one statement: data-modifying CTEs write the transition, its
event rows and the release of downstream steps together, and return what the worker
needs. On SQLite (no RETURNING in CTEs) ``core.steps`` runs the same parts in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    CTE,
    Boolean,
    Float,
    Insert,
    Row,
    Select,
    String,
    Table,
    Text,
    Update,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy import cast as cast_
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.expression import Alias

from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from core.sql import utcnow
from core.statements import FINISH_LOCK, any_step_of_execution, final_outcome, unlocked_executions
from core.states import STEPS, ExecutionStatus, StepStatus

SE = cast(Table, StepExecution.__table__)
WE = cast(Table, WorkflowExecution.__table__)
EV = cast(Table, ExecutionEvent.__table__)
EVENT_COLUMNS = (
    "execution_id",
    "step_name",
    "from_status",
    "to_status",
    "attempt",
    "reason",
    "created_at",
)
CLAIMED = "claimed"
SUCCEEDED = "step succeeded"
RELEASED = "upstream steps done"
CONTINUED = "continued in worker"
CLAIMED_AT_START = "claimed at start"
HANDED_OFF = "handed off"
ALL_STEPS_FINAL = "all steps final"
ADMITTED = "admitted"
ROOT_STEP = "root step"


def _from(source: StepStatus, target: StepStatus) -> str:
    """``source``'s value, once the state table has confirmed ``source -> target``."""
    STEPS.check(source, target)
    return source.value


def _sources(target: StepStatus) -> list[str]:
    """Every status the table lets ``target`` be reached from (a compare-and-set's WHERE)."""
    return sorted(s.value for s in STEPS.sources_of(target))


def _status_in(column: Any, target: StepStatus) -> Any:
    """``column`` is a status ``target`` may be reached from. Each status is its own bind
    parameter: a list would be an "expanding" parameter, which SQLAlchemy renders into
    the SQL text again on every execution."""
    return column.in_([literal(status) for status in _sources(target)])


def _step_named(column: Any, name: str) -> Any:
    """``column`` (a step name, beside its execution id) is one of the list bound as
    ``name``: an expanding IN, rendered as one parameter per name.

    Not ``= ANY(:array)``, whose text would be the same for every length: psycopg
    prepares a statement after a few executions, and PostgreSQL's generic plan for an
    array of unknown length filters every step row of the execution instead of probing
    the primary key (measured: 999 rows removed per completion in a 1,000-step chain).
    A list of parameters tells the planner how many names there are.
    """
    return column.in_(bindparam(name, expanding=True))


@dataclass(frozen=True)
class HotPath:
    """The statements of a step's claim and completion for one dialect.

    On PostgreSQL each unit is one statement: data-modifying CTEs write the transition,
    its event rows and the release of downstream steps together, and return what the
    worker needs. On SQLite (no RETURNING in CTEs) the same parts run in turn.
    """

    fused: bool
    claim: Update
    claim_pg: Select[Any]
    execution: Select[Any]
    outputs: Select[Any]
    complete: Update
    complete_pg: Select[Any]
    release: Update
    continue_step: Update
    current: Select[Any]
    events: Insert
    finish: Update
    finish_pg: Select[Any]
    lock_execution: Select[Any]
    start: Update
    start_roots: Update
    start_pg: Select[Any]
    hold: Update
    continue_held: Update
    continue_held_pg: Select[Any]
    hand_off: Update


def _json_param(name: str, postgres: bool) -> Any:
    # The worker encodes each output once (it measures its size from that text); the
    # text is bound as it is and read by the database as JSON.
    text = bindparam(name, type_=Text)
    return cast_(text, JSONB) if postgres else text


@cache
def hot_path(dialect: str) -> HotPath:
    """The hot path's statements for ``dialect``, built on first use, then reused."""
    postgres = dialect == "postgresql"
    now = utcnow()
    eid = bindparam("eid", type_=String)
    running = StepStatus.RUNNING.value
    queued = StepStatus.QUEUED.value
    pending = _from(StepStatus.PENDING, StepStatus.QUEUED)
    execution_running = exists().where(
        WE.c.execution_id == eid, WE.c.status == ExecutionStatus.RUNNING.value
    )
    returning = _transition_columns(SE)

    claim = (
        update(SE)
        .where(
            SE.c.execution_id == eid,
            SE.c.step_name == bindparam("step"),
            _status_in(SE.c.status, StepStatus.RUNNING),
            or_(SE.c.next_attempt_at.is_(None), SE.c.next_attempt_at <= now),
            execution_running,
        )
        .values(
            status=running,
            previous_status=SE.c.status,
            worker=bindparam("worker_id"),
            celery_task_id=bindparam("task_id"),
            started_at=now,
            heartbeat_at=now,
            finished_at=None,
            next_attempt_at=None,
        )
        # queued_at and the new started_at: how long the step waited (a metric).
        .returning(*returning, SE.c.queued_at, SE.c.started_at)
    )
    execution = select(
        WE.c.workflow_id, WE.c.workflow_version, WE.c.priority, WE.c.input_data, WE.c.shape_hash
    ).where(WE.c.execution_id == eid)
    outputs = select(SE.c.step_name, SE.c.output_data).where(
        SE.c.execution_id == eid, _step_named(SE.c.step_name, "names")
    )

    complete = _complete(SE, eid, now, postgres)
    # Of any number of upstream steps finishing at once, exactly one transaction sees
    # a downstream step's count go from 1 to 0 (an atomic decrement), and it queues it.
    reaches_zero = SE.c.unmet_deps == 1
    in_downstream = (
        SE.c.execution_id == eid,
        _step_named(SE.c.step_name, "downstream"),
        SE.c.status == pending,
        SE.c.unmet_deps > 0,
    )
    release = (
        update(SE)
        .where(*in_downstream)
        .values(
            unmet_deps=SE.c.unmet_deps - 1,
            status=case((reaches_zero, queued), else_=SE.c.status),
            previous_status=case((reaches_zero, SE.c.status), else_=SE.c.previous_status),
            queued_at=case((reaches_zero, now), else_=SE.c.queued_at),
        )
        .returning(*returning)
    )
    continue_step = (
        update(SE)
        .where(
            SE.c.execution_id == eid,
            SE.c.step_name == bindparam("step"),
            SE.c.status == _from(StepStatus.QUEUED, StepStatus.RUNNING),
        )
        .values(
            status=running,
            previous_status=SE.c.status,
            worker=bindparam("worker_id"),
            celery_task_id=None,
            started_at=now,
            heartbeat_at=now,
        )
        .returning(*returning)
    )
    current = select(SE.c.status, SE.c.attempt).where(
        SE.c.execution_id == eid, SE.c.step_name == bindparam("step")
    )
    events = insert(EV)

    # PostgreSQL: the same parts as CTEs of one statement each.
    claimed = claim.cte("claimed")
    claim_event = (
        insert(EV)
        .from_select(EVENT_COLUMNS, _event_select(claimed, CLAIMED), include_defaults=False)
        .cte("claim_event")
    )
    upstream = (
        select(func.jsonb_object_agg(SE.c.step_name, SE.c.output_data, type_=JSONB))
        .where(SE.c.execution_id == eid, _step_named(SE.c.step_name, "names"))
        .scalar_subquery()
    )
    claim_pg = (
        select(
            claimed.c.attempt,
            claimed.c.recoveries,
            claimed.c.queued_at,
            claimed.c.started_at,
            WE.c.workflow_id,
            WE.c.workflow_version,
            WE.c.priority,
            WE.c.input_data,
            WE.c.shape_hash,
            upstream.label("upstream"),
        )
        .select_from(claimed.join(WE, WE.c.execution_id == claimed.c.execution_id))
        .add_cte(claim_event)
    )

    # Aliased "d", like "s" below, to keep the text under psycopg's cache limit.
    done = _complete(cast(Alias, SE.alias("d")), eid, now, postgres).cte("done")
    done_event = (
        insert(EV)
        .from_select(EVENT_COLUMNS, _event_select(done, SUCCEEDED), include_defaults=False)
        .cte("done_event")
    )
    # The worker continues with the first step (by name) this completion releases among
    # those it may run (``here``: the downstream steps of a queue it consumes; the same
    # list as ``downstream`` for a workflow with no ``queue=``, so the same cost). The
    # one-row CTE reads the rows as they were before this statement; whether a row
    # reaches zero is judged on the row the UPDATE locked (its atomic decrement).
    others = SE.alias("others")
    first = (
        # One row always (an aggregate): no name when nothing continues. Its execution_id
        # is the join condition that reads it into the UPDATE below.
        select(eid.label("execution_id"), func.min(others.c.step_name).label("name"))
        .where(
            bindparam("continue_here", type_=Boolean),
            others.c.execution_id == eid,
            _step_named(others.c.step_name, "here"),
            others.c.status == pending,
            others.c.unmet_deps == 1,
        )
        .cte("first_released")
    )
    # Aliased as "s", and with continue_here folded into first_released (no name: no
    # step continues), the statement stays under psycopg's 4 KiB query cache limit:
    # longer texts are parsed again on every execution.
    target = cast(Alias, SE.alias("s"))  # typed as a NamedFromClause, which update() refuses
    zero = target.c.unmet_deps == 1
    continues = and_(zero, target.c.step_name == first.c.name)
    released = (
        update(target)
        .where(
            target.c.execution_id == first.c.execution_id,
            _step_named(target.c.step_name, "downstream"),
            target.c.status == pending,
            target.c.unmet_deps > 0,
            exists(select(done.c.step_name)),
        )
        .values(
            unmet_deps=target.c.unmet_deps - 1,
            status=case((continues, running), (zero, queued), else_=target.c.status),
            previous_status=case(
                (continues, queued), (zero, target.c.status), else_=target.c.previous_status
            ),
            queued_at=case((zero, now), else_=target.c.queued_at),
            **_claimed_here(target, continues, now),
            updated_at=now,
        )
        .returning(*_transition_columns(target))
        .cte("released")
    )
    _from(StepStatus.QUEUED, StepStatus.RUNNING)  # continuing is queued -> running
    released_events = (
        insert(EV)
        .from_select(
            EVENT_COLUMNS,
            union_all(
                select(
                    released.c.execution_id,
                    released.c.step_name,
                    literal(pending),
                    literal(queued),
                    released.c.attempt,
                    literal(RELEASED),
                    now,
                ).where(released.c.status.in_([literal(queued), literal(running)])),
                select(
                    released.c.execution_id,
                    released.c.step_name,
                    literal(queued),
                    literal(running),
                    released.c.attempt,
                    literal(CONTINUED),
                    now,
                ).where(released.c.status == running),
            ),
            include_defaults=False,
        )
        .cte("released_events")
    )
    complete_pg = (
        select(
            done.c.attempt.label("done_attempt"),
            released.c.step_name,
            released.c.status,
            released.c.attempt,
            released.c.recoveries,
        )
        .select_from(done.outerjoin(released, true()))
        .add_cte(done_event)
        .add_cte(released_events)
    )
    finish = _finish(eid, now)
    finished = finish.cte("finished")
    finished_event = _execution_event(finished, ALL_STEPS_FINAL, now).cte("finished_event")
    finish_pg = select(*finished.c).add_cte(finished_event)
    lock_execution = select(func.pg_advisory_xact_lock(literal(FINISH_LOCK), func.hashtext(eid)))
    start, start_roots, start_pg = _start(eid, now)
    hold, continue_held, continue_held_pg, hand_off = _held(eid, now)
    return HotPath(
        fused=postgres,
        claim=claim,
        claim_pg=claim_pg,
        execution=execution,
        outputs=outputs,
        complete=complete,
        complete_pg=complete_pg,
        release=release,
        continue_step=continue_step,
        current=current,
        events=events,
        finish=finish,
        finish_pg=finish_pg,
        lock_execution=lock_execution,
        start=start,
        start_roots=start_roots,
        start_pg=start_pg,
        hold=hold,
        continue_held=continue_held,
        continue_held_pg=continue_held_pg,
        hand_off=hand_off,
    )


def _transition_columns(steps: Table | Alias) -> tuple[Any, ...]:
    """What a step statement returns of each row it moved (a TransitionResult, an event)."""
    c = steps.c
    return (c.execution_id, c.step_name, c.previous_status, c.status, c.attempt, c.recoveries)


def _claimed_here(target: Alias, claimed: Any, now: Any) -> dict[str, Any]:
    """The values of a step an UPDATE moves to running for ``worker_id`` where ``claimed``
    holds (a continued or a first root step), and leaves as they are elsewhere."""
    return {
        "worker": case((claimed, bindparam("worker_id")), else_=target.c.worker),
        "celery_task_id": case((claimed, null()), else_=target.c.celery_task_id),
        "started_at": case((claimed, now), else_=target.c.started_at),
        "heartbeat_at": case((claimed, now), else_=target.c.heartbeat_at),
    }


def _execution_event(rows: CTE, reason: str, now: Any) -> Insert:
    """The event of each execution transition ``rows`` returned (no step name)."""
    moved = select(
        rows.c.execution_id,
        null(),
        rows.c.previous_status,
        rows.c.status,
        rows.c.attempt,
        literal(reason),
        now,
    )
    return insert(EV).from_select(EVENT_COLUMNS, moved, include_defaults=False)


def _start(eid: Any, now: Any) -> tuple[Update, Update, Select[Any]]:
    """Start the pending execution ``eid`` (no concurrency limit), queue its root steps
    and claim the first of them (by name) for ``worker_id``, with every event: one
    PostgreSQL statement. Returns the two UPDATEs (for the transition table's checks)
    and the statement, whose rows are the started execution joined to each root."""
    pending = _from(StepStatus.PENDING, StepStatus.QUEUED)
    queued = _from(StepStatus.QUEUED, StepStatus.RUNNING)
    start = (
        update(WE)
        .where(WE.c.execution_id == eid, WE.c.status == literal(ExecutionStatus.PENDING.value))
        .values(
            status=literal(ExecutionStatus.RUNNING.value),
            previous_status=WE.c.status,
            started_at=func.coalesce(WE.c.started_at, now),
            finished_at=None,
        )
        .returning(
            WE.c.execution_id,
            WE.c.previous_status,
            WE.c.status,
            WE.c.attempt,
            WE.c.workflow_id,
            WE.c.workflow_version,
            WE.c.priority,
            WE.c.input_data,
            WE.c.shape_hash,
        )
    )
    started = start.cte("started")
    others = SE.alias("others")
    first = (
        select(eid.label("execution_id"), func.min(others.c.step_name).label("name"))
        .where(
            others.c.execution_id == eid,
            others.c.status == literal(pending),
            others.c.unmet_deps == 0,
            # A first start's root (a retry's steps are past attempt 1): a retried
            # execution's first steps may need upstream outputs and their own time
            # limits, so they are published (``Admission.first_run``).
            others.c.attempt == literal(1),
        )
        .cte("first_root")
    )
    target = cast(Alias, SE.alias("s"))  # typed as a NamedFromClause, which update() refuses
    claimed = target.c.step_name == first.c.name
    start_roots = (
        update(target)
        .where(
            target.c.execution_id == first.c.execution_id,
            target.c.status == literal(pending),
            target.c.unmet_deps == 0,
            exists(select(started.c.execution_id)),
        )
        .values(
            status=case((claimed, literal(StepStatus.RUNNING.value)), else_=literal(queued)),
            previous_status=case((claimed, literal(queued)), else_=target.c.status),
            queued_at=now,
            **_claimed_here(target, claimed, now),
            updated_at=now,
        )
        .returning(target.c.step_name, target.c.status, target.c.attempt, target.c.recoveries)
    )
    roots = start_roots.cte("roots")
    started_event = _execution_event(started, ADMITTED, now).cte("started_event")
    root_events = (
        insert(EV)
        .from_select(
            EVENT_COLUMNS,
            union_all(
                select(
                    eid,
                    roots.c.step_name,
                    literal(pending),
                    literal(queued),
                    roots.c.attempt,
                    literal(ROOT_STEP),
                    now,
                ),
                select(
                    eid,
                    roots.c.step_name,
                    literal(queued),
                    literal(StepStatus.RUNNING.value),
                    roots.c.attempt,
                    literal(CLAIMED_AT_START),
                    now,
                ).where(roots.c.status == literal(StepStatus.RUNNING.value)),
            ),
            include_defaults=False,
        )
        .cte("root_events")
    )
    start_pg = (
        select(
            *started.c,
            roots.c.step_name,
            roots.c.status.label("step_status"),
            roots.c.attempt.label("step_attempt"),
            roots.c.recoveries,
        )
        .select_from(started.outerjoin(roots, true()))
        .add_cte(started_event)
        .add_cte(root_events)
    )
    return start, start_roots, start_pg


def _held(eid: Any, now: Any) -> tuple[Update, Update, Select[Any], Update]:
    """Siblings a worker holds: steps a completion queued beside the one it continued,
    kept for the same worker to run one after another (``core.steps.complete``).

    ``hold`` makes the queued steps ``names`` due only ``grace`` seconds from now: no
    message names them, a stray one is refused by the claim's due check, and the
    reconciler sends them once they are due (their worker died before handing them
    off). ``continue_held`` claims one of them, ``step``, for ``worker_id``: queued ->
    running, the compare-and-set every claim of a held step races through (this
    worker's, a handed-off message's, a reconciler re-send's), so exactly one wins.
    ``continue_held_pg`` is that claim with its event row: one PostgreSQL statement.
    ``hand_off`` makes the held steps ``names`` still queued due now, to be published
    (queued -> queued): their first message, so no re-send in ``republishes``.
    """
    queued = _from(StepStatus.QUEUED, StepStatus.RUNNING)
    hold = (
        update(SE)
        .where(
            SE.c.execution_id == eid,
            _step_named(SE.c.step_name, "names"),
            SE.c.status == literal(StepStatus.QUEUED.value),
        )
        .values(next_attempt_at=utcnow(bindparam("grace", type_=Float)))
    )
    continue_held = (
        update(SE)
        .where(
            SE.c.execution_id == eid,
            SE.c.step_name == bindparam("step"),
            SE.c.status == literal(queued),
        )
        .values(
            status=literal(StepStatus.RUNNING.value),
            previous_status=SE.c.status,
            worker=bindparam("worker_id"),
            celery_task_id=None,
            started_at=now,
            heartbeat_at=now,
            next_attempt_at=None,
            updated_at=now,
        )
        # queued_at and started_at: how long the held step waited (a metric).
        .returning(*_transition_columns(SE), SE.c.queued_at, SE.c.started_at)
    )
    claimed = continue_held.cte("held")
    claimed_event = (
        insert(EV)
        .from_select(EVENT_COLUMNS, _event_select(claimed, CONTINUED), include_defaults=False)
        .cte("held_event")
    )
    continue_held_pg = select(*claimed.c).add_cte(claimed_event)
    hand_off = (
        update(SE)
        .where(
            SE.c.execution_id == eid,
            _step_named(SE.c.step_name, "names"),
            SE.c.status == literal(_from(StepStatus.QUEUED, StepStatus.QUEUED)),
        )
        .values(
            previous_status=SE.c.status,
            next_attempt_at=None,
            republished_at=now,
            updated_at=now,
        )
        .returning(*_transition_columns(SE))
    )
    return hold, continue_held, continue_held_pg, hand_off


def _complete(steps: Table | Alias, eid: Any, now: Any, postgres: bool) -> Update:
    """running -> succeeded for the step at the attempt bound, with its output."""
    return (
        update(steps)
        .where(
            steps.c.execution_id == eid,
            steps.c.step_name == bindparam("step"),
            # Only what a worker ran: a wait leaves waiting through core.waits.
            steps.c.status == _from(StepStatus.RUNNING, StepStatus.SUCCEEDED),
            steps.c.attempt == bindparam("at_attempt"),
        )
        .values(
            status=StepStatus.SUCCEEDED.value,
            previous_status=steps.c.status,
            output_data=_json_param("output", postgres),
            # A success after retries: the failures are in the history, and a succeeded
            # step shows no error (a NULL literal: no bind of its own).
            error=null(),
            finished_at=now,
            updated_at=now,
        )
        .returning(*_transition_columns(steps))
    )


def _finish(eid: Any, now: Any) -> Update:
    """Finish the running execution ``eid`` if none of its steps is open, with its output
    or error, in one UPDATE (PostgreSQL): ``finish_executions_if_done`` for one execution,
    with what ``core.executions.finish_executions`` then writes: a failure's error is the
    earliest failure's, with the step's name; a success's output is the outputs of the
    ``sinks`` bound at execution."""

    failed = any_step_of_execution([StepStatus.FAILED])
    cancelled = any_step_of_execution([StepStatus.CANCELLED])
    outputs = (
        select(func.jsonb_object_agg(SE.c.step_name, SE.c.output_data, type_=JSONB))
        .where(SE.c.execution_id == eid, _step_named(SE.c.step_name, "sinks"))
        .scalar_subquery()
    )
    # {"step": name, **error}, as core.executions builds it off PostgreSQL.
    named = func.jsonb_build_object(literal("step"), SE.c.step_name, type_=JSONB)
    empty_object = func.jsonb_build_object(type_=JSONB)
    first_failure = (
        select(named.op("||", return_type=JSONB)(func.coalesce(SE.c.error, empty_object)))
        .where(SE.c.execution_id == eid, SE.c.status == literal(StepStatus.FAILED.value))
        .order_by(SE.c.finished_at, SE.c.step_name)
        .limit(1)
        .scalar_subquery()
    )
    return (
        update(WE)
        .where(
            # Never waits for the row: see unlocked_executions.
            WE.c.execution_id.in_(unlocked_executions(eid)),
            WE.c.status == literal(ExecutionStatus.RUNNING.value),
            ~any_step_of_execution(STEPS.open),
        )
        .values(
            status=final_outcome(),
            previous_status=WE.c.status,
            finished_at=now,
            output_data=case((or_(failed, cancelled), WE.c.output_data), else_=outputs),
            error=case((failed, first_failure), else_=WE.c.error),
        )
        .returning(
            WE.c.execution_id,
            WE.c.previous_status,
            WE.c.status,
            WE.c.attempt,
            WE.c.parent_execution_id,
        )
    )


def _event_select(rows: CTE, reason: str) -> Select[Any]:
    return select(
        rows.c.execution_id,
        rows.c.step_name,
        rows.c.previous_status,
        rows.c.status,
        rows.c.attempt,
        literal(reason),
        utcnow(),
    )


def event_row(row: Row[Any], reason: str) -> dict[str, Any]:
    """An event row for a transition a statement returned."""
    return {
        "execution_id": row.execution_id,
        "step_name": row.step_name,
        "from_status": row.previous_status,
        "to_status": row.status,
        "attempt": row.attempt,
        "reason": reason,
    }
