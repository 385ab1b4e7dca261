"""Waits are rows: a sleep, an event wait or a child execution is a step in ``waiting``
with what it waits for and when the waker acts on it (``wake_at``). No message, no
worker, no concurrency slot.

A wait's life, each part a unit of work on a ``Connection`` in its caller's transaction:

- *entered* (``enter_waits``) by the transaction that completes its last upstream step
  (``core.steps.complete``) or starts its execution (``arm_root_waits``): pending ->
  waiting, then *established*: its callable runs (``until``, ``key``, ``input``) and the
  wait is armed (``wake_at``, ``wait_event``/``wait_key``, ``child_execution_id``), or
  ends at once when already satisfied (a past wake time, an event already sent);
- *ended* (``_end_waits``) by the waker (``wake_due``: sleeps due, event timeouts, a
  retry's backoff over), an event or signal (``send_event``, ``signal``), an early wake
  (``wake``), or its child's end (``core.children``): waiting -> succeeded | failed by a
  compare-and-set, with its event row and the release of its dependents, or waiting ->
  waiting at the next attempt when its ``Retry`` allows another;
- *cancelled* with its execution (``STEPS.open`` holds ``waiting``).

Publishing what this set in motion (queued steps, child starts, ended executions) is
the caller's, after its commit: ``WaitOutcome``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import Connection, Row, select
from sqlalchemy.dialects import postgresql, sqlite

from core import statements as sql
from core.errors import (
    ExecutionNotFound,
    FieldError,
    IdempotencyConflict,
    InputValidationError,
    StepNotFound,
    WaitNotOpen,
    WaitTimedOut,
)
from core.executions import admit as _admit
from core.executions import finish_if_done
from core.models import encode_json
from core.outcomes import Admission, Route, WaitOutcome
from core.sql import utcnow
from core.states import ExecutionStatus, StepStatus
from core.step_statements import RELEASED, event_row, hot_path
from core.transitions import transition_steps
from core.wait_statements import (
    IB,
    SE,
    WE,
    end_many,
    executions_many,
    release_many,
    repark,
    wait_statements,
)
from core.workflows import ChildWait, EventWait, Sleep, Step, Workflow

log = logging.getLogger(__name__)

DefinitionOf = Callable[[str, int], "Workflow | None"]


def registered(name: str, version: int) -> Workflow | None:
    """The process registry's workflow (None when it does not know it): the default
    ``definition_of``."""
    from core.errors import WorkflowNotFound
    from core.registry import get_registry

    try:
        return get_registry().get(name, version)
    except WorkflowNotFound:
        return None


WAITING = StepStatus.WAITING.value
ENTERED = "upstream steps done"


@dataclass(frozen=True)
class EventReceipt:
    """A sent event: its id, the wait that consumed it (``execution/step``) if one did,
    and whether an earlier send with the same idempotency key stored it."""

    event_id: int
    consumed_by: str | None
    duplicate: bool = False


@dataclass(frozen=True)
class WaitContext:
    """What a wait's callable (``until``, ``key``, ``input``) sees: a StepContext whose
    step never runs in a worker."""

    execution_id: str
    step_name: str
    attempt: int
    input: Any

    @property
    def idempotency_key(self) -> str:
        return f"{self.execution_id}:{self.step_name}"

    def heartbeat(self) -> None:
        """Nothing to keep alive: the wait is a row."""

    def is_cancelled(self) -> bool:
        return False


class NotEstablished(Exception):
    """A wait's own callable raised (or returned what the wait cannot use): the wait
    fails, the completion that released it stands."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a wait's user callable; any error it raises becomes NotEstablished."""
    try:
        return function(*args, **kwargs)
    except Exception as error:
        raise NotEstablished(error) from error


@dataclass(frozen=True)
class _End:
    """A wait to end: to succeeded (with ``output``) or failed (with ``error``)."""

    execution_id: str
    step_name: str
    attempt: int
    to: str
    output: Any = None
    error: Any = None
    reason: str = ""
    how: str = "due"


@dataclass(frozen=True)
class _Execution:
    """What establishing a wait reads of its execution."""

    execution_id: str
    workflow: Workflow
    route: Route
    row: Row[Any]


