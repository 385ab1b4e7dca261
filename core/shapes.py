"""Workflow shapes: what an execution started with, and whether a worker's code may
finish it (rolling deploys that strand nothing).

A workflow's *shape* is its steps with their edges, node kinds and contracts (parameter
and return types as JSON schemas, the trigger, an explicit ``@wf.step(version=)``),
hashed. Step bodies are not in it: a changed body with the same contract is the same
shape, and old executions finish on the new code. Each execution records the shape it
started with (``workflow_executions.shape_hash``; the shapes themselves are rows of
``workflow_shapes``).

A worker runs a step only when the execution's *remaining* steps (every step not
succeeded or skipped) have the same contracts in its code, and its code adds no step
(``incompatibility``). Otherwise it hands the step back (``hand_back``), never failing
it: straight to the queue of a live worker whose shape is compatible
(``conveyor.shape.<hash>``, which every worker consumes for its own shapes), or into
``waiting`` (``wait_kind`` 'version') until one comes up (``release_held``, each
reconciler pass) or an operator migrates the execution to the current code
(``migrate``) or cancels it. ``stranded`` is ``conveyor versions check``'s answer.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, get_type_hints

from pydantic import TypeAdapter
from sqlalchemy import Connection, and_, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from core.errors import ExecutionNotFound, InputValidationError, InvalidTransition
from core.models import (
    ExecutionEvent,
    MapItem,
    StepExecution,
    WorkerShape,
    WorkflowExecution,
    WorkflowShape,
)
from core.outcomes import Route
from core.sql import utcnow
from core.states import EXECUTIONS, StepStatus
from core.workflows import ChildWait, EventWait, MapSpec, Step, Workflow

log = logging.getLogger(__name__)

SHAPE_QUEUE_PREFIX = "conveyor.shape."
# Digits of a shape's hash people see and type (CLI, queue names); the whole hash is
# the key.
SHORT = 12
VERSION_WAIT = "version"
# What a step handed back waits for, as the CLI, the API and the dashboard say it.
VERSION_WHY = "a worker whose code has a compatible shape (see conveyor versions)"
DONE = (StepStatus.SUCCEEDED.value, StepStatus.SKIPPED.value)
OPEN = tuple(s.value for s in EXECUTIONS.open)

WE = WorkflowExecution.__table__.c
SE = StepExecution.__table__.c
WS = WorkflowShape.__table__.c
WK = WorkerShape.__table__.c
MI = MapItem.__table__.c


@dataclass(frozen=True)
class Shape:
    """A workflow's shape: its name, version and each step's contract, and their hash."""

    workflow: str
    version: int
    steps: Mapping[str, Mapping[str, Any]]
    hash: str

    @property
    def short(self) -> str:
        """The hash as people see it."""
        return self.hash[:SHORT]

    def as_json(self) -> dict[str, Any]:
        """What ``workflow_shapes.shape`` holds."""
        return {"workflow": self.workflow, "version": self.version, "steps": dict(self.steps)}


def shape_queue(shape_hash: str) -> str:
    """The broker queue of the workers whose code has this shape."""
    return SHAPE_QUEUE_PREFIX + shape_hash[:SHORT]


def shape_of(workflow: Workflow) -> Shape:
    """``workflow``'s shape, computed once per definition (a later ``add_step`` resets it)."""
    found = workflow._shape
    if found is None:
        steps = {name: _contract(step) for name, step in workflow.steps.items()}
        body = {"workflow": workflow.name, "version": workflow.version, "steps": steps}
        digest = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        found = workflow._shape = Shape(workflow.name, workflow.version, steps, digest)
    assert isinstance(found, Shape)
    return found


def shape_from_json(shape_hash: str, data: Mapping[str, Any]) -> Shape:
    """A stored shape."""
    return Shape(str(data["workflow"]), int(data["version"]), dict(data["steps"]), shape_hash)


def _contract(step: Step) -> dict[str, Any]:
    """What must not change under an execution that has this step still to run."""
    contract: dict[str, Any] = {
        "kind": step.kind,
        "depends_on": list(step.depends_on),
        "trigger": step.trigger,
        "version": step.version,
        "params": _parameters(step),
        "returns": _schema_of(step.output) if step.output is not None else None,
    }
    wait = step.wait
    if isinstance(wait, EventWait):
        contract["event"] = wait.event
    elif isinstance(wait, ChildWait):
        contract["child"] = wait.workflow.name
    elif isinstance(wait, MapSpec):
        contract["over"] = wait.over
        contract["child"] = None if wait.child is None else wait.child.workflow.name
    return contract


