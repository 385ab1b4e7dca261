"""Waits are rows: a sleep, an event wait or a child execution is a step in ``waiting``
with what it waits for and when the waker acts on it (``wake_at``). No message, no
worker, no concurrency slot.

A wait's life, each part a unit of work on a ``Connection`` in its caller's transaction:

- *entered* (``enter_waits``) by the transaction that completes its last upstream step
  (``core.steps.complete``) or starts its execution (``arm_root_waits``): pending ->
  waiting, then *established*: its callable runs (``until``, ``key``, ``input``) and the
  wait is armed (``wake_at``, ``wait_event``/``wait_key``, ``child_execution_id``), or
  ends at once when already satisfied (a past wake time, an event already sent);
- *ended* (``end_waits``) by the waker (``wake_due``: sleeps due, event timeouts, a
  retry's backoff over), an event or signal (``send_event``, ``signal``), an early wake
  (``wake``), or its child's end (``core.children``): waiting -> succeeded | failed by a
  compare-and-set, with its event row and the release of its dependents, or waiting ->
  waiting at the next attempt when its ``Retry`` allows another;
- *cancelled* with its execution (``STEPS.open`` holds ``waiting``).

Publishing what this set in motion (queued steps, child starts, ended executions) is
the caller's, after its commit: ``WaitOutcome``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row

from core import statements as sql
from core.errors import (
    InputValidationError,
)
from core.executions import admit as _admit
from core.executions import finish_if_done
from core.outcomes import Admission, Route, WaitOutcome
from core.sql import utcnow
from core.states import StepStatus
from core.step_statements import RELEASED, event_row, hot_path
from core.transitions import transition_steps
from core.wait_statements import (
    end_many,
    executions_many,
    release_many,
    repark,
    wait_statements,
)
from core.workflows import ChildWait, EventWait, MapSpec, Sleep, Step, Workflow

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
class WaitContext:
    """What a wait's callable (``until``, ``key``, ``input``) sees: a StepContext whose
    step never runs in a worker."""

    execution_id: str
    step_name: str
    attempt: int
    input: Any
    map_index: int | None = None

    @property
    def idempotency_key(self) -> str:
        if self.map_index is not None:
            return f"{self.execution_id}:{self.step_name}:{self.map_index}"
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


def call_user(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a wait's user callable; any error it raises becomes NotEstablished."""
    try:
        return function(*args, **kwargs)
    except Exception as error:
        raise NotEstablished(error) from error


@dataclass(frozen=True)
class WaitEnd:
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
class WaitingExecution:
    """What establishing a wait reads of its execution."""

    execution_id: str
    workflow: Workflow
    route: Route
    row: Row[Any]


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
        execution = read_execution(conn, execution_id, workflow)
        establish(conn, execution, entered, known_outputs, definition_of, outcome)
        ended = any(result.execution_id == execution_id for result, _ in outcome.finished)
        if not ended and not admitted_at_once(execution, entered, outcome):
            settle(conn, [execution_id], outcome)
    return bool(rows), outcome


def arm_root_waits(
    conn: Connection, execution_ids: Sequence[str], workflow: Workflow, definition_of: DefinitionOf
) -> WaitOutcome:
    """At an execution's start: its wait nodes with nothing upstream left (root waits,
    and after a retry those whose upstream steps had succeeded) enter ``waiting`` and
    are established; gated ones stay pending, for ``core.conditions.admit`` to decide."""
    outcome = WaitOutcome()
    if not execution_ids or not workflow.wait_nodes:
        return outcome
    ws = wait_statements()
    params = {"eids": list(execution_ids), "gated": sorted(workflow.gated)}
    rows = conn.execute(ws.arm_roots, params).all()
    if not rows:
        return outcome
    conn.execute(hot_path(conn.dialect.name).events, [event_row(r, ENTERED) for r in rows])
    by_execution: dict[str, list[Row[Any]]] = {}
    for row in rows:
        by_execution.setdefault(row.execution_id, []).append(row)
    settled: list[str] = []
    for execution_id, entered in by_execution.items():
        execution = read_execution(conn, execution_id, workflow)
        establish(conn, execution, entered, {}, definition_of, outcome)
        if not admitted_at_once(execution, entered, outcome):
            settled.append(execution_id)
    ended = {result.execution_id for result, _ in outcome.finished}
    settle(conn, [e for e in settled if e not in ended], outcome)
    return outcome