def payload_of(event: str, schema: type[BaseModel] | None, payload: Any, max_bytes: int) -> Any:
    """``payload`` as it is stored: checked against the wait's ``schema`` and storable as
    JSON within ``max_bytes``; InputValidationError naming each bad field
    (``payload.<field>``) otherwise, before anything is written."""
    if schema is not None:
        try:
            payload = schema.model_validate(payload).model_dump(mode="json")
        except ValidationError as error:
            fields: list[FieldError] = [
                {
                    "field": ".".join(["payload", *(str(p) for p in e["loc"])]),
                    "message": e["msg"],
                }
                for e in error.errors(include_url=False, include_input=False)
            ]
            problems = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
            raise InputValidationError(
                f"payload for event {event!r} is not valid: {problems}", fields
            ) from None
    text = encode_json("payload", payload)
    if len(text) > max_bytes:
        raise InputValidationError(
            f"payload is {len(text)} bytes of JSON; the limit is {max_bytes} "
            "(CONVEYOR_MAX_PAYLOAD_BYTES)",
            [{"field": "payload", "message": "too large"}],
        )
    return payload


# --- entering and establishing -----------------------------------------------------


def enter_waits(
    conn: Connection,
    execution_id: str,
    names: Sequence[str],
    workflow: Workflow,
    known_outputs: Mapping[str, Any],
    definition_of: DefinitionOf,
) -> tuple[bool, WaitOutcome]:
    """After an upstream step of the wait nodes ``names`` succeeded: decrement each
    node's unmet count; a node that reaches zero enters ``waiting`` and is established.
    Returns whether any node was released (counted down) and what that set in motion.
    ``known_outputs`` are upstream outputs in hand (the completing step's)."""
    outcome = WaitOutcome()
    if not names:
        return False, outcome
    ws = wait_statements()
    rows = conn.execute(ws.release, {"eid": execution_id, "names": list(names)}).all()
    entered = [r for r in rows if r.status == WAITING]
    if entered:
        conn.execute(hot_path(conn.dialect.name).events, [event_row(r, ENTERED) for r in entered])
        execution = _read_execution(conn, execution_id, workflow)
        establish(conn, execution, entered, known_outputs, definition_of, outcome)
        if not any(result.execution_id == execution_id for result, _ in outcome.finished):
            settle(conn, [execution_id], outcome)
    return bool(rows), outcome


def arm_root_waits(
    conn: Connection, execution_ids: Sequence[str], workflow: Workflow, definition_of: DefinitionOf
) -> WaitOutcome:
    """At an execution's start: its wait nodes with nothing upstream left (root waits,
    and after a retry those whose upstream steps had succeeded) enter ``waiting`` and
    are established."""
    outcome = WaitOutcome()
    if not execution_ids or not workflow.wait_nodes:
        return outcome
    ws = wait_statements()
    rows = conn.execute(ws.arm_roots, {"eids": list(execution_ids)}).all()
    if not rows:
        return outcome
    conn.execute(hot_path(conn.dialect.name).events, [event_row(r, ENTERED) for r in rows])
    by_execution: dict[str, list[Row[Any]]] = {}
    for row in rows:
        by_execution.setdefault(row.execution_id, []).append(row)
    for execution_id, entered in by_execution.items():
        execution = _read_execution(conn, execution_id, workflow)
        establish(conn, execution, entered, {}, definition_of, outcome)
    ended = {result.execution_id for result, _ in outcome.finished}
    settle(conn, [e for e in by_execution if e not in ended], outcome)
    return outcome


def _read_execution(conn: Connection, execution_id: str, workflow: Workflow) -> _Execution:
    row = conn.execute(wait_statements().execution, {"eid": execution_id}).one()
    route = Route(row.workflow_id, row.workflow_version, row.priority)
    return _Execution(execution_id, workflow, route, row)