def _parameters(step: Step) -> dict[str, Any]:
    """The function's parameters after the context, each with its type's JSON schema."""
    try:
        parameters = list(inspect.signature(step.fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    try:
        hints: Mapping[str, Any] = get_type_hints(step.fn)
    except Exception:  # unresolved forward references: their spelling stands in
        hints = {}
    found: dict[str, Any] = {}
    for parameter in parameters:
        annotation = hints.get(parameter.name, parameter.annotation)
        if annotation is inspect.Parameter.empty:
            found[parameter.name] = None
            continue
        try:
            found[parameter.name] = _schema_of(TypeAdapter(annotation))
        except Exception:  # not a type pydantic knows: compared by its spelling
            found[parameter.name] = repr(annotation)
    return found


# Keys of a JSON schema that document rather than constrain: a docstring or a model's
# class name changing is not a change of contract.
_DOCUMENTATION = frozenset({"title", "description", "examples"})


def _schema_of(adapter: TypeAdapter[Any]) -> Any:
    try:
        schema = adapter.json_schema(mode="serialization")
    except Exception:
        return repr(adapter)
    return _without_documentation(schema)


def _without_documentation(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _without_documentation(item)
            for key, item in value.items()
            if key not in _DOCUMENTATION
        }
    if isinstance(value, list):
        return [_without_documentation(item) for item in value]
    return value


def incompatibility(recorded: Shape, local: Shape | None, remaining: Collection[str]) -> str | None:
    """Why code of shape ``local`` (None: it does not have the workflow at that version)
    may not run an execution begun with shape ``recorded`` whose steps ``remaining`` are
    not done; None when it may."""
    if local is None:
        return f"this code has no workflow {recorded.workflow!r} version {recorded.version}"
    if local.hash == recorded.hash:
        return None
    for name in sorted(remaining):
        mine = local.steps.get(name)
        if mine is None:
            return f"step {name!r} is not in this code"
        theirs = recorded.steps.get(name, {})
        changed = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
        if changed:
            return f"step {name!r} changed ({', '.join(changed)})"
    added = sorted(set(local.steps) - set(recorded.steps))
    if added:
        # An execution has rows only for the steps it began with: a step this code adds
        # would never run for it, and its output would lack it.
        return f"step {', '.join(map(repr, added))} is new in this code"
    return None


# --- stored shapes and live workers ---------------------------------------------------

# Shapes by hash: immutable, so a process keeps every one it read.
_loaded: dict[str, Shape] = {}


def record_shapes(conn: Connection, shapes: Iterable[Shape]) -> None:
    """Store shapes not stored yet (a no-op for those that are)."""
    rows = [
        {
            "shape_hash": s.hash,
            "workflow": s.workflow,
            "version": s.version,
            "shape": s.as_json(),
        }
        for s in shapes
    ]
    if not rows:
        return
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(
        dialect_insert(WorkflowShape).on_conflict_do_nothing(index_elements=["shape_hash"]),
        rows,
    )


def load_shape(conn: Connection, shape_hash: str) -> Shape | None:
    """The stored shape with this hash (None when no process stored it)."""
    found = _loaded.get(shape_hash)
    if found is None:
        row = conn.execute(select(WS.shape).where(WS.shape_hash == shape_hash)).first()
        if row is None:
            return None
        found = _loaded[shape_hash] = shape_from_json(shape_hash, row.shape)
    return found


def advertise(conn: Connection, worker: str, shapes: Sequence[Shape]) -> None:
    """Say that ``worker`` is up and runs these shapes (stored if new)."""
    record_shapes(conn, shapes)
    now = utcnow()
    rows = [{"worker": worker, "shape_hash": s.hash, "workflow": s.workflow} for s in shapes]
    if not rows:
        return
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = dialect_insert(WorkerShape).values(seen_at=now)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["worker", "shape_hash"], set_={"seen_at": now}
        ),
        rows,
    )


