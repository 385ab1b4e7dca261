"""A step's life in SQL: claim, complete (release downstream, finish, continue), retry,
fail, heartbeat.

Each function is one unit of work on a ``Connection`` inside a transaction its caller
owns. The hot path (claim, complete) runs statements built once, below, with bind
parameters; on PostgreSQL one statement writes a transition and its event rows
(data-modifying CTEs), on SQLite the same parts run one after the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    CTE,
    Boolean,
    Connection,
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

from core import statements as sql
from core.executions import (
    admit,
    finish_if_done,
    transition_step,
    transition_steps,
)
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from core.outcomes import (
    Admission,
    Claim,
    Route,
    StepCompletion,
    StepFailure,
    TransitionResult,
)
from core.sql import utcnow
from core.states import STEPS, ExecutionStatus, StepStatus
from core.workflows import Dag

log = logging.getLogger(__name__)

# --- the hot path: statements built once per dialect, with bind parameters ----------

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


def _from(source: StepStatus, target: StepStatus) -> str:
    """``source``'s value, once the state table has confirmed ``source -> target``."""
    STEPS.check(source, target)
    return source.value


def _sources(target: StepStatus) -> list[str]:
    """Every status the table lets ``target`` be reached from (a compare-and-set's WHERE)."""
    return sorted(s.value for s in STEPS.sources_of(target))


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
    returning = (
        SE.c.execution_id,
        SE.c.step_name,
        SE.c.previous_status,
        SE.c.status,
        SE.c.attempt,
        SE.c.recoveries,
    )

    claim = (
        update(SE)
        .where(
            SE.c.execution_id == eid,
            SE.c.step_name == bindparam("step"),
            SE.c.status.in_(_sources(StepStatus.RUNNING)),
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
        .returning(*returning)
    )
    execution = select(
        WE.c.workflow_id, WE.c.workflow_version, WE.c.priority, WE.c.input_data
    ).where(WE.c.execution_id == eid)
    outputs = select(SE.c.step_name, SE.c.output_data).where(
        SE.c.execution_id == eid, SE.c.step_name.in_(bindparam("names", expanding=True))
    )

    complete = (
        update(SE)
        .where(
            SE.c.execution_id == eid,
            SE.c.step_name == bindparam("step"),
            SE.c.status.in_(_sources(StepStatus.SUCCEEDED)),
            SE.c.attempt == bindparam("at_attempt"),
        )
        .values(
            status=StepStatus.SUCCEEDED.value,
            previous_status=SE.c.status,
            output_data=_json_param("output", postgres),
            finished_at=now,
        )
        .returning(*returning)
    )
    # Of any number of upstream steps finishing at once, exactly one transaction sees
    # a downstream step's count go from 1 to 0 (an atomic decrement), and it queues it.
    reaches_zero = SE.c.unmet_deps == 1
    in_downstream = (
        SE.c.execution_id == eid,
        SE.c.step_name.in_(bindparam("downstream", expanding=True)),
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
        .where(SE.c.execution_id == eid, SE.c.step_name.in_(bindparam("names", expanding=True)))
        .scalar_subquery()
    )
    claim_pg = (
        select(
            claimed.c.attempt,
            claimed.c.recoveries,
            WE.c.workflow_id,
            WE.c.workflow_version,
            WE.c.priority,
            WE.c.input_data,
            upstream.label("upstream"),
        )
        .select_from(claimed.join(WE, WE.c.execution_id == claimed.c.execution_id))
        .add_cte(claim_event)
    )

    done = complete.cte("done")
    done_event = (
        insert(EV)
        .from_select(EVENT_COLUMNS, _event_select(done, SUCCEEDED), include_defaults=False)
        .cte("done_event")
    )
    # The worker continues with the first step (by name) this completion releases;
    # the subquery reads the rows as they were before this statement.
    others = SE.alias("others")
    first_released = (
        select(func.min(others.c.step_name))
        .where(
            others.c.execution_id == eid,
            others.c.step_name.in_(bindparam("downstream", expanding=True)),
            others.c.status == pending,
            others.c.unmet_deps == 1,
        )
        .scalar_subquery()
    )
    continues = and_(
        bindparam("continue_here", type_=Boolean), reaches_zero, SE.c.step_name == first_released
    )
    released = (
        update(SE)
        .where(*in_downstream, exists(select(done.c.step_name)))
        .values(
            unmet_deps=SE.c.unmet_deps - 1,
            status=case((continues, running), (reaches_zero, queued), else_=SE.c.status),
            previous_status=case(
                (continues, queued), (reaches_zero, SE.c.status), else_=SE.c.previous_status
            ),
            queued_at=case((reaches_zero, now), else_=SE.c.queued_at),
            worker=case((continues, bindparam("worker_id")), else_=SE.c.worker),
            celery_task_id=case((continues, null()), else_=SE.c.celery_task_id),
            started_at=case((continues, now), else_=SE.c.started_at),
            heartbeat_at=case((continues, now), else_=SE.c.heartbeat_at),
        )
        .returning(*returning)
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
                ).where(released.c.status.in_([queued, running])),
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


def _event(row: Row[Any], reason: str) -> dict[str, Any]:
    return {
        "execution_id": row.execution_id,
        "step_name": row.step_name,
        "from_status": row.previous_status,
        "to_status": row.status,
        "attempt": row.attempt,
        "reason": reason,
    }


def claim(
    conn: Connection,
    execution_id: str,
    step_name: str,
    worker: str,
    task_id: str | None,
    upstream: Sequence[str] | None,
    upstream_of: Callable[[Route], Sequence[str]],
) -> Claim | None:
    """Claim a due, queued step of a running execution for ``worker``, with what it
    needs to run (input, route, upstream outputs, attempt); None when the claim loses:
    a duplicate, early or late delivery, a no-op.

    ``upstream`` names the step's upstream steps when the message said which workflow
    it belongs to; otherwise ``upstream_of(route)`` is asked once the route is known.
    """
    sql_ = hot_path(conn.dialect.name)
    params = {
        "eid": execution_id,
        "step": step_name,
        "worker_id": worker,
        "task_id": task_id,
        "names": list(upstream or ()),
    }
    if sql_.fused:
        row = conn.execute(sql_.claim_pg, params).first()
        if row is None:
            return None
        route = Route(row.workflow_id, row.workflow_version, row.priority)
        outputs: dict[str, Any] = dict(row.upstream or {})
        attempt, recoveries, input_data = row.attempt, row.recoveries, row.input_data
    else:
        claimed = conn.execute(sql_.claim, params).first()
        if claimed is None:
            return None
        conn.execute(sql_.events, [_event(claimed, CLAIMED)])
        found = conn.execute(sql_.execution, params).one()
        route = Route(found.workflow_id, found.workflow_version, found.priority)
        outputs = _outputs(conn, sql_, execution_id, upstream or ())
        attempt, recoveries, input_data = claimed.attempt, claimed.recoveries, found.input_data
    if upstream is None:
        outputs = _outputs(conn, sql_, execution_id, upstream_of(route))
    return Claim(execution_id, step_name, attempt, recoveries, route, input_data, outputs)


def _outputs(
    conn: Connection, sql_: HotPath, execution_id: str, names: Sequence[str]
) -> dict[str, Any]:
    if not names:
        return {}
    rows = conn.execute(sql_.outputs, {"eid": execution_id, "names": list(names)})
    return {r.step_name: r.output_data for r in rows}


def complete(
    conn: Connection,
    step: Claim,
    output: Any,
    encoded: str | None,
    workflow: Dag,
    continue_as: str | None = None,
) -> StepCompletion:
    """Record a step's success and everything it sets in motion, in one transaction:
    its output and event, the release of its downstream steps (atomic decrements),
    the execution's end when this was its last open step, and, with ``continue_as``
    (this worker's id), the claim of one released step for the worker to run next.

    ``encoded`` is ``output`` as JSON text (None for None). Not applied
    (``transition.applied`` False) when the step is no longer running at this attempt:
    a duplicate or late completion that changes nothing.
    """
    sql_ = hot_path(conn.dialect.name)
    execution_id, step_name = step.execution_id, step.step_name
    downstream = workflow.downstream(step_name)
    params = {
        "eid": execution_id,
        "step": step_name,
        "at_attempt": step.attempt,
        "output": encoded,
        "downstream": downstream,
        "continue_here": continue_as is not None,
        "worker_id": continue_as,
    }
    queued: list[str] = []
    continued: Row[Any] | None = None
    released_any = False
    if sql_.fused:
        rows = conn.execute(sql_.complete_pg, params).all()
        if not rows:
            return StepCompletion(transition=_not_applied(conn, sql_, step))
        for row in rows:
            released_any = released_any or row.step_name is not None
            if row.status == StepStatus.QUEUED.value:
                queued.append(row.step_name)
            elif row.status == StepStatus.RUNNING.value:
                continued = row
    else:
        done = conn.execute(sql_.complete, params).first()
        if done is None:
            return StepCompletion(transition=_not_applied(conn, sql_, step))
        events = [_event(done, SUCCEEDED)]
        if downstream:
            released = conn.execute(sql_.release, params).all()
            released_any = bool(released)
            events += [_event(r, RELEASED) for r in released if r.status == StepStatus.QUEUED]
            queued = sorted(r.step_name for r in released if r.status == StepStatus.QUEUED)
        if continue_as is not None and queued:
            continued = conn.execute(sql_.continue_step, {**params, "step": queued[0]}).one()
            events.append(_event(continued, CONTINUED))
            queued = queued[1:]
        conn.execute(sql_.events, events)
    transition = TransitionResult(
        applied=True,
        execution_id=execution_id,
        step_name=step_name,
        from_status=StepStatus.RUNNING.value,
        to_status=StepStatus.SUCCEEDED.value,
        attempt=step.attempt,
    )
    # A step that released a downstream step (pending or queued now) cannot have been
    # its execution's last open step; any other may have been (a sink, or a branch
    # whose downstream steps were skipped when a sibling failed).
    finished = None if released_any else finish_if_done(conn, execution_id, workflow.sinks)
    next_step = None
    if continued is not None:
        upstream = workflow.upstream(continued.step_name)
        outputs = (
            {step_name: output}
            if upstream == (step_name,)
            else _outputs(conn, sql_, execution_id, upstream)
        )
        next_step = Claim(
            execution_id,
            continued.step_name,
            continued.attempt,
            continued.recoveries,
            step.route,
            step.input_data,
            outputs,
            continued=True,
        )
    return StepCompletion(
        transition=transition, queued=tuple(queued), execution=finished, continued=next_step
    )


def _not_applied(conn: Connection, sql_: HotPath, step: Claim) -> TransitionResult:
    current = conn.execute(sql_.current, {"eid": step.execution_id, "step": step.step_name})
    row = current.first()
    return TransitionResult(
        applied=False,
        execution_id=step.execution_id,
        step_name=step.step_name,
        to_status=StepStatus.SUCCEEDED.value,
        current_status=None if row is None else row.status,
        attempt=None if row is None else row.attempt,
    )


def admit_and_claim(
    conn: Connection,
    workflow_id: str,
    execution_ids: Sequence[str],
    limit: int | None,
    worker: str,
) -> tuple[Admission, Claim | None]:
    """Admit executions (``core.executions.admit``) and, in the same transaction, claim
    one root step of the first one started for ``worker`` to run itself: a start costs
    no broker round trip before its first step. The Admission returned lists the other
    queued root steps, to publish."""
    admission = admit(conn, workflow_id, execution_ids, limit)
    if not admission.queued:
        return admission, None
    execution_id, step_name = admission.queued[0]
    sql_ = hot_path(conn.dialect.name)
    params = {"eid": execution_id, "step": step_name, "worker_id": worker}
    row = conn.execute(sql_.continue_step, params).first()
    if row is None:
        return admission, None
    conn.execute(sql_.events, [_event(row, CLAIMED_AT_START)])
    found = conn.execute(sql_.execution, params).one()
    route = admission.routes[execution_id]
    claim = Claim(
        execution_id,
        step_name,
        row.attempt,
        row.recoveries,
        route,
        found.input_data,
        {},
        continued=True,
    )
    rest = Admission(admission.started, admission.queued[1:], admission.routes)
    return rest, claim


# --- retries and failures ------------------------------------------------------------


def schedule_retry(
    conn: Connection,
    execution_id: str,
    step_name: str,
    attempt: int,
    delay: float,
    error: Mapping[str, Any],
) -> TransitionResult:
    """running -> queued for another attempt, due ``delay`` seconds from now."""

    result = transition_step(
        conn,
        execution_id,
        step_name,
        StepStatus.QUEUED,
        frozenset({StepStatus.RUNNING}),
        reason=f"retry in {delay:.1f}s after {error.get('type', 'error')}",
        attempt=attempt,
        values={
            "attempt": StepExecution.attempt + 1,
            "next_attempt_at": utcnow(delay),
            "error": dict(error),
            "worker": None,
        },
    )
    return result


def fail_step(
    conn: Connection,
    execution_id: str,
    step_name: str,
    attempt: int,
    error: Mapping[str, Any],
    descendants: Sequence[str] | None,
    sinks: Sequence[str] = (),
) -> StepFailure:
    """Fail a running step for good, skip the steps downstream of it, and finish the
    execution when nothing is left open: one transaction.

    ``descendants=None`` skips every pending step: for a step that cannot run here at
    all (its workflow is not registered), whose DAG is unknown.
    """
    failed = transition_step(
        conn,
        execution_id,
        step_name,
        StepStatus.FAILED,
        frozenset({StepStatus.RUNNING}),
        reason=f"failed: {error.get('type', 'error')}",
        attempt=attempt,
        values={"error": dict(error)},
    )
    if not failed.applied:
        return StepFailure(transition=failed)
    skipped, finished = skip_downstream_and_finish(
        conn, execution_id, step_name, descendants, sinks
    )
    return StepFailure(transition=failed, skipped=skipped, execution=finished)


def skip_downstream_and_finish(
    conn: Connection,
    execution_id: str,
    step_name: str,
    descendants: Sequence[str] | None,
    sinks: Sequence[str] = (),
) -> tuple[list[str], TransitionResult | None]:
    """After ``step_name`` failed for good: skip its pending descendants (None: every
    pending step) and finish the execution if nothing is left open. Returns the skipped
    steps and the execution's final transition, if this made one."""
    skipped = skip_descendants(conn, execution_id, step_name, descendants)
    finished = finish_if_done(conn, execution_id, sinks)
    return skipped, finished


def skip_descendants(
    conn: Connection, execution_id: str, step_name: str, descendants: Sequence[str] | None
) -> list[str]:
    """Skip the pending descendants of a step that failed for good (None: every pending
    step, for a workflow whose DAG this process does not know)."""
    if descendants is not None and not descendants:
        return []
    skipped = transition_steps(
        conn,
        execution_id,
        None if descendants is None else list(descendants),
        StepStatus.SKIPPED,
        frozenset({StepStatus.PENDING}),
        reason=f"upstream step {step_name} failed",
    )
    return [r.step_name or "" for r in skipped]


def running_claim(
    conn: Connection, execution_id: str, step_name: str, task_id: str
) -> Claim | None:
    """The running claim of a step made by Celery delivery ``task_id``, or None if the
    step is no longer running under it (recorded meanwhile, recovered, re-run)."""
    row = conn.execute(sql.select_running_claim(execution_id, step_name, task_id)).first()
    if row is None:
        return None
    found = conn.execute(hot_path(conn.dialect.name).execution, {"eid": execution_id}).one()
    route = Route(found.workflow_id, found.workflow_version, found.priority)
    return Claim(execution_id, step_name, row.attempt, row.recoveries, route, found.input_data, {})


def heartbeat(conn: Connection, worker: str, keys: Sequence[tuple[str, str]] | None) -> int:
    """Refresh the heartbeats of a worker's running steps; how many rows it touched."""
    result = conn.execute(sql.heartbeat(worker, keys))
    return int(result.rowcount)


def step_status(conn: Connection, execution_id: str, step_name: str) -> str | None:
    """The step's status, or None when there is no such step."""
    row = conn.execute(sql.select_step_status(execution_id, step_name)).first()
    return None if row is None else str(row.status)


def record_late_output(
    conn: Connection, execution_id: str, step_name: str, attempt: int, output: Any
) -> int:
    """Keep the output of a step that finished after it was cancelled (advances nothing)."""
    result = conn.execute(sql.late_output(execution_id, step_name, attempt, output))
    return int(result.rowcount)