def establish(
    conn: Connection,
    execution: _Execution,
    rows: Sequence[Row[Any]],
    known_outputs: Mapping[str, Any],
    definition_of: DefinitionOf,
    outcome: WaitOutcome,
) -> None:
    """Arm each waiting node of ``rows`` (execution_id, step_name, attempt): run its
    callable on its upstream outputs, then record what it waits for, or end it at once
    when that is already there. A callable that raises fails the node (never the
    upstream completion that released it) and skips its descendants."""
    workflow = execution.workflow
    ends: list[_End] = []
    for row in rows:
        step = workflow.steps[row.step_name]
        try:
            end = _arm(conn, execution, step, row.attempt, known_outputs, outcome)
        except (NotEstablished, InputValidationError) as refused:
            # What the wait's own callable raised or returned wrong: the node fails.
            error = refused.error if isinstance(refused, NotEstablished) else refused
            log.warning(
                "wait %s/%s could not be established: %s",
                execution.execution_id,
                step.name,
                error,
            )
            end = _End(
                execution.execution_id,
                step.name,
                row.attempt,
                StepStatus.FAILED.value,
                error=_error_record(error),
                reason=f"wait not established: {type(error).__name__}",
                how="failed",
            )
        if end is not None:
            ends.append(end)
    if ends:
        _end_waits(conn, ends, {execution.execution_id: execution}, definition_of, outcome)


def _arm(
    conn: Connection,
    execution: _Execution,
    step: Step,
    attempt: int,
    known_outputs: Mapping[str, Any],
    outcome: WaitOutcome,
) -> _End | None:
    """Arm one wait node; the end to record now when it is already satisfied."""
    wait = step.wait
    ws = wait_statements()
    eid = execution.execution_id
    where = {"eid": eid, "step": step.name, "att": attempt}
    arm = {"wake_at": None, "event": None, "key": None, "child": None}
    if isinstance(wait, Sleep):
        if wait.until is not None:
            until = _call(
                wait.until,
                _context(execution, step, attempt),
                **_upstream(conn, execution, step, known_outputs),
            )
            if not isinstance(until, datetime) or until.tzinfo is None:
                raise InputValidationError(
                    f"until of sleep {step.name!r} must return a timezone-aware datetime, "
                    f"got {until!r}"
                )
            wake_at = until.astimezone(UTC)
            conn.execute(ws.arm, {**where, **arm, "wake_at": wake_at})
        else:
            assert wait.duration is not None
            # The database's clock, as every other time the waker compares.
            wake_at = conn.execute(
                ws.arm.values(wake_at=utcnow(wait.duration.total_seconds())),
                {**where, **{k: v for k, v in arm.items() if k != "wake_at"}},
            ).scalar_one()
        if wake_at <= datetime.now(UTC):
            return _End(
                eid,
                step.name,
                attempt,
                StepStatus.SUCCEEDED.value,
                output=wake_at.isoformat(),
                reason="wake time passed",
                how="due",
            )
        return None
    if isinstance(wait, EventWait):
        key = _event_key(conn, execution, step, attempt, wait, known_outputs)
        return _arm_event(conn, execution, step, attempt, wait, key)
    if isinstance(wait, ChildWait):
        from core.children import start_child

        return start_child(conn, execution, step, attempt, wait, known_outputs, outcome)
    raise AssertionError(f"step {step.name} is not a wait")


def _event_key(
    conn: Connection,
    execution: _Execution,
    step: Step,
    attempt: int,
    wait: EventWait,
    known_outputs: Mapping[str, Any],
) -> str:
    if wait.key is None:
        return ""
    if isinstance(wait.key, str):
        return wait.key
    key = _call(
        wait.key,
        _context(execution, step, attempt),
        **_upstream(conn, execution, step, known_outputs),
    )
    if not isinstance(key, str | int) or isinstance(key, bool):
        raise InputValidationError(f"key of wait {step.name!r} must be text, got {key!r}")
    key = str(key)
    if not 0 < len(key) <= 255:
        raise InputValidationError(f"key of wait {step.name!r} must be 1-255 characters")
    return key