def withdraw(conn: Connection, worker: str) -> None:
    """``worker`` stops: no step is sent to its shapes' queues for it any more."""
    conn.execute(delete(WorkerShape).where(WK.worker == worker))


def live_shapes(conn: Connection, workflow: str, within: float) -> list[str]:
    """Hashes of ``workflow``'s shapes that a worker seen in the last ``within`` seconds runs."""
    rows = conn.execute(
        select(WK.shape_hash)
        .where(WK.workflow == workflow, WK.seen_at > utcnow(-within))
        .group_by(WK.shape_hash)
    )
    return [r.shape_hash for r in rows]


# --- a worker's side: judging a claimed step, handing it back -------------------------


def remaining_steps(conn: Connection, execution_id: str) -> frozenset[str]:
    """The execution's steps not done (neither succeeded nor skipped)."""
    rows = conn.execute(
        select(SE.step_name).where(SE.execution_id == execution_id, SE.status.not_in(DONE))
    )
    return frozenset(r.step_name for r in rows)


def judge(
    conn: Connection, execution_id: str, recorded_hash: str, local: Shape | None
) -> str | None:
    """Why this worker (code of shape ``local``) may not run the execution's remaining
    steps; None when it may. An execution whose shape nobody stored (it cannot be
    compared) is run, as before shapes existed."""
    if local is not None and local.hash == recorded_hash:
        return None
    recorded = load_shape(conn, recorded_hash)
    if recorded is None:
        log.warning(
            "execution %s: its shape %s is not recorded; running it on this code",
            execution_id,
            recorded_hash[:SHORT],
        )
        return None
    return incompatibility(recorded, local, remaining_steps(conn, execution_id))


@dataclass(frozen=True)
class HandedBack:
    """A step a worker handed back: where it went (``queue`` of a live compatible worker,
    or None: it waits in ``waiting`` for one), or ``applied`` False when the step was no
    longer this worker's to give."""

    applied: bool
    queue: str | None = None
    route: Route | None = None


def hand_back(
    conn: Connection,
    execution_id: str,
    step_name: str,
    attempt: int,
    worker: str,
    reason: str,
    live_within: float,
) -> HandedBack:
    """Give back a step this worker claimed but whose execution its code may not finish
    (``reason``): to the queue of a live worker with a compatible shape, or to
    ``waiting`` (wait_kind 'version') until one comes. Never a failure, and the attempt
    is not spent."""
    found = _route_and_target(conn, execution_id, live_within)
    if found is None:
        return HandedBack(False)
    route, target = found
    mine = and_(
        SE.execution_id == execution_id,
        SE.step_name == step_name,
        SE.status == StepStatus.RUNNING.value,
        SE.attempt == attempt,
        SE.worker == worker,
    )
    now = utcnow()
    common: dict[str, Any] = {
        "previous_status": SE.status,
        "worker": None,
        "started_at": None,
        "heartbeat_at": None,
        "updated_at": now,
    }
    if target is not None:
        values = {**common, "status": StepStatus.QUEUED.value, "queued_at": now}
        why = f"handed back by {worker}: {reason}; sent to workers of shape {target[:SHORT]}"
    else:
        values = {
            **common,
            "status": StepStatus.WAITING.value,
            # What it was (None, or 'key' for a step behind limits) is kept in wait_key,
            # unused while it waits here, and put back when it is released.
            "wait_key": SE.wait_kind,
            "wait_kind": VERSION_WAIT,
            "waiting_since": now,
            "wake_at": None,
        }
        why = f"handed back by {worker}: {reason}; waiting for a worker with a compatible shape"
    moved = conn.execute(
        update(StepExecution).where(mine).values(**values).returning(SE.status)
    ).first()
    if moved is None:
        return HandedBack(False)
    _event(conn, execution_id, step_name, StepStatus.RUNNING.value, moved.status, attempt, why)
    return HandedBack(True, None if target is None else shape_queue(target), route)


def _route_and_target(
    conn: Connection, execution_id: str, live_within: float
) -> tuple[Route, str | None] | None:
    """The execution's route and a live compatible shape to send its work to (None: no
    such execution)."""
    row = conn.execute(
        select(WE.workflow_id, WE.workflow_version, WE.priority, WE.shape_hash).where(
            WE.execution_id == execution_id
        )
    ).first()
    if row is None:
        return None
    route = Route(row.workflow_id, row.workflow_version, row.priority, row.shape_hash)
    return route, _compatible_live(conn, execution_id, route, live_within)


