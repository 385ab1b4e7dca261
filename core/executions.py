"""An execution's life in SQL: create, start (admit), cancel, retry, finish, read.

Each function is one unit of work on a ``Connection`` inside a transaction its caller
owns (``core.transactions.Transactions`` runs it, sync or async). Every transition is a
compare-and-set whose allowed sources come from ``core.states``, written together with
its event row. A step's own life (claim, complete, retry, fail) is in ``core.steps``;
the reconciler's pass in ``core.reconciler``.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, text

from core import statements as sql
from core.debounce import Window, enqueue_debounced
from core.errors import (
    DebouncedIdempotencyKey,
    ExecutionNotFound,
    IdempotencyConflict,
    InputValidationError,
    InvalidTransition,
)
from core.map_statements import cancel_items_of
from core.models import ExecutionEvent, StepExecution, WorkflowExecution, encode_json, new_id
from core.outcomes import Admission, CreatedExecution, Route, TransitionResult, WaitOutcome
from core.registry import WorkflowRegistry
from core.schedules import refuse_reserved_key
from core.shapes import Shape, record_shapes, shape_of
from core.sql import utcnow
from core.states import EXECUTIONS, STEPS, ExecutionStatus, StepStatus
from core.step_statements import ADMITTED, ALL_STEPS_FINAL, ROOT_STEP, hot_path
from core.transactions import orm
from core.transitions import (
    event_dict,
    event_rows,
    transition_execution,
    transition_of,
    transition_steps,
)
from core.workflows import Workflow

log = logging.getLogger(__name__)


# A workflow's definition by name and version (None: this process does not know it).
DefinitionOf = Callable[[str, int], Workflow | None]

INSERT_CHUNK = 500
# The idempotency scope of every producer but the HTTP API, whose keys are per user.
PRODUCER_SCOPE = ""


@dataclass(frozen=True)
class StepSpec:
    """A step to create with its execution: how many upstream steps it waits for."""

    name: str
    unmet_deps: int = 0
    max_attempts: int = 1
    # sleep, event or child for a wait node; None for a task step.
    wait_kind: str | None = None


@dataclass(frozen=True)
class NewExecution:
    """Everything needed to insert one execution (validated by ``new_execution``)."""

    workflow_id: str
    input_data: Any
    workflow_version: int = 1
    idempotency_key: str | None = None
    # Whose namespace the key is in: the HTTP API's caller (their user id), or the
    # producers' (''; Python, the CLI, the seed's manager, schedules).
    idempotency_scope: str = PRODUCER_SCOPE
    triggered_by: str | None = None
    priority: int = 0
    deadline_at: datetime | None = None
    steps: tuple[StepSpec, ...] = ()
    # A child execution (core.children): its id derives from the parent step and attempt
    # that start it; it records where it hangs in its tree.
    execution_id: str | None = None
    parent_execution_id: str | None = None
    parent_step_name: str | None = None
    parent_attempt: int | None = None
    # A map's child item (``wf.child(..., over=)``): the item's index; its attempt is
    # ``parent_attempt``.
    parent_item_index: int | None = None
    root_execution_id: str | None = None
    depth: int = 0
    # A debounced workflow's enqueue: the window it opens or collapses into.
    debounce: Window | None = None
    # The key it takes turns under when its workflow's limits hold it (core.limits).
    limit_key: str | None = None
    # The workflow's shape it starts with (core.shapes): stored with it, so that only a
    # worker whose code may finish it runs its steps.
    shape: Shape | None = None


def check_payload(field: str, value: Any, max_bytes: int) -> str:
    """``value`` as JSON text if it is storable JSON (``core.models.encode_json``) no
    larger than ``max_bytes``; else InputValidationError naming the problem."""
    text = encode_json(field, value)
    # json.dumps escapes every non-ASCII character: its length is its size in bytes.
    if len(text) > max_bytes:
        raise InputValidationError(
            f"{field} is {len(text)} bytes of JSON; the limit is {max_bytes} "
            "(CONVEYOR_MAX_PAYLOAD_BYTES)"
        )
    return text


def new_execution(
    workflow_id: str,
    input_data: Any,
    *,
    max_payload_bytes: int,
    workflow_version: int = 1,
    idempotency_key: str | None = None,
    idempotency_scope: str = PRODUCER_SCOPE,
    schedule_tick: bool = False,
    triggered_by: str | None = None,
    priority: int = 0,
    deadline_at: datetime | None = None,
    steps: Sequence[StepSpec] = (),
) -> NewExecution:
    """Validate a request to create an execution before anything is written.

    A key beginning ``schedule:`` is refused (ReservedIdempotencyKey) unless
    ``schedule_tick``, which only the schedules' firing pass passes.
    """
    if not isinstance(workflow_id, str) or not workflow_id.strip():
        raise InputValidationError(f"workflow_id must be a non-empty string, got {workflow_id!r}")
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 255
    ):
        raise InputValidationError("idempotency_key must be a string of 1 to 255 characters")
    if not schedule_tick:
        refuse_reserved_key(idempotency_key)
    if not isinstance(idempotency_scope, str) or len(idempotency_scope) > 36:
        raise InputValidationError("idempotency_scope must be a string of at most 36 characters")
    if deadline_at is not None and deadline_at.tzinfo is None:
        raise InputValidationError("deadline_at must be timezone-aware")
    names = [step.name for step in steps]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputValidationError(f"duplicate step names: {', '.join(duplicates)}")
    check_payload("input_data", input_data, max_payload_bytes)
    return NewExecution(
        workflow_id=workflow_id,
        input_data=input_data,
        workflow_version=workflow_version,
        idempotency_key=idempotency_key,
        idempotency_scope=idempotency_scope,
        triggered_by=triggered_by,
        priority=priority,
        deadline_at=deadline_at,
        steps=tuple(steps),
    )


def execution_of(
    registry: WorkflowRegistry,
    workflow_id: str,
    input_data: Any,
    *,
    max_payload_bytes: int,
    workflow_version: int | None = None,
    idempotency_key: str | None = None,
    idempotency_scope: str = PRODUCER_SCOPE,
    schedule_tick: bool = False,
    triggered_by: str | None = None,
    priority: int = 0,
    deadline_at: datetime | None = None,
) -> NewExecution:
    """A validated execution of a registered workflow, with one row per step.

    Raises WorkflowNotFound for a workflow nobody registered and InputValidationError
    for input its model refuses, before anything is written; keys as ``new_execution``.
    """
    if not isinstance(workflow_id, str) or not workflow_id.strip():
        raise InputValidationError(f"workflow_id must be a non-empty string, got {workflow_id!r}")
    definition = registry.get(workflow_id, workflow_version)
    if not 0 <= priority <= 9:
        raise InputValidationError(f"priority must be 0-9, got {priority}")
    if deadline_at is None and definition.deadline is not None:
        deadline_at = datetime.now(UTC) + definition.deadline
    checked = definition.validate_input(input_data)
    window = _window_of(definition, checked, idempotency_key)
    new = new_execution(
        definition.name,
        checked,
        max_payload_bytes=max_payload_bytes,
        workflow_version=definition.version,
        idempotency_key=idempotency_key,
        idempotency_scope=idempotency_scope,
        schedule_tick=schedule_tick,
        triggered_by=triggered_by,
        priority=priority,
        deadline_at=deadline_at,
        steps=step_specs(definition),
    )
    from core.limits import partition_key

    new = replace(new, limit_key=partition_key(definition, checked), shape=shape_of(definition))
    return new if window is None else replace(new, debounce=window)


def _window_of(definition: Workflow, checked: Any, idempotency_key: str | None) -> Window | None:
    """The debounce window an enqueue of ``definition`` with input ``checked`` (validated
    JSON) goes to; None for a workflow without ``Debounce``. An idempotency key is
    refused with one: the window's execution already stands for every enqueue in it,
    and a key naming one enqueue of many could not say which input ran
    (DebouncedIdempotencyKey)."""
    debounce = definition.debounce
    if debounce is None:
        return None
    if idempotency_key is not None:
        raise DebouncedIdempotencyKey(definition.name)
    key = debounce.key_of(definition.name, definition.parse_input(checked))
    max_wait = None if debounce.max_wait is None else debounce.max_wait.total_seconds()
    return Window(key, debounce.period.total_seconds(), max_wait)


def step_specs(workflow: Workflow) -> list[StepSpec]:
    """The step rows an execution of ``workflow`` starts with."""
    return [
        StepSpec(
            step.name,
            len(step.depends_on),
            step.retry.max_attempts,
            step.wait_kind,
        )
        for step in workflow.steps.values()
    ]


def create_execution(conn: Connection, new: NewExecution) -> CreatedExecution:
    """Insert an execution, its steps and its first event; reuse one with the same key."""
    created = create_executions(conn, [new])
    return created[0]


def create_executions(conn: Connection, batch: Sequence[NewExecution]) -> list[CreatedExecution]:
    """Insert many executions with one INSERT each for executions, steps and events.

    Executions whose idempotency key is already taken in their scope are not inserted:
    the existing execution is returned (created=False) when it has the same workflow,
    input and triggering user, and IdempotencyConflict is raised when it does not. Keys
    are unique per scope, so the execution a reuse finds or names is always one of the
    caller's own: a key held in another scope is never seen here.
    """
    ids = [new_id() for _ in batch]
    rows = [
        {
            "execution_id": execution_id,
            "workflow_id": new.workflow_id,
            "workflow_version": new.workflow_version,
            "input_data": new.input_data,
            "status": ExecutionStatus.PENDING.value,
            "idempotency_key": new.idempotency_key,
            "idempotency_scope": new.idempotency_scope,
            "triggered_by": new.triggered_by,
            "priority": new.priority,
            "deadline_at": new.deadline_at,
            "shape_hash": None if new.shape is None else new.shape.hash,
        }
        for execution_id, new in zip(ids, batch, strict=True)
    ]
    _record(conn, batch)
    if any(new.debounce is not None for new in batch):
        return _create_debounced(conn, ids, rows, batch)
    keyed = any(new.idempotency_key is not None for new in batch)
    inserted: set[str] = set()
    if conn.dialect.name == "postgresql":
        inserted.update(conn.execute(text(sql.INSERT_EXECUTIONS_PG), _columns(rows)).scalars())
    # Chunks keep each statement under SQLite's limit on bound parameters.
    for start in range(0, len(rows) if conn.dialect.name != "postgresql" else 0, INSERT_CHUNK):
        chunk = rows[start : start + INSERT_CHUNK]
        result = conn.execute(sql.insert_executions(conn.dialect.name, chunk, idempotent=keyed))
        inserted.update(row.execution_id for row in result.all())
    outcome: list[CreatedExecution] = []
    for execution_id, new in zip(ids, batch, strict=True):
        if execution_id in inserted:
            outcome.append(CreatedExecution(execution_id, created=True))
            continue
        assert new.idempotency_key is not None, "only a key conflict skips an insert"
        existing = conn.execute(
            sql.select_by_idempotency_key(new.idempotency_scope, new.idempotency_key)
        ).one()
        same_input = json.dumps(existing.input_data, sort_keys=True) == json.dumps(
            new.input_data, sort_keys=True
        )
        # In a user's scope every execution is triggered by that user; only producers
        # (trusted code, one scope) can reuse a key for another triggering user.
        differs = [
            what
            for what, same in (
                ("workflow", existing.workflow_id == new.workflow_id),
                ("input", same_input),
                ("triggering user", existing.triggered_by == new.triggered_by),
            )
            if not same
        ]
        if differs:
            raise IdempotencyConflict(
                f"idempotency key {new.idempotency_key!r} is already used by execution "
                f"{existing.execution_id} of workflow {existing.workflow_id!r}: its "
                f"{' and '.join(differs)} {'differs' if len(differs) == 1 else 'differ'} "
                "from this request's"
            )
        outcome.append(CreatedExecution(existing.execution_id, created=False))
    created = [(c.execution_id, new) for c, new in zip(outcome, batch, strict=True) if c.created]
    _insert_steps(conn, created)
    keyed_rows = [
        {"eid": eid, "limit": new.limit_key} for eid, new in created if new.limit_key is not None
    ]
    if keyed_rows:  # only workflows whose limits take turns between keys pay for it
        conn.execute(sql.set_limit_keys(), keyed_rows)
    return outcome


def _create_debounced(
    conn: Connection,
    ids: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    batch: Sequence[NewExecution],
) -> list[CreatedExecution]:
    """``create_executions`` of a debounced workflow: one upsert per enqueue, in order
    (so that in a batch with one key the last input wins), steps for the windows opened.
    Nothing is to be started now (``held``): the waker starts each window when due."""
    outcome: list[CreatedExecution] = []
    opened: list[tuple[str, NewExecution]] = []
    for execution_id, row, new in zip(ids, rows, batch, strict=True):
        assert new.debounce is not None, "a batch is of one workflow"
        taken_by = enqueue_debounced(conn, row, new.debounce, new.limit_key)
        if taken_by == execution_id:
            opened.append((execution_id, new))
        outcome.append(CreatedExecution(taken_by, created=taken_by == execution_id, held=True))
    _insert_steps(conn, opened)
    return outcome


def create_child_execution(conn: Connection, new: NewExecution) -> bool:
    """Insert a child execution (``new.execution_id`` and the parent fields set), its
    steps and first event; False, inserting nothing, when that id exists already (a
    replay of the transaction that started it)."""
    assert new.execution_id is not None
    assert new.parent_execution_id is not None
    row = {
        "execution_id": new.execution_id,
        "workflow_id": new.workflow_id,
        "workflow_version": new.workflow_version,
        "input_data": new.input_data,
        "status": ExecutionStatus.PENDING.value,
        "triggered_by": new.triggered_by,
        "priority": new.priority,
        "deadline_at": new.deadline_at,
        "parent_execution_id": new.parent_execution_id,
        "parent_step_name": new.parent_step_name,
        "parent_attempt": new.parent_attempt,
        "parent_item_index": new.parent_item_index,
        "root_execution_id": new.root_execution_id,
        "depth": new.depth,
        "shape_hash": None if new.shape is None else new.shape.hash,
    }
    _record(conn, [new])
    inserted = conn.execute(sql.insert_child_execution(conn.dialect.name, row)).first()
    if inserted is None:
        return False
    _insert_steps(conn, [(new.execution_id, new)])
    return True


# The shapes this process stored, by database: stored once, not at every enqueue.
_recorded: set[tuple[str, str]] = set()


def _record(conn: Connection, batch: Sequence[NewExecution]) -> None:
    """Store the shapes of ``batch`` this process has not stored in this database yet.
    Marked stored before this transaction commits: if it rolls back, the shape is
    stored by the next worker that starts with it (``core.shapes.advertise``), and
    until then an execution of it runs on any worker, as before shapes."""
    database = conn.engine.url.render_as_string(hide_password=True)
    fresh = {
        new.shape.hash: new.shape
        for new in batch
        if new.shape is not None and (database, new.shape.hash) not in _recorded
    }
    if fresh:
        record_shapes(conn, fresh.values())
        _recorded.update((database, h) for h in fresh)


def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Execution rows as the arrays of ``INSERT_EXECUTIONS_PG`` (inputs as JSON text)."""
    return {
        "ids": [r["execution_id"] for r in rows],
        "wfs": [r["workflow_id"] for r in rows],
        "vers": [r["workflow_version"] for r in rows],
        "inputs": [None if r["input_data"] is None else json.dumps(r["input_data"]) for r in rows],
        "prios": [r["priority"] for r in rows],
        "keys": [r["idempotency_key"] for r in rows],
        "scopes": [r["idempotency_scope"] for r in rows],
        "bys": [r["triggered_by"] for r in rows],
        "deadlines": [r["deadline_at"] for r in rows],
        "shapes": [r["shape_hash"] for r in rows],
    }