def _arm_event(
    conn: Connection, execution: _Execution, step: Step, attempt: int, wait: EventWait, key: str
) -> _End | None:
    """Take a signal or an event already sent for this wait, or arm the wait for one.

    Sending takes the same (name, key) advisory lock before it looks for a wait; each
    side looks in a statement that begins once the lock is held, so the later of the
    two sees the earlier's commit: an event sent first is found here, a wait armed first
    is found by the sender. (SQLite's writers are serial.)"""
    ws = wait_statements()
    eid = execution.execution_id
    names = {"eid": eid, "step": step.name}
    if conn.dialect.name == "postgresql":
        conn.execute(ws.event_lock, {"name": wait.event, "key": key})
    taken = conn.execute(ws.take_signal, names).first()
    how = "signal"
    if taken is None:
        since = execution.row.created_at
        taken = conn.execute(
            ws.take_event, {**names, "ev_name": wait.event, "ev_key": key, "since": since}
        ).first()
        how = "event"
    if taken is not None:
        return _End(
            eid,
            step.name,
            attempt,
            StepStatus.SUCCEEDED.value,
            output=taken.payload,
            reason=_received(how, wait.event, key, taken.id, taken.actor),
            how=how,
        )
    wake_at = None
    values: dict[str, Any] = {
        "eid": eid,
        "step": step.name,
        "att": attempt,
        "event": wait.event,
        "key": key,
        "child": None,
    }
    if wait.timeout is not None:
        conn.execute(ws.arm.values(wake_at=utcnow(wait.timeout.total_seconds())), values)
    else:
        conn.execute(ws.arm, {**values, "wake_at": wake_at})
    return None


def _received(how: str, event: str, key: str, event_id: int, actor: str | None) -> str:
    sender = f" by {actor}" if actor else ""
    if how == "signal":
        return f"signal{sender} (#{event_id})"
    return f"event {event}/{key} #{event_id}{sender}"


def _context(execution: _Execution, step: Step, attempt: int) -> WaitContext:
    return WaitContext(
        execution.execution_id,
        step.name,
        attempt,
        execution.workflow.parse_input(execution.row.input_data),
    )


def _upstream(
    conn: Connection, execution: _Execution, step: Step, known: Mapping[str, Any]
) -> dict[str, Any]:
    """The wait's upstream outputs, by step name: those in hand, the rest read."""
    missing = [name for name in step.depends_on if name not in known]
    found = {name: known[name] for name in step.depends_on if name in known}
    if missing:
        rows = conn.execute(
            hot_path(conn.dialect.name).outputs, {"eid": execution.execution_id, "names": missing}
        )
        found.update({r.step_name: r.output_data for r in rows})
    return found


def _error_record(error: BaseException) -> dict[str, Any]:
    return {"type": type(error).__name__, "message": str(error)[:4000]}


def settle(conn: Connection, execution_ids: Sequence[str], outcome: WaitOutcome) -> None:
    """Park the running executions among ``execution_ids`` whose open steps all wait,
    unpark the others (``parked_at``; a parked execution holds no max_concurrency
    slot); a workflow with an execution parked is reported freed, to admit the next."""
    if not execution_ids:
        return
    ids = sorted(set(execution_ids))
    if conn.dialect.name == "postgresql":
        conn.execute(sql.lock_executions(ids))
    for row in conn.execute(repark(ids)).all():
        if row.parked_at is not None and row.workflow_id not in outcome.freed:
            outcome.freed.append(row.workflow_id)


# --- ending -------------------------------------------------------------------------


def _end_waits(
    conn: Connection,
    ends: Sequence[_End],
    executions: Mapping[str, _Execution],
    definition_of: DefinitionOf,
    outcome: WaitOutcome,
) -> None:
    """End each wait by a compare-and-set (waiting at its attempt; a row elsewhere lost a
    race and is left alone), with its event row, then set its dependents in motion: a
    success releases them (task steps queued, wait nodes entered), a failure skips its
    descendants; an execution left with nothing open is finished.

    Set-based on PostgreSQL: one UPDATE ends every wait of the batch, one releases every
    task step they count down, one INSERT each writes their events (a waker's batch of
    500 is a handful of statements, not five per wait)."""
    sql_ = hot_path(conn.dialect.name)
    ended = _end_rows(conn, ends)
    if not ended:
        return
    conn.execute(sql_.events, [event_row(row, end.reason) for end, row in ended])
    released_in: set[str] = set()
    touched: list[str] = []
    countdowns: dict[tuple[str, str], int] = {}
    for end, _row in ended:
        execution = executions[end.execution_id]
        workflow = execution.workflow
        step = workflow.steps.get(end.step_name)
        outcome.woken.append((workflow.name, step.kind if step else "wait", end.how))
        outcome.routes[end.execution_id] = execution.route
        if end.execution_id not in touched:
            touched.append(end.execution_id)
        if end.to != StepStatus.SUCCEEDED.value:
            _skip_descendants(
                conn, end.execution_id, end.step_name, workflow.descendants(end.step_name)
            )
            continue
        for task in workflow.task_downstream(end.step_name):
            key = (end.execution_id, task)
            countdowns[key] = countdowns.get(key, 0) + 1
        waits = workflow.wait_downstream(end.step_name)
        if waits:
            any_released, more = enter_waits(
                conn,
                end.execution_id,
                waits,
                workflow,
                {end.step_name: end.output},
                definition_of,
            )
            if any_released:
                released_in.add(end.execution_id)
            outcome.merge(more)
    released = _release_tasks(conn, countdowns)
    released_in.update(r.execution_id for r in released)
    queued = [r for r in released if r.status == StepStatus.QUEUED.value]
    if queued:
        conn.execute(sql_.events, [event_row(r, RELEASED) for r in queued])
        outcome.queued += [(r.execution_id, r.step_name) for r in queued]
    unfinished: list[str] = []
    for execution_id in touched:
        if execution_id in released_in:
            unfinished.append(execution_id)
            continue
        workflow = executions[execution_id].workflow
        finished = finish_if_done(conn, execution_id, workflow.sinks)
        if finished is not None:
            outcome.finished.append((finished, workflow.name))
        else:
            unfinished.append(execution_id)
    # A wait that ended queued a task step (the execution takes a slot again), or
    # left only waits open.
    settle(conn, unfinished, outcome)
    if outcome.finished:
        from core.children import wake_parents

        wake_parents(conn, outcome, definition_of)