def _event(
    conn: Connection,
    execution_id: str,
    step_name: str | None,
    source: str | None,
    target: str,
    attempt: int | None,
    reason: str,
) -> None:
    conn.execute(
        insert(ExecutionEvent).values(
            execution_id=execution_id,
            step_name=step_name,
            from_status=source,
            to_status=target,
            attempt=attempt,
            reason=reason,
            created_at=utcnow(),
        )
    )


def _compatible_live(
    conn: Connection, execution_id: str, route: Route, live_within: float
) -> str | None:
    """A live worker shape that may run the execution: its own shape first."""
    live = live_shapes(conn, route.workflow, live_within)
    if route.shape is None or not live:
        return None
    if route.shape in live:
        return route.shape
    recorded = load_shape(conn, route.shape)
    if recorded is None:
        return None
    remaining = remaining_steps(conn, execution_id)
    for candidate in sorted(live):
        shape = load_shape(conn, candidate)
        if shape is not None and incompatibility(recorded, shape, remaining) is None:
            return candidate
    return None


def hand_back_item(
    conn: Connection,
    execution_id: str,
    step_name: str,
    index: int,
    attempt: int,
    worker: str,
    live_within: float,
) -> HandedBack:
    """Give back a map item this worker claimed but whose execution its code may not
    finish: queued again at the same attempt, and sent (by the caller) to the queue of a
    live worker with a compatible shape when there is one; else it stays queued, and the
    reconciler's re-send of unclaimed items offers it again."""
    found = _route_and_target(conn, execution_id, live_within)
    if found is None:
        return HandedBack(False)
    route, target = found
    moved = conn.execute(
        update(MapItem)
        .where(
            MI.execution_id == execution_id,
            MI.step_name == step_name,
            MI.item_index == index,
            MI.status == StepStatus.RUNNING.value,
            MI.attempt == attempt,
            MI.worker == worker,
        )
        .values(
            status=StepStatus.QUEUED.value,
            worker=None,
            started_at=None,
            heartbeat_at=None,
            queued_at=utcnow(),
        )
        .returning(MI.item_index)
    ).first()
    if moved is None:
        return HandedBack(False)
    return HandedBack(True, None if target is None else shape_queue(target), route)


# --- the reconciler's side: release held steps to workers that came up ----------------


@dataclass(frozen=True)
class Released:
    """A held step sent to the queue of a live compatible worker."""

    execution_id: str
    step_name: str
    route: Route
    queue: str


