"""Debounce: enqueues with one key collapse into one pending execution (``Debounce``).

A debounced execution is a pending row whose ``debounce_key`` is set: its window is
open. The database keeps one open window per (workflow, scope, key)
(``uq_workflow_executions_debounce``), and an enqueue is one upsert on it::

    INSERT INTO workflow_executions (..., debounce_key, start_at, latest_start_at)
    VALUES (..., :key, now() + :period, now() + :max_wait)
    ON CONFLICT (workflow_id, idempotency_scope, debounce_key)
          WHERE status = 'pending' AND debounce_key IS NOT NULL
    DO UPDATE SET input_data = EXCLUDED.input_data, ...,
                  start_at = least(latest_start_at, EXCLUDED.start_at)
    RETURNING execution_id

so an enqueue either opens a window (a new execution, whose steps it inserts) or
replaces the open window's input and pushes its start to ``period`` from now, never
past ``latest_start_at`` (the first enqueue's time + ``max_wait``). It publishes no
start: the waker closes each window that is due (``release_due``: ``debounce_key``
set to NULL, by a compare-and-set on the same row) and sends its start, which admits
it as any other pending execution. The upsert and the close take the same row lock,
so exactly one wins: an enqueue after the close finds no open window (the row left
the partial index) and opens a new one; one before it is in the input the execution
runs with. Windows are never closed by admission: a start message or a freed
concurrency slot passes over a pending execution whose window is open
(``statements.due_starts``, ``statements.next_pending``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Float,
    Insert,
    Select,
    String,
    Table,
    Update,
    bindparam,
    case,
    func,
    select,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import postgresql, sqlite

from core.models import DEBOUNCE_OPEN, ExecutionEvent, WorkflowExecution
from core.sql import utcnow
from core.statements import insert_rows
from core.states import ExecutionStatus
from core.transitions import event_dict

WE = WorkflowExecution
# The reason of the event a closed window writes (pending -> pending: no status moves).
WINDOW_CLOSED = "debounce window closed: starting"


@dataclass(frozen=True)
class Window:
    """What an enqueue of a debounced workflow collapses on: its key, and the period and
    max_wait of its workflow's ``Debounce`` in seconds (``max_wait`` None: none)."""

    key: str
    period: float
    max_wait: float | None


@dataclass(frozen=True)
class Released:
    """Windows the waker closed: their starts (execution id, workflow, priority), to
    publish after commit, and when the next open window is due (None: none is open)."""

    starts: list[tuple[str, str, int]] = field(default_factory=list)
    next_due: datetime | None = None


@cache
def _upsert(dialect: str) -> Insert:
    """The enqueue's statement on ``dialect``, built once (see the module's docstring)."""
    table = cast(Table, WE.__table__)
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(table).values(
        execution_id=bindparam("eid"),
        workflow_id=bindparam("wf"),
        workflow_version=bindparam("ver"),
        input_data=bindparam("input", type_=table.c.input_data.type),
        status=ExecutionStatus.PENDING.value,
        idempotency_scope=bindparam("scope"),
        triggered_by=bindparam("by"),
        priority=bindparam("prio"),
        deadline_at=bindparam("deadline", type_=table.c.deadline_at.type),
        debounce_key=bindparam("key"),
        limit_key=bindparam("limit", type_=String()),
        shape_hash=bindparam("shape"),
        start_at=utcnow(bindparam("period", type_=Float())),
        # NULL without a max_wait: now() + NULL is NULL on both backends.
        latest_start_at=utcnow(bindparam("max_wait", type_=Float())),
    )
    excluded = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=[table.c.workflow_id, table.c.idempotency_scope, table.c.debounce_key],
        index_where=sql_text(DEBOUNCE_OPEN),
        set_={
            # The last enqueue's, all but the id (and the workflow version, whose steps
            # the row already has).
            "input_data": excluded.input_data,
            # The key it takes turns under is the last input's, as the input is.
            "limit_key": excluded.limit_key,
            "priority": excluded.priority,
            "deadline_at": excluded.deadline_at,
            "triggered_by": excluded.triggered_by,
            # least() that keeps a NULL latest_start_at (no max_wait) out of the way.
            "start_at": case(
                (table.c.latest_start_at < excluded.start_at, table.c.latest_start_at),
                else_=excluded.start_at,
            ),
            "updated_at": utcnow(),
        },
    ).returning(table.c.execution_id)


def enqueue_debounced(
    conn: Connection, row: Mapping[str, Any], window: Window, limit_key: str | None = None
) -> str:
    """Open a window with ``row`` (an execution row as ``create_executions`` builds it)
    or collapse into the open one of its key: the id of the execution that holds the
    enqueue now. ``row``'s own id when this inserted it (its steps are the caller's to
    insert); another when an open window took its input, and its ``limit_key`` (the key
    of the workflow's limits it takes turns under, from that input)."""
    params = {
        "eid": row["execution_id"],
        "wf": row["workflow_id"],
        "ver": row["workflow_version"],
        "input": row["input_data"],
        "scope": row["idempotency_scope"],
        "by": row["triggered_by"],
        "prio": row["priority"],
        "deadline": row["deadline_at"],
        "shape": row["shape_hash"],
        "key": window.key,
        "limit": limit_key,
        "period": window.period,
        "max_wait": window.max_wait,
    }
    return str(conn.execute(_upsert(conn.dialect.name), params).scalar_one())


@cache
def _release() -> Update:
    """Close up to ``:limit`` open windows whose start is due, oldest due first
    (``FOR UPDATE SKIP LOCKED`` on PostgreSQL: overlapping wakers take disjoint rows,
    and a window an enqueue holds is left for the next tick)."""
    table = cast(Table, WE.__table__)
    open_window = sql_text(DEBOUNCE_OPEN)
    due = (
        select(table.c.execution_id)
        .where(open_window, table.c.start_at <= utcnow())
        .order_by(table.c.start_at)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)
    )
    return (
        # Guarded again: a row the scan saw may have been collapsed into (a later start)
        # or cancelled before this update took its lock.
        update(table)
        .where(table.c.execution_id.in_(due.scalar_subquery()))
        .where(open_window, table.c.start_at <= utcnow())
        .values(debounce_key=None, updated_at=utcnow())
        .returning(table.c.execution_id, table.c.workflow_id, table.c.priority, table.c.attempt)
    )


@cache
def _next_due() -> Select[datetime | None]:
    """When the earliest open window is due (the index's first entry)."""
    return select(func.min(WE.start_at)).where(sql_text(DEBOUNCE_OPEN))


def release_due(conn: Connection, limit: int) -> Released:
    """Close the open windows due now (at most ``limit``) and write each an event; their
    starts are the caller's to publish after commit. With none due, one probe of
    ix_workflow_executions_debounce_due, nothing written."""
    rows = conn.execute(_release(), {"limit": limit}).all()
    if rows:
        events = [
            event_dict(
                r.execution_id,
                None,
                ExecutionStatus.PENDING.value,
                ExecutionStatus.PENDING.value,
                r.attempt,
                WINDOW_CLOSED,
            )
            for r in rows
        ]
        conn.execute(insert_rows(ExecutionEvent), events)
    next_due = conn.execute(_next_due()).scalar()
    return Released([(r.execution_id, r.workflow_id, r.priority) for r in rows], next_due)