def _end_rows(conn: Connection, ends: Sequence[_End]) -> list[tuple[_End, Row[Any]]]:
    """waiting -> succeeded | failed for each of ``ends`` still waiting at its attempt
    (the others lost a race: logged, left alone); each applied end with its row."""
    if not ends:
        return []
    if conn.dialect.name == "postgresql":
        by_key = {(e.execution_id, e.step_name, e.attempt): e for e in ends}
        rows = conn.execute(end_many(list(by_key.values()))).all()
        applied = [(by_key[(r.execution_id, r.step_name, r.attempt)], r) for r in rows]
    else:
        applied = []
        for end in ends:
            params = {
                "eid": end.execution_id,
                "step": end.step_name,
                "att": end.attempt,
                "to": end.to,
                "out": end.output,
                "err": end.error,
            }
            row = conn.execute(wait_statements().end, params).first()
            if row is not None:
                applied.append((end, row))
    if len(applied) < len(ends):
        done = {(e.execution_id, e.step_name) for e, _ in applied}
        for end in ends:
            if (end.execution_id, end.step_name) not in done:
                log.info("wait %s/%s already ended", end.execution_id, end.step_name)
    return applied


def _release_tasks(conn: Connection, countdowns: Mapping[tuple[str, str], int]) -> list[Row[Any]]:
    """Count down each (execution, task step) by the number of its upstream waits just
    ended; a step whose count reaches zero is queued (the atomic decrement of every
    release). The rows moved."""
    if not countdowns:
        return []
    if conn.dialect.name == "postgresql":
        return list(conn.execute(release_many(countdowns)).all())
    sql_ = hot_path(conn.dialect.name)
    rows: list[Row[Any]] = []
    for (execution_id, task), times in countdowns.items():
        for _ in range(times):
            params = {"eid": execution_id, "downstream": [task]}
            rows += conn.execute(sql_.release, params).all()
    return rows


def _skip_descendants(
    conn: Connection, execution_id: str, step_name: str, descendants: Sequence[str] | None
) -> None:
    """Skip the pending descendants of a wait that failed for good (None: every pending
    step), as ``core.steps.skip_descendants`` does for a task step."""
    if descendants is not None and not descendants:
        return
    transition_steps(
        conn,
        execution_id,
        None if descendants is None else list(descendants),
        StepStatus.SKIPPED,
        frozenset({StepStatus.PENDING}),
        reason=f"upstream step {step_name} failed",
    )