def _insert_steps(conn: Connection, created: Sequence[tuple[str, NewExecution]]) -> None:
    """The step rows and the first event of executions just inserted."""
    if conn.dialect.name == "postgresql" and created:
        # One statement per shape of steps (a batch is of one workflow: one statement).
        shapes: dict[tuple[StepSpec, ...], list[str]] = {}
        for execution_id, new in created:
            shapes.setdefault(tuple(new.steps), []).append(execution_id)
        for steps, ids in shapes.items():
            if steps:
                conn.execute(
                    text(sql.INSERT_STEPS_PG),
                    {
                        "ids": ids,
                        "names": [s.name for s in steps],
                        "unmet": [s.unmet_deps for s in steps],
                        "most": [s.max_attempts for s in steps],
                        "kinds": [s.wait_kind for s in steps],
                    },
                )
        conn.execute(text(sql.INSERT_CREATED_EVENTS_PG), {"ids": [e for e, _ in created]})
        return
    step_rows = [
        {
            "execution_id": execution_id,
            "step_name": step.name,
            "status": StepStatus.PENDING.value,
            "unmet_deps": step.unmet_deps,
            "max_attempts": step.max_attempts,
            "wait_kind": step.wait_kind,
        }
        for execution_id, new in created
        for step in new.steps
    ]
    if step_rows:
        conn.execute(sql.insert_rows(StepExecution), step_rows)
    if created:
        events = [
            event_dict(execution_id, None, None, ExecutionStatus.PENDING.value, 1, "created")
            for execution_id, _ in created
        ]
        conn.execute(sql.insert_rows(ExecutionEvent), events)