def release_held(conn: Connection, limit: int, live_within: float) -> list[Released]:
    """Move steps waiting for a compatible worker to the queue of a live one, when one
    is up; at most ``limit`` a pass (oldest first). The caller publishes after commit."""
    query = (
        select(
            SE.execution_id,
            SE.step_name,
            SE.attempt,
            WE.workflow_id,
            WE.workflow_version,
            WE.priority,
            WE.shape_hash,
        )
        .join(WorkflowExecution, WE.execution_id == SE.execution_id)
        .where(SE.status == StepStatus.WAITING.value, SE.wait_kind == VERSION_WAIT)
        .order_by(SE.waiting_since)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(of=StepExecution, skip_locked=True)
    held = conn.execute(query).all()
    released: list[Released] = []
    for row in held:
        route = Route(row.workflow_id, row.workflow_version, row.priority, row.shape_hash)
        target = _compatible_live(conn, row.execution_id, route, live_within)
        if target is None:
            continue
        if _release(conn, row.execution_id, row.step_name, f"a worker of shape {target[:SHORT]}"):
            released.append(Released(row.execution_id, row.step_name, route, shape_queue(target)))
    return released


def _release(conn: Connection, execution_id: str, step_name: str, to: str) -> bool:
    """waiting (version) -> queued, with what the step was put back."""
    now = utcnow()
    moved = conn.execute(
        update(StepExecution)
        .where(
            SE.execution_id == execution_id,
            SE.step_name == step_name,
            SE.status == StepStatus.WAITING.value,
            SE.wait_kind == VERSION_WAIT,
        )
        .values(
            status=StepStatus.QUEUED.value,
            previous_status=SE.status,
            wait_kind=SE.wait_key,
            wait_key=None,
            waiting_since=None,
            queued_at=now,
            updated_at=now,
        )
        .returning(SE.attempt)
    ).first()
    if moved is None:
        return False
    _event(
        conn,
        execution_id,
        step_name,
        StepStatus.WAITING.value,
        StepStatus.QUEUED.value,
        moved.attempt,
        f"released to {to}",
    )
    return True


# --- operators: what a deploy would strand, moving an execution -----------------------


@dataclass(frozen=True)
class Stranded:
    """An open execution the current code may not finish, and why."""

    execution_id: str
    workflow: str
    shape: str | None
    status: str
    reason: str


def stranded(
    conn: Connection, shapes: Mapping[tuple[str, int], Shape], workflows: Collection[str]
) -> list[Stranded]:
    """The open executions that code defining ``shapes`` (by workflow and version;
    ``workflows`` names every workflow it has at any version) could not finish."""
    current = {shape.hash for shape in shapes.values()}
    rows = conn.execute(
        select(
            WE.execution_id, WE.workflow_id, WE.workflow_version, WE.shape_hash, WE.status
        ).where(WE.status.in_(OPEN), WE.shape_hash.is_(None) | WE.shape_hash.not_in(current))
    ).all()
    found: list[Stranded] = []
    for row in rows:
        local = shapes.get((row.workflow_id, row.workflow_version))
        if row.shape_hash is None:
            if local is None:  # older than shapes: only the workflow and version tell
                found.append(
                    Stranded(
                        row.execution_id,
                        row.workflow_id,
                        None,
                        row.status,
                        f"this code has no workflow {row.workflow_id!r} "
                        f"version {row.workflow_version}",
                    )
                )
            continue
        reason = judge(conn, row.execution_id, row.shape_hash, local)
        if reason is not None:
            found.append(
                Stranded(row.execution_id, row.workflow_id, row.shape_hash, row.status, reason)
            )
    return sorted(found, key=lambda s: (s.workflow, s.execution_id))


@dataclass(frozen=True)
class Migrated:
    """What moving an execution to a shape did: the steps removed, added and queued
    (to publish after commit), and the route to publish them on."""

    removed: tuple[str, ...]
    added: tuple[str, ...]
    queued: tuple[str, ...]
    route: Route


def migrate(conn: Connection, execution_id: str, workflow: Workflow, actor: str) -> Migrated:
    """Move an open execution to ``workflow``'s shape (the code at hand): steps the new
    shape no longer has and that are not done are removed, steps it adds are created
    waiting for their upstream steps, steps handed back for a compatible worker are
    queued again, and the execution records the new shape. Its done steps keep their
    outputs. Refused (typed) for an execution that is not open or of another workflow.

    Steps that become ready are task steps queued to run; a new step that would be a
    wait, or behind a condition or limits, is refused: migrate when its upstream steps
    are still to run instead."""
    target = shape_of(workflow)
    row = conn.execute(
        select(WE.workflow_id, WE.status, WE.shape_hash, WE.priority)
        .where(WE.execution_id == execution_id)
        .with_for_update()
    ).first()
    if row is None:
        raise ExecutionNotFound(execution_id)
    if row.workflow_id != workflow.name:
        raise InputValidationError(
            f"execution {execution_id} runs workflow {row.workflow_id!r}, not {workflow.name!r}"
        )
    if row.status not in OPEN:
        raise InvalidTransition(
            "execution", row.status, "running", "only an open execution can be migrated"
        )
    steps = {
        s.step_name: s
        for s in conn.execute(
            select(SE.step_name, SE.status, SE.wait_kind).where(SE.execution_id == execution_id)
        )
    }
    done = {name for name, s in steps.items() if s.status in DONE}
    removed = tuple(
        sorted(n for n, s in steps.items() if n not in workflow.steps and n not in done)
    )
    added = tuple(sorted(n for n in workflow.steps if n not in steps))
    ready_new = [n for n in added if all(up in done for up in workflow.upstream(n))]
    for name in ready_new:
        step = workflow.steps[name]
        if step.wait_kind is not None or step.gated:
            raise InputValidationError(
                f"step {name!r} of the new shape would start now as a {step.kind} step "
                "(a wait, a gated step or one behind limits): migrating this execution "
                "cannot start it; migrate it before its upstream steps are done"
            )
    now = utcnow()
    if removed:
        conn.execute(
            delete(StepExecution).where(SE.execution_id == execution_id, SE.step_name.in_(removed))
        )
    if added:
        conn.execute(
            insert(StepExecution),
            [
                {
                    "execution_id": execution_id,
                    "step_name": name,
                    "status": StepStatus.PENDING.value,
                    "attempt": 1,
                    "max_attempts": workflow.steps[name].retry.max_attempts,
                    "unmet_deps": sum(1 for up in workflow.upstream(name) if up not in done),
                    "wait_kind": workflow.steps[name].wait_kind,
                }
                for name in added
            ],
        )
    if ready_new:
        conn.execute(
            update(StepExecution)
            .where(SE.execution_id == execution_id, SE.step_name.in_(ready_new))
            .values(status=StepStatus.QUEUED.value, queued_at=now, updated_at=now)
        )
    # Pending steps the new shape keeps wait for its upstream steps, which may differ.
    for name, step_row in steps.items():
        if name in workflow.steps and step_row.status == StepStatus.PENDING.value:
            unmet = sum(1 for up in workflow.upstream(name) if up not in done)
            conn.execute(
                update(StepExecution)
                .where(
                    SE.execution_id == execution_id,
                    SE.step_name == name,
                    SE.status == StepStatus.PENDING.value,
                )
                .values(unmet_deps=unmet, updated_at=now)
            )
    held = [
        n
        for n, s in steps.items()
        if n in workflow.steps
        and s.status == StepStatus.WAITING.value
        and s.wait_kind == VERSION_WAIT
    ]
    for name in held:
        _release(conn, execution_id, name, f"migration by {actor}")
    record_shapes(conn, [target])
    conn.execute(
        update(WorkflowExecution)
        .where(WE.execution_id == execution_id)
        .values(shape_hash=target.hash, workflow_version=workflow.version, updated_at=now)
    )
    old = (row.shape_hash or "none")[:SHORT]
    _event(
        conn,
        execution_id,
        None,
        row.status,
        row.status,
        None,
        f"migrated by {actor} from shape {old} to {target.short}"
        + (f"; removed {', '.join(removed)}" if removed else "")
        + (f"; added {', '.join(added)}" if added else ""),
    )
    for name in ready_new:
        _event(conn, execution_id, name, None, StepStatus.QUEUED.value, 1, "added by migration")
    route = Route(workflow.name, workflow.version, row.priority, target.hash)
    return Migrated(removed, added, tuple(sorted({*ready_new, *held})), route)


# --- listings (CLI, API, dashboard, metrics) --------------------------------------------


@dataclass(frozen=True)
class ShapeUse:
    """A recorded shape and what uses it now."""

    shape_hash: str
    workflow: str
    version: int
    created_at: datetime
    open_executions: int
    held_steps: int
    live_workers: int


def shape_uses(conn: Connection, live_within: float, workflow: str | None = None) -> list[ShapeUse]:
    """Every recorded shape (of ``workflow``, or all) with its open executions, its steps
    held for a compatible worker and the live workers that run it."""
    open_count = (
        select(func.count())
        .where(WE.shape_hash == WS.shape_hash, WE.status.in_(OPEN))
        .scalar_subquery()
    )
    held = (
        select(func.count())
        .select_from(StepExecution)
        .join(WorkflowExecution, WE.execution_id == SE.execution_id)
        .where(
            WE.shape_hash == WS.shape_hash,
            SE.status == StepStatus.WAITING.value,
            SE.wait_kind == VERSION_WAIT,
        )
        .scalar_subquery()
    )
    live = (
        select(func.count())
        .where(WK.shape_hash == WS.shape_hash, WK.seen_at > utcnow(-live_within))
        .scalar_subquery()
    )
    query = select(
        WS.shape_hash,
        WS.workflow,
        WS.version,
        WS.created_at,
        open_count.label("open"),
        held.label("held"),
        live.label("live"),
    ).order_by(WS.workflow, WS.created_at)
    if workflow is not None:
        query = query.where(WS.workflow == workflow)
    return [
        ShapeUse(r.shape_hash, r.workflow, r.version, r.created_at, r.open, r.held, r.live)
        for r in conn.execute(query)
    ]