def fail_or_retry(
    conn: Connection,
    execution: _Execution,
    step: Step,
    attempt: int,
    recoveries: int,
    error: BaseException,
    how: str,
    definition_of: DefinitionOf,
    outcome: WaitOutcome,
) -> None:
    """A wait that failed (timed out, its child failed): waiting again at the next
    attempt, due after its ``Retry``'s backoff (the waker arms it afresh: a new event
    wait, a new child), or failed for good when its attempts are spent."""
    record = _error_record(error)
    tries = attempt - recoveries
    if step.retry.should_retry(error, tries):
        delay = step.retry.delay(tries)
        row = conn.execute(
            wait_statements().rearm,
            {
                "eid": execution.execution_id,
                "step": step.name,
                "att": attempt,
                "err": record,
                "delay": delay,
            },
        ).first()
        if row is not None:
            reason = f"retry in {delay:.1f}s after {record['type']}"
            conn.execute(hot_path(conn.dialect.name).events, [event_row(row, reason)])
            outcome.woken.append((execution.workflow.name, step.kind, how))
        return
    end = _End(
        execution.execution_id,
        step.name,
        attempt,
        StepStatus.FAILED.value,
        error=record,
        reason=f"failed: {record['type']}",
        how=how,
    )
    _end_waits(conn, [end], {execution.execution_id: execution}, definition_of, outcome)


def admit(
    conn: Connection,
    workflow: Workflow,
    execution_ids: Sequence[str],
    limit: int | None,
    definition_of: DefinitionOf,
) -> tuple[Admission, WaitOutcome]:
    """``core.executions.admit`` for a workflow with wait nodes: the admission, then the
    started executions' waits with nothing upstream left entered and established."""
    admission = _admit(conn, workflow.name, execution_ids, limit)
    return admission, arm_root_waits(conn, admission.started, workflow, definition_of)