def get_execution(conn: Connection, execution_id: str) -> WorkflowExecution:
    """One execution, or ExecutionNotFound."""
    found: WorkflowExecution | None = (
        orm(conn).execute(sql.select_execution(execution_id))
    ).scalar_one_or_none()
    if found is None:
        raise ExecutionNotFound(execution_id)
    return found


@dataclass(frozen=True)
class ExecutionFilter:
    """Which executions a listing returns; None means any. ``waiting`` is the listing's
    pseudo-status (WAITING): running executions that are parked, every open step of
    theirs waiting (``parked_at`` set); with ``statuses`` too, either matches."""

    statuses: frozenset[ExecutionStatus] | None = None
    workflow_id: str | None = None
    triggered_by: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    waiting: bool = False


class ListedStatus(StrEnum):
    """What a listing's status filter names: an execution status, or ``waiting``, a
    pseudo-status (no column holds it): a running execution that is parked."""

    PENDING = ExecutionStatus.PENDING.value
    RUNNING = ExecutionStatus.RUNNING.value
    WAITING = "waiting"
    SUCCEEDED = ExecutionStatus.SUCCEEDED.value
    FAILED = ExecutionStatus.FAILED.value
    CANCELLED = ExecutionStatus.CANCELLED.value
    TIMED_OUT = ExecutionStatus.TIMED_OUT.value