def admitted_at_once(
    execution: WaitingExecution, entered: Sequence[Row[Any]], outcome: WaitOutcome
) -> bool:
    """Whether every node ``entered`` was a step behind limits admitted at once (queued
    now) and the execution is not parked: it has a queued step, so ``settle`` would
    leave it unparked as it is, and costs a lock and an UPDATE per step for nothing."""
    if execution.row.parked_at is not None:
        return False
    queued = {name for eid, name in outcome.queued if eid == execution.execution_id}
    return all(row.step_name in queued for row in entered)


def read_execution(conn: Connection, execution_id: str, workflow: Workflow) -> WaitingExecution:
    row = conn.execute(wait_statements().execution, {"eid": execution_id}).one()
    route = Route(row.workflow_id, row.workflow_version, row.priority)
    return WaitingExecution(execution_id, workflow, route, row)


def establish(
    conn: Connection,
    execution: WaitingExecution,
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
    ends: list[WaitEnd] = []
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
            end = WaitEnd(
                execution.execution_id,
                step.name,
                row.attempt,
                StepStatus.FAILED.value,
                error=wait_error(error),
                reason=f"wait not established: {type(error).__name__}",
                how="failed",
            )
        if end is not None:
            ends.append(end)
    if ends:
        end_waits(conn, ends, {execution.execution_id: execution}, definition_of, outcome)


def _arm(
    conn: Connection,
    execution: WaitingExecution,
    step: Step,
    attempt: int,
    known_outputs: Mapping[str, Any],
    outcome: WaitOutcome,
) -> WaitEnd | None:
    """Arm one wait node; the end to record now when it is already satisfied."""
    wait = step.wait
    ws = wait_statements()
    eid = execution.execution_id
    where = {"eid": eid, "step": step.name, "att": attempt}
    arm = {"wake_at": None, "event": None, "key": None, "child": None}
    if isinstance(wait, Sleep):
        if wait.until is not None:
            until = call_user(
                wait.until,
                context_of(execution, step, attempt),
                **upstream_outputs(conn, execution, step, known_outputs),
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
            return WaitEnd(
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
    if isinstance(wait, MapSpec):
        from core.maps import expand

        return expand(conn, execution, step, attempt, known_outputs, outcome)
    if step.limits:
        from core.limits import KeyFailed, arm_gate

        try:
            arm_gate(
                conn,
                eid,
                execution.workflow,
                step,
                attempt,
                execution.row.input_data,
                execution.route,
                outcome,
            )
        except KeyFailed as error:
            raise NotEstablished(error) from error
        return None
    raise AssertionError(f"step {step.name} is not a wait")


def _event_key(
    conn: Connection,
    execution: WaitingExecution,
    step: Step,
    attempt: int,
    wait: EventWait,
    known_outputs: Mapping[str, Any],
) -> str:
    if wait.key is None:
        return ""
    if isinstance(wait.key, str):
        return wait.key
    key = call_user(
        wait.key,
        context_of(execution, step, attempt),
        **upstream_outputs(conn, execution, step, known_outputs),
    )
    if not isinstance(key, str | int) or isinstance(key, bool):
        raise InputValidationError(f"key of wait {step.name!r} must be text, got {key!r}")
    key = str(key)
    if not 0 < len(key) <= 255:
        raise InputValidationError(f"key of wait {step.name!r} must be 1-255 characters")
    return key


def _arm_event(
    conn: Connection,
    execution: WaitingExecution,
    step: Step,
    attempt: int,
    wait: EventWait,
    key: str,
) -> WaitEnd | None:
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
        return WaitEnd(
            eid,
            step.name,
            attempt,
            StepStatus.SUCCEEDED.value,
            output=taken.payload,
            reason=received_reason(how, wait.event, key, taken.id, taken.actor),
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


def received_reason(how: str, event: str, key: str, event_id: int, actor: str | None) -> str:
    sender = f" by {actor}" if actor else ""
    if how == "signal":
        return f"signal{sender} (#{event_id})"
    return f"event {event}/{key} #{event_id}{sender}"


def context_of(execution: WaitingExecution, step: Step, attempt: int) -> WaitContext:
    return WaitContext(
        execution.execution_id,
        step.name,
        attempt,
        execution.workflow.parse_input(execution.row.input_data),
    )


def upstream_outputs(
    conn: Connection, execution: WaitingExecution, step: Step, known: Mapping[str, Any]
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


def wait_error(error: BaseException) -> dict[str, Any]:
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


def end_waits(
    conn: Connection,
    ends: Sequence[WaitEnd],
    executions: Mapping[str, WaitingExecution],
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
        if workflow.gated:
            # Its dependents follow their triggers, whatever it ended as (core.conditions).
            from core.conditions import release_after

            if release_after(
                conn,
                end.execution_id,
                workflow,
                [(end.step_name, end.to)],
                {end.step_name: end.output},
                definition_of,
                outcome,
            ):
                released_in.add(end.execution_id)
        if end.to != StepStatus.SUCCEEDED.value:
            if not workflow.gated:
                skipped = skip_wait_descendants(
                    conn, end.execution_id, end.step_name, workflow.descendants(end.step_name)
                )
                outcome.skipped += [(workflow.name, name, "upstream") for name in skipped]
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


def _end_rows(conn: Connection, ends: Sequence[WaitEnd]) -> list[tuple[WaitEnd, Row[Any]]]:
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


def skip_wait_descendants(
    conn: Connection, execution_id: str, step_name: str, descendants: Sequence[str] | None
) -> list[str]:
    """Skip the pending descendants of a wait that failed for good (None: every pending
    step), as ``core.steps.skip_descendants`` does for a task step; the names skipped."""
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


def fail_or_retry(
    conn: Connection,
    execution: WaitingExecution,
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
    record = wait_error(error)
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
    end = WaitEnd(
        execution.execution_id,
        step.name,
        attempt,
        StepStatus.FAILED.value,
        error=record,
        reason=f"failed: {record['type']}",
        how=how,
    )
    end_waits(conn, [end], {execution.execution_id: execution}, definition_of, outcome)


def admit(
    conn: Connection,
    workflow: Workflow,
    execution_ids: Sequence[str],
    definition_of: DefinitionOf,
) -> tuple[Admission, WaitOutcome]:
    """``core.executions.admit`` for a workflow with wait nodes: the admission, then the
    started executions' waits with nothing upstream left entered and established."""
    admission = _admit(conn, workflow.name, execution_ids, workflow)
    return admission, arm_root_waits(conn, admission.started, workflow, definition_of)


def execution_of(
    conn: Connection, execution_id: str, definition_of: DefinitionOf
) -> WaitingExecution | None:
    row = conn.execute(wait_statements().execution, {"eid": execution_id}).one()
    workflow = definition_of(row.workflow_id, row.workflow_version)
    if workflow is None:
        return None
    route = Route(row.workflow_id, row.workflow_version, row.priority)
    return WaitingExecution(execution_id, workflow, route, row)


def executions_of(
    conn: Connection, execution_ids: Sequence[str], definition_of: DefinitionOf
) -> dict[str, WaitingExecution | None]:
    """``execution_of`` for many executions: one read (None: a workflow this process
    does not know)."""
    found: dict[str, WaitingExecution | None] = {}
    for row in conn.execute(executions_many(execution_ids)):
        workflow = definition_of(row.workflow_id, row.workflow_version)
        route = Route(row.workflow_id, row.workflow_version, row.priority)
        found[row.execution_id] = (
            None if workflow is None else WaitingExecution(row.execution_id, workflow, route, row)
        )
    return found