# --- the waker ----------------------------------------------------------------------


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
    executions = _executions_of(conn, sorted({row.execution_id for row in rows}), definition_of)
    ends: list[_End] = []
    known = {k: v for k, v in executions.items() if v is not None}
    for row in rows:
        execution = executions[row.execution_id]
        if execution is None:
            _fail_unknown(conn, row)
            continue
        step = execution.workflow.steps.get(row.step_name)
        wait = None if step is None else step.wait
        if step is None or wait is None:
            _fail_unknown(conn, row)
        elif isinstance(wait, Sleep):
            ends.append(
                _End(
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
                    _End(
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
        _end_waits(conn, ends, known, definition_of, outcome)
    if len(rows) < limit:
        # Read after the ends: the rows just taken were still waiting before them, and
        # would make the next due look past (so no follow-up would be sent).
        outcome.next_due = conn.execute(ws.next_due).scalar()
    return outcome


def _fail_unknown(conn: Connection, row: Row[Any]) -> None:
    """A due wait of a workflow (or step) this process does not know: failed, with every
    pending step of its execution skipped and the execution finished, as a task step
    of an unknown workflow is (its wake_at would otherwise make it due on every tick)."""
    message = "this process does not know the wait's workflow or step"
    failed = conn.execute(
        wait_statements().end,
        {
            "eid": row.execution_id,
            "step": row.step_name,
            "att": row.attempt,
            "to": StepStatus.FAILED.value,
            "out": None,
            "err": {"type": "WorkflowNotFound", "message": message},
        },
    ).first()
    if failed is None:
        return
    log.error("wait %s/%s failed: %s", row.execution_id, row.step_name, message)
    conn.execute(
        hot_path(conn.dialect.name).events, [event_row(failed, "failed: WorkflowNotFound")]
    )
    _skip_descendants(conn, row.execution_id, row.step_name, None)
    finish_if_done(conn, row.execution_id, ())


def _execution_of(
    conn: Connection, execution_id: str, definition_of: DefinitionOf
) -> _Execution | None:
    row = conn.execute(wait_statements().execution, {"eid": execution_id}).one()
    workflow = definition_of(row.workflow_id, row.workflow_version)
    if workflow is None:
        return None
    route = Route(row.workflow_id, row.workflow_version, row.priority)
    return _Execution(execution_id, workflow, route, row)


def _executions_of(
    conn: Connection, execution_ids: Sequence[str], definition_of: DefinitionOf
) -> dict[str, _Execution | None]:
    """``_execution_of`` for many executions: one read (None: a workflow this process
    does not know)."""
    found: dict[str, _Execution | None] = {}
    for row in conn.execute(executions_many(execution_ids)):
        workflow = definition_of(row.workflow_id, row.workflow_version)
        route = Route(row.workflow_id, row.workflow_version, row.priority)
        found[row.execution_id] = (
            None if workflow is None else _Execution(row.execution_id, workflow, route, row)
        )
    return found


# --- events, signals, early wakes ----------------------------------------------------


def send_event(
    conn: Connection,
    name: str,
    key: str,
    payload: Any,
    *,
    ttl_seconds: float,
    definition_of: DefinitionOf,
    idempotency_key: str | None = None,
    scope: str = "",
    sent_by: str | None = None,
    actor: str | None = None,
) -> tuple[EventReceipt, WaitOutcome]:
    """Store event ``name`` for ``key`` and deliver it to the oldest open wait for
    (name, key), if any; else it is kept for ``ttl_seconds`` for a wait established
    later. ``payload`` must already be checked (``payload_of``). A repeated
    ``idempotency_key`` stores nothing and returns the first event (IdempotencyConflict
    when its payload differs)."""
    ws = wait_statements()
    outcome = WaitOutcome()
    if conn.dialect.name == "postgresql":
        conn.execute(ws.event_lock, {"name": name, "key": key})
    values = {
        "name": name,
        "event_key": key,
        "payload": payload,
        "idempotency_scope": scope,
        "idempotency_key": idempotency_key,
        "sent_by": sent_by,
        "actor": actor,
        "created_at": utcnow(),
        "expires_at": utcnow(ttl_seconds),
    }
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = dialect_insert(IB).values(**values)
    if idempotency_key is not None:
        statement = statement.on_conflict_do_nothing(
            index_elements=[IB.c.idempotency_scope, IB.c.idempotency_key]
        )
    event_id = conn.execute(statement.returning(IB.c.id)).scalar()
    if event_id is None:
        existing = conn.execute(
            select(
                IB.c.id,
                IB.c.name,
                IB.c.event_key,
                IB.c.payload,
                IB.c.consumed_by_execution,
                IB.c.consumed_by_step,
            ).where(IB.c.idempotency_scope == scope, IB.c.idempotency_key == idempotency_key)
        ).one()
        same = (
            existing.name == name
            and existing.event_key == key
            and json.dumps(existing.payload, sort_keys=True) == json.dumps(payload, sort_keys=True)
        )
        if not same:
            raise IdempotencyConflict(
                f"idempotency key {idempotency_key!r} was used for event #{existing.id} "
                f"({existing.name}/{existing.event_key}) with another name, key or payload"
            )
        consumed = (
            f"{existing.consumed_by_execution}/{existing.consumed_by_step}"
            if existing.consumed_by_execution
            else None
        )
        return EventReceipt(existing.id, consumed, duplicate=True), outcome
    wait = conn.execute(ws.oldest_wait, {"name": name, "key": key}).first()
    if wait is None:
        return EventReceipt(event_id, None), outcome
    conn.execute(
        ws.consume, {"event_id": event_id, "eid": wait.execution_id, "step": wait.step_name}
    )
    execution = _execution_of(conn, wait.execution_id, definition_of)
    if execution is None:
        raise ExecutionNotFound(wait.execution_id)
    end = _End(
        wait.execution_id,
        wait.step_name,
        wait.attempt,
        StepStatus.SUCCEEDED.value,
        output=payload,
        reason=_received("event", name, key, event_id, actor),
        how="event",
    )
    _end_waits(conn, [end], {wait.execution_id: execution}, definition_of, outcome)
    return EventReceipt(event_id, f"{wait.execution_id}/{wait.step_name}"), outcome


def _waiting_step(conn: Connection, execution_id: str, step_name: str) -> Any:
    """The step and its execution's status, the step's row locked (PostgreSQL): a
    signal or wake is ordered with the wait's own establishment on this row."""
    query = (
        select(
            WE.c.status.label("execution_status"),
            SE.c.status,
            SE.c.attempt,
            SE.c.wait_kind,
            SE.c.wait_event,
            SE.c.wake_at,
        )
        .select_from(SE.join(WE, WE.c.execution_id == SE.c.execution_id))
        .where(SE.c.execution_id == execution_id, SE.c.step_name == step_name)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(of=SE)
    row = conn.execute(query).first()
    if row is None:
        if conn.execute(sql.select_execution_status(execution_id)).first() is None:
            raise ExecutionNotFound(execution_id)
        raise StepNotFound(execution_id, step_name)
    if row.execution_status not in (ExecutionStatus.PENDING.value, ExecutionStatus.RUNNING.value):
        raise WaitNotOpen(f"execution {execution_id}", row.execution_status)
    return row


def signal(
    conn: Connection,
    execution_id: str,
    step_name: str,
    payload: Any,
    *,
    ttl_seconds: float,
    definition_of: DefinitionOf,
    actor: str | None = None,
    sent_by: str | None = None,
) -> tuple[EventReceipt, WaitOutcome]:
    """Deliver ``payload`` to one execution's event wait ``step_name``: it completes now
    when it is waiting for an event; a signal to a wait not yet established (pending,
    or between retries) is kept and taken when it is. ``payload`` must already be
    checked against the wait's schema (``payload_of``)."""
    outcome = WaitOutcome()
    row = _waiting_step(conn, execution_id, step_name)
    if row.wait_kind != "event":
        kind = row.wait_kind or "task"
        hint = ": use wake" if kind == "sleep" else ""
        raise InputValidationError(
            f"step {step_name!r} is a {kind} step, not an event wait{hint}",
            [{"field": "step", "message": f"a {kind} step takes no signal"}],
        )
    armed = row.status == WAITING and row.wait_event is not None
    if row.status not in (StepStatus.PENDING.value, WAITING):
        raise WaitNotOpen(f"step {step_name}", row.status)
    ws = wait_statements()
    values = {
        "name": row.wait_event or step_name,
        "event_key": None,
        "target_execution_id": execution_id,
        "target_step": step_name,
        "payload": payload,
        "sent_by": sent_by,
        "actor": actor,
        "created_at": utcnow(),
        "expires_at": utcnow(ttl_seconds),
    }
    if armed:
        values |= {
            "consumed_at": utcnow(),
            "consumed_by_execution": execution_id,
            "consumed_by_step": step_name,
        }
    event_id = conn.execute(ws.insert_event.values(**values)).scalar_one()
    if not armed:
        return EventReceipt(event_id, None), outcome
    execution = _execution_of(conn, execution_id, definition_of)
    if execution is None:
        raise ExecutionNotFound(execution_id)
    end = _End(
        execution_id,
        step_name,
        row.attempt,
        StepStatus.SUCCEEDED.value,
        output=payload,
        reason=_received("signal", "", "", event_id, actor),
        how="signal",
    )
    _end_waits(conn, [end], {execution_id: execution}, definition_of, outcome)
    return EventReceipt(event_id, f"{execution_id}/{step_name}"), outcome


def wake(
    conn: Connection,
    execution_id: str,
    step_name: str,
    *,
    definition_of: DefinitionOf,
    actor: str | None = None,
) -> WaitOutcome:
    """Wake a sleeping step now: it succeeds with the time it woke, recorded as woken
    early by ``actor``. WaitNotOpen (409) when it is not sleeping."""
    outcome = WaitOutcome()
    row = _waiting_step(conn, execution_id, step_name)
    if row.wait_kind != "sleep":
        kind = row.wait_kind or "task"
        raise InputValidationError(
            f"step {step_name!r} is a {kind} step, not a sleep",
            [{"field": "step", "message": f"a {kind} step cannot be woken"}],
        )
    if row.status != WAITING:
        detail = "not sleeping yet" if row.status == StepStatus.PENDING.value else ""
        raise WaitNotOpen(f"step {step_name}", row.status, detail)
    execution = _execution_of(conn, execution_id, definition_of)
    if execution is None:
        raise ExecutionNotFound(execution_id)
    now = datetime.now(UTC).isoformat()
    by = f" by {actor}" if actor else ""
    end = _End(
        execution_id,
        step_name,
        row.attempt,
        StepStatus.SUCCEEDED.value,
        output=now,
        reason=f"woken early{by}",
        how="early",
    )
    _end_waits(conn, [end], {execution_id: execution}, definition_of, outcome)
    return outcome


def expire_events(conn: Connection, limit: int) -> int:
    """Drop up to ``limit`` events nobody consumed before they expired (the reconciler's
    pass); consumed events stay as the audit."""
    expired = (
        select(IB.c.id)
        .where(IB.c.consumed_at.is_(None), IB.c.expires_at < utcnow())
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(conn.execute(expired).scalars())
    if not ids:
        return 0
    conn.execute(IB.delete().where(IB.c.id.in_(ids)))
    return len(ids)