def listed_statuses(values: Iterable[str]) -> tuple[frozenset[ExecutionStatus] | None, bool]:
    """The ``statuses`` and ``waiting`` of an ExecutionFilter for the statuses a listing
    names, ``waiting`` among them (InvalidStatus for any other)."""
    named = set(values)
    waiting = ListedStatus.WAITING.value in named
    statuses = frozenset(EXECUTIONS.parse(v) for v in named - {ListedStatus.WAITING.value})
    return (statuses if statuses or not waiting else None), waiting


@dataclass(frozen=True)
class ExecutionPage:
    """One page of a listing, newest first, and the cursor of the next (None: last)."""

    items: list[WorkflowExecution]
    next_cursor: str | None


def encode_cursor(execution: WorkflowExecution) -> str:
    """The opaque position just past ``execution`` in newest-first order."""
    position = json.dumps([execution.created_at.isoformat(), execution.execution_id])
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position a cursor names (InputValidationError when it is not one of ours)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, execution_id = json.loads(raw)
        moment = datetime.fromisoformat(created)
        # A forged cursor's NUL would reach the database as a bind parameter it refuses.
        if moment.tzinfo is None or not isinstance(execution_id, str) or "\x00" in execution_id:
            raise ValueError(cursor)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise InputValidationError(
            "cursor is not valid: pass the next_cursor of a previous page",
            [{"field": "cursor", "message": "not a cursor this API returned"}],
        ) from None
    return moment, execution_id


