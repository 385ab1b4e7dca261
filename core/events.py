"""What outside callers send to waits: events by (name, key) (``send_event``), a signal
to one execution's event wait (``signal``), an early wake of a sleep (``wake``); and the
expiry of events nobody consumed (the reconciler's).

Each is a unit of work on a ``Connection``; the wait it ends ends through
``core.waits.end_waits``, in the same transaction, and what that set in motion is
published by the caller after the commit (``worker.producer``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from core import statements as sql
from core.errors import (
    ExecutionNotFound,
    FieldError,
    IdempotencyConflict,
    InputValidationError,
    StepNotFound,
    WaitNotOpen,
    WorkflowNotFound,
)
from core.models import encode_json
from core.outcomes import Route, WaitOutcome
from core.sql import utcnow
from core.states import ExecutionStatus, StepStatus
from core.wait_statements import IB, SE, WE, wait_statements
from core.waits import (
    DefinitionOf,
    WaitEnd,
    WaitingExecution,
    end_waits,
    execution_of,
    received_reason,
)

WAITING = StepStatus.WAITING.value


@dataclass(frozen=True)
class EventReceipt:
    """A sent event: its id, the wait that consumed it (``execution/step``) if one did,
    and whether an earlier send with the same idempotency key stored it."""

    event_id: int
    consumed_by: str | None
    duplicate: bool = False


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
    # The wait is found first, so the event is stored consumed by it in one INSERT (and
    # a repeated key, which stores nothing, ends nothing).
    wait = conn.execute(ws.oldest_wait, {"name": name, "key": key}).first()
    taken: dict[str, Any] = {}
    if wait is not None:
        taken = {
            "consumed_at": utcnow(),
            "consumed_by_execution": wait.execution_id,
            "consumed_by_step": wait.step_name,
        }
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
        **taken,
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
    if wait is None:
        return EventReceipt(event_id, None), outcome
    workflow = definition_of(wait.workflow_id, wait.workflow_version)
    if workflow is None:
        raise WorkflowNotFound(wait.workflow_id, wait.workflow_version)
    route = Route(wait.workflow_id, wait.workflow_version, wait.priority)
    execution = WaitingExecution(wait.execution_id, workflow, route, wait)
    end = WaitEnd(
        wait.execution_id,
        wait.step_name,
        wait.attempt,
        StepStatus.SUCCEEDED.value,
        output=payload,
        reason=received_reason("event", name, key, event_id, actor),
        how="event",
    )
    end_waits(conn, [end], {wait.execution_id: execution}, definition_of, outcome)
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
        kind = "task" if row.wait_kind in (None, "key") else row.wait_kind  # key: behind limits
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
    execution = execution_of(conn, execution_id, definition_of)
    if execution is None:
        raise ExecutionNotFound(execution_id)
    end = WaitEnd(
        execution_id,
        step_name,
        row.attempt,
        StepStatus.SUCCEEDED.value,
        output=payload,
        reason=received_reason("signal", "", "", event_id, actor),
        how="signal",
    )
    end_waits(conn, [end], {execution_id: execution}, definition_of, outcome)
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
        kind = "task" if row.wait_kind in (None, "key") else row.wait_kind  # key: behind limits
        raise InputValidationError(
            f"step {step_name!r} is a {kind} step, not a sleep",
            [{"field": "step", "message": f"a {kind} step cannot be woken"}],
        )
    if row.status != WAITING:
        detail = "not sleeping yet" if row.status == StepStatus.PENDING.value else ""
        raise WaitNotOpen(f"step {step_name}", row.status, detail)
    execution = execution_of(conn, execution_id, definition_of)
    if execution is None:
        raise ExecutionNotFound(execution_id)
    now = datetime.now(UTC).isoformat()
    by = f" by {actor}" if actor else ""
    end = WaitEnd(
        execution_id,
        step_name,
        row.attempt,
        StepStatus.SUCCEEDED.value,
        output=now,
        reason=f"woken early{by}",
        how="early",
    )
    end_waits(conn, [end], {execution_id: execution}, definition_of, outcome)
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