def page_executions(
    conn: Connection, where: ExecutionFilter, limit: int, cursor: str | None = None
) -> ExecutionPage:
    """A page of executions, newest first (created_at, then id, both descending).

    Keyset pagination: a page starts strictly after the cursor's row, so rows inserted
    while a client pages through neither shift later pages (no row repeats) nor push
    earlier rows out of reach (no row is skipped).
    """
    after = decode_cursor(cursor) if cursor is not None else None
    rows = list(
        orm(conn)
        .execute(
            sql.page_executions(
                statuses=where.statuses,
                workflow_id=where.workflow_id,
                triggered_by=where.triggered_by,
                created_after=where.created_after,
                created_before=where.created_before,
                limit=limit + 1,
                after=after,
                waiting=where.waiting,
            )
        )
        .scalars()
        .all()
    )
    more = len(rows) > limit
    items = rows[:limit]
    return ExecutionPage(items, encode_cursor(items[-1]) if more else None)


def list_executions(
    conn: Connection,
    status: ExecutionStatus | None,
    workflow_id: str | None,
    limit: int,
    *,
    waiting: bool = False,
) -> list[WorkflowExecution]:
    """The newest ``limit`` executions, optionally of one status (or ``waiting``: the
    running ones parked on their waits) and workflow."""
    where = ExecutionFilter(
        statuses=frozenset({status}) if status is not None else None,
        workflow_id=workflow_id,
        waiting=waiting,
    )
    return page_executions(conn, where, limit).items


def get_steps(conn: Connection, execution_id: str) -> list[StepExecution]:
    """The steps of an execution (ExecutionNotFound for an unknown id)."""
    steps = list(orm(conn).execute(sql.select_steps(execution_id)).scalars().all())
    if not steps and conn.execute(sql.select_execution_status(execution_id)).first() is None:
        raise ExecutionNotFound(execution_id)
    return steps


def get_history(conn: Connection, execution_id: str) -> list[ExecutionEvent]:
    """Every recorded transition of an execution, oldest first."""
    events = list(orm(conn).execute(sql.select_history(execution_id)).scalars().all())
    if not events and conn.execute(sql.select_execution_status(execution_id)).first() is None:
        raise ExecutionNotFound(execution_id)
    return events


def cancel_execution(conn: Connection, execution_id: str, reason: str | None) -> TransitionResult:
    """Cancel an open execution and, in the same transaction, all of its open steps."""
    sources = EXECUTIONS.sources_of(ExecutionStatus.CANCELLED)
    return move_execution(conn, execution_id, ExecutionStatus.CANCELLED, sources, reason)


def move_execution(
    conn: Connection,
    execution_id: str,
    target: ExecutionStatus,
    sources: frozenset[ExecutionStatus],
    reason: str | None,
) -> TransitionResult:
    """Compare-and-set an execution from ``sources`` to ``target`` (a forward edge: the
    state managers' ``transition_execution``), keeping its steps consistent with it.

    A final ``target`` closes the execution's open steps in the same transaction
    (cancelled, with ``reason`` in their events): nothing of a finished execution is
    left queued or running for a worker or the reconciler. ``succeeded`` is refused
    with InvalidTransition while a step is open (a success is its steps' success: end
    them first, or cancel or fail the execution), before anything is written. Not
    applied (``applied`` False) when the execution is in none of ``sources``. Its
    child executions are ended with it (``end_execution``).
    """
    return end_execution(conn, execution_id, target, sources, reason)[0]


def end_execution(
    conn: Connection,
    execution_id: str,
    target: ExecutionStatus,
    sources: frozenset[ExecutionStatus],
    reason: str | None,
    definition_of: DefinitionOf | None = None,
) -> tuple[TransitionResult, WaitOutcome]:
    """``move_execution``, with what a final status set in motion beyond the execution:
    its open descendants (child executions, theirs, ...) cancelled with their open steps,
    and, when it is a child, its parent step told (``core.children``: it fails, then
    follows its Retry). The WaitOutcome holds the descendants ended and what the parent's
    wake set in motion, for the caller to publish after commit."""
    if target is ExecutionStatus.SUCCEEDED:
        current = conn.execute(sql.select_execution_status(execution_id)).scalar_one_or_none()
        still_open = conn.execute(sql.open_steps_of(execution_id)).scalars().all()
        if current in sources and still_open:
            raise InvalidTransition(
                "execution",
                current,
                target,
                f"step {', '.join(still_open)} {'is' if len(still_open) == 1 else 'are'} "
                "still open: end the steps first, or cancel or fail the execution",
            )
    outcome = WaitOutcome()
    result = transition_execution(conn, execution_id, target, sources, reason=reason)
    if result.applied and target in EXECUTIONS.final:
        step_sources = STEPS.sources_of(StepStatus.CANCELLED)
        step_reason = reason or f"execution {target.value}"
        transition_steps(
            conn, execution_id, None, StepStatus.CANCELLED, step_sources, reason=step_reason
        )
        conn.execute(cancel_items_of([execution_id]))
        ended_as = target.value.replace("_", " ")
        end_trees(conn, [execution_id], f"parent {ended_as}", outcome, definition_of)
    return result, outcome


def end_trees(
    conn: Connection,
    execution_ids: Sequence[str],
    reason: str,
    outcome: WaitOutcome,
    definition_of: DefinitionOf | None = None,
) -> list[str]:
    """After the given executions ended (in this transaction): cancel their open
    descendants and those descendants' open steps (``reason``), then tell the parents of
    those that are children (``core.children.wake_parents_of``); the children whose
    parent was told. One recursive probe of ix_workflow_executions_parent and one
    primary-key probe when there is no tree."""
    from core.children import wake_parents_of
    from core.waits import registered

    below = list(conn.execute(sql.descendants_of(execution_ids)).scalars())
    if below:
        rows = conn.execute(sql.cancel_executions(below)).all()
        ended = [transition_of(row, step=False) for row in rows]
        if ended:
            step_rows = conn.execute(sql.cancel_steps_of([r.execution_id for r in ended])).all()
            conn.execute(cancel_items_of([r.execution_id for r in ended]))
            cancelled = [transition_of(row, step=True) for row in step_rows]
            conn.execute(
                sql.insert_rows(ExecutionEvent),
                event_rows(ended, reason) + event_rows(cancelled, reason),
            )
            outcome.finished += [(r, row.workflow_id) for r, row in zip(ended, rows, strict=True)]
    return wake_parents_of(conn, execution_ids, outcome, definition_of or registered)


def admit(
    conn: Connection,
    workflow_id: str,
    execution_ids: Sequence[str],
    limited: Workflow | None,
) -> Admission:
    """Start pending executions and queue their root steps, within the workflow's limits.

    Without limits (``limited`` None) the given executions start. With them
    (``Workflow(concurrency=, rate_limit=, max_concurrency=)``), as many as the limits
    allow start, chosen among all pending executions of the workflow, round robin
    between their keys, by priority then age (``core.limits.admit_executions``): the
    given ids only say that something may be waiting.
    """
    cancelled: list[str] = []
    retry_at = None
    if limited is None or not limited.limits:
        candidates = list(execution_ids)
        if not candidates:
            return Admission()
        start = sql.transition_execution(
            candidates, ExecutionStatus.RUNNING, {ExecutionStatus.PENDING}
        )
        started_rows = conn.execute(start).all()
        started = [transition_of(row, step=False) for row in started_rows]
        started_events = event_rows(started, ADMITTED)
    else:
        from core.limits import admit_executions

        lock = sql.lock_workflow(conn.dialect.name, workflow_id)
        if lock is not None:
            conn.execute(lock)
        admitted = admit_executions(conn, limited)
        started = [transition_of(row, step=False) for row in admitted.started]
        started_events = []  # written by admit_executions
        cancelled, retry_at = admitted.cancelled, admitted.retry_at
    if not started:
        return Admission(cancelled=cancelled, retry_at=retry_at)
    started_ids = [r.execution_id for r in started]
    queued_rows = conn.execute(sql.queue_roots(started_ids)).all()
    queued = [transition_of(row, step=True) for row in queued_rows]
    events = started_events + event_rows(queued, ROOT_STEP)
    if events:
        conn.execute(sql.insert_rows(ExecutionEvent), events)
    routes = execution_routes(conn, started_ids)
    first_run = {r.execution_id for r in started if r.attempt == 1}
    return Admission(
        started=started_ids,
        queued=[(r.execution_id, r.step_name or "") for r in queued],
        routes=routes,
        first_run=[
            (r.execution_id, r.step_name or "") for r in queued if r.execution_id in first_run
        ],
        cancelled=cancelled,
        retry_at=retry_at,
    )


def retry_execution(
    conn: Connection,
    execution_id: str,
    graph: Mapping[str, Sequence[str]],
    deadline: timedelta | None,
    reason: str | None = "retry",
    sources: frozenset[ExecutionStatus] | None = None,
    keep: Collection[str] = (),
) -> TransitionResult:
    """Put a failed, cancelled or timed-out execution back to pending, to be started
    again like a new one: its caller dispatches its start after the commit, and
    admission (``admit``) runs it by priority within its workflow's max_concurrency.

    Its deadline counts again from now (``deadline``, the workflow's, or none without
    one). Succeeded steps keep their outputs; every other step goes back to pending with
    its count of unmet upstream steps recomputed (``graph`` maps each step to its
    upstream steps), and with its retry policy and crash recoveries whole again: its
    ``attempt`` counts on (a late message of an earlier attempt can never complete a
    new one), and the attempts before the retry go to ``attempt_base`` and
    ``recoveries``, which the retry policy does not count. Not applied (``applied``
    False) when the execution is in no final status a retry leaves (or in none of
    ``sources``, when given). Steps named in ``keep`` (an operator's skip) keep their
    status, and their dependents do not wait for them.
    """
    if sources is None:
        sources = EXECUTIONS.sources_of(ExecutionStatus.PENDING, retry=True)
    new_deadline = None if deadline is None else utcnow(deadline.total_seconds())
    result = transition_execution(
        conn,
        execution_id,
        ExecutionStatus.PENDING,
        sources,
        reason=reason,
        retry=True,
        # A retried debounced execution (cancelled while its window was open) is pending
        # as any other: no window, so no enqueue goes into it and it starts now.
        values={
            "deadline_at": new_deadline,
            # The attempt's own start and end: "took" measures this attempt, not the
            # time since the first one started (the history keeps every start).
            "started_at": None,
            "finished_at": None,
            "parked_at": None,
            "debounce_key": None,
        },
    )
    if not result.applied:
        return result
    steps = conn.execute(sql.select_steps(execution_id)).all()
    done = {s.step_name for s in steps if s.status == StepStatus.SUCCEEDED.value} | set(keep)
    retry_from = STEPS.sources_of(StepStatus.PENDING, retry=True)
    by_unmet: dict[int, list[str]] = {}
    for step in steps:
        if step.status in retry_from and step.step_name not in keep:
            unmet = sum(1 for up in graph.get(step.step_name, ()) if up not in done)
            by_unmet.setdefault(unmet, []).append(step.step_name)
    for unmet, names in sorted(by_unmet.items()):
        _retry_steps(conn, execution_id, names, unmet, retry_from)
    return result


def _retry_steps(
    conn: Connection,
    execution_id: str,
    names: list[str],
    unmet: int,
    sources: frozenset[StepStatus],
) -> None:
    update = sql.transition_steps(
        execution_id,
        names,
        StepStatus.PENDING,
        sources,
        retry=True,
        values={
            "unmet_deps": unmet,
            # SET reads the row's old values: the attempts so far become this run's base.
            "attempt": StepExecution.attempt + 1,
            "attempt_base": StepExecution.attempt,
            "recoveries": StepExecution.attempt,
            "next_attempt_at": None,
            "output_data": None,
            "worker": None,
            # A retried wait waits afresh: a sleep its whole duration, an event wait
            # for a new event (consumed ones stay consumed), a child node a new child.
            "waiting_since": None,
            "wake_at": None,
            "wait_event": None,
            "wait_key": None,
            "child_execution_id": None,
        },
    )
    moved = [transition_of(row, step=True) for row in conn.execute(update).all()]
    if moved:
        conn.execute(sql.insert_rows(ExecutionEvent), event_rows(moved, "execution retried"))


def time_out(
    conn: Connection,
    execution_ids: Sequence[str],
    outcome: WaitOutcome | None = None,
    definition_of: DefinitionOf | None = None,
    told: list[str] | None = None,
) -> list[tuple[str, str]]:
    """Move open executions past their deadline to timed_out and cancel their open steps
    and their open descendants (``end_trees``: "parent timed out"); the parent step of
    a child timed out here fails (its Retry decides) in this transaction. The
    (execution, previous status) of those that moved; ``outcome`` collects what the
    trees' ends set in motion, for the caller to publish, ``told`` the children whose
    parent was told."""
    if not execution_ids:
        return []
    sources = EXECUTIONS.sources_of(ExecutionStatus.TIMED_OUT)
    update = sql.transition_execution(list(execution_ids), ExecutionStatus.TIMED_OUT, sources)
    rows = conn.execute(update).all()
    timed_out = [transition_of(row, step=False) for row in rows]
    if not timed_out:
        return []
    ids = [r.execution_id for r in timed_out]
    step_rows = conn.execute(sql.cancel_steps_of(ids)).all()
    conn.execute(cancel_items_of(ids))
    cancelled = [transition_of(row, step=True) for row in step_rows]
    conn.execute(
        sql.insert_rows(ExecutionEvent),
        event_rows(timed_out, "deadline passed") + event_rows(cancelled, "deadline passed"),
    )
    woken = WaitOutcome() if outcome is None else outcome
    parents_told = end_trees(conn, ids, "parent timed out", woken, definition_of)
    if told is not None:
        told += parents_told
    return [(r.execution_id, r.from_status or "") for r in timed_out]


SinksOf = Callable[[str, int], Sequence[str]]


def finish_if_done(
    conn: Connection, execution_id: str, sinks: Sequence[str] = (), *, contended: bool = True
) -> TransitionResult | None:
    """Finalize a running execution whose steps are all final; None if it is not done.

    A success records the outputs of the ``sinks`` (steps nothing depends on) as the
    execution's output; a failure records the first failed step's error.

    Call it after the step's own update, in the same transaction: of two last steps
    ending at once (two sinks), each transaction would otherwise see the other step
    still running (READ COMMITTED) and neither would finish the execution. On
    PostgreSQL a per-execution advisory lock, held to commit, orders them: the check
    runs as its own statement once the lock is held, so its snapshot sees every step
    committed by an earlier holder, and the later of the two finishes. (SQLite's
    write transactions are serial: BEGIN IMMEDIATE.) Only the possibly-last steps
    take it: a completion that released a downstream step does not call this, and
    ``contended=False`` says no other step can end at the same moment (the DAG's only
    sink completing).
    """
    if conn.dialect.name == "postgresql":
        statements = hot_path("postgresql")
        if contended:
            conn.execute(statements.lock_execution, {"eid": execution_id})
        # One statement: the finish, its event, its output or error.
        finish = statements.finish_pg
        row = conn.execute(finish, {"eid": execution_id, "sinks": list(sinks)}).first()
        return transition_of(row, step=False) if row is not None else None
    finished = finish_executions(conn, [execution_id], lambda _w, _v: sinks)
    return finished[0] if finished else None


def finish_started_idle(
    conn: Connection,
    execution_ids: Sequence[str],
    workflow_name: str,
    sinks_of: SinksOf,
    definition_of: DefinitionOf,
) -> WaitOutcome:
    """Executions just started again with nothing to run (a repair that resolved or
    skipped their last open step, a retry whose other steps had all ended): finished
    now, after their start, rather than by the reconciler's next pass; a child's parent
    is told. Those that do have an open step (a wait entered at the start) stay."""
    from core.children import wake_parents_of

    outcome = WaitOutcome()
    finished = finish_executions(conn, execution_ids, sinks_of)
    outcome.finished += [(result, workflow_name) for result in finished]
    wake_parents_of(conn, (), outcome, definition_of)
    return outcome


def finish_executions(
    conn: Connection, execution_ids: Sequence[str], sinks_of: SinksOf
) -> list[TransitionResult]:
    """Finalize those of the given running executions whose steps are all final: one
    guarded UPDATE over the set, then their outputs (``sinks_of(workflow, version)``
    names the steps that make a success's output) or errors, one executemany each.
    """
    if not execution_ids:
        return []
    if conn.dialect.name == "postgresql":
        # As finish_if_done: a pass that failed a stalled step may race another step of
        # the same execution ending; the lock orders them, the check below sees both.
        conn.execute(sql.lock_executions(execution_ids))
    rows = conn.execute(sql.finish_executions_if_done(execution_ids)).all()
    if not rows:
        return []
    finished = [transition_of(row, step=False) for row in rows]
    conn.execute(sql.insert_rows(ExecutionEvent), event_rows(finished, ALL_STEPS_FINAL))
    succeeded = [r for r in rows if r.status == ExecutionStatus.SUCCEEDED.value]
    failed = [r.execution_id for r in rows if r.status == ExecutionStatus.FAILED.value]
    results: list[dict[str, Any]] = []
    keys = [
        (r.execution_id, name)
        for r in succeeded
        for name in sinks_of(r.workflow_id, r.workflow_version)
    ]
    if keys:
        outputs: dict[str, dict[str, Any]] = {}
        for row in conn.execute(sql.steps_of(keys)).all():
            outputs.setdefault(row.execution_id, {})[row.step_name] = row.output_data
        results += [{"eid": eid, "out": out, "err": None} for eid, out in outputs.items()]
    if failed:
        errors: dict[str, dict[str, Any]] = {}
        for row in conn.execute(sql.failed_steps_of(failed)).all():
            errors.setdefault(row.execution_id, {"step": row.step_name, **(row.error or {})})
        results += [{"eid": eid, "out": None, "err": err} for eid, err in errors.items()]
    if results:
        conn.execute(sql.set_execution_results(), results)
    return finished


def execution_routes(conn: Connection, execution_ids: Sequence[str]) -> dict[str, Route]:
    """The route of each execution: what publishing a step of it needs."""
    if not execution_ids:
        return {}
    rows = conn.execute(sql.execution_routes(execution_ids)).all()
    return {
        r.execution_id: Route(r.workflow_id, r.workflow_version, r.priority, r.shape_hash)
        for r in rows
    }
