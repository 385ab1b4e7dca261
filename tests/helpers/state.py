"""Helpers for state tests: force rows into a status, read rows and events back."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from core.database import get_database, get_db_session
from core.execution_state_manager import SyncExecutionStateManager
from core.executions import create_execution, new_execution
from core.models import DatabaseLiveness, ExecutionEvent, StepExecution, WorkflowExecution
from core.sql import utcnow


def force_execution_status(execution_id: str, status: str) -> None:
    """Put an execution in ``status`` behind the state machine's back (test setup only)."""
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == execution_id)
            .values(status=status)
        )


def force_step_status(execution_id: str, step_name: str, status: str, **values: Any) -> None:
    """Put a step in ``status`` behind the state machine's back (test setup only)."""
    with get_db_session(commit=True) as db:
        db.execute(
            update(StepExecution)
            .where(StepExecution.execution_id == execution_id, StepExecution.step_name == step_name)
            .values(status=status, **values)
        )


def execution_row(execution_id: str) -> dict[str, Any]:
    """The execution's columns, read in a fresh session."""
    with get_db_session() as db:
        row = db.get(WorkflowExecution, execution_id)
        assert row is not None
        return {c.key: getattr(row, c.key) for c in WorkflowExecution.__table__.columns}


def step_row(execution_id: str, step_name: str) -> dict[str, Any]:
    """The step's columns, read in a fresh session."""
    with get_db_session() as db:
        row = db.get(StepExecution, (execution_id, step_name))
        assert row is not None
        return {c.key: getattr(row, c.key) for c in StepExecution.__table__.columns}


def events(execution_id: str) -> list[tuple[str | None, str | None, str]]:
    """(step, from, to) of every event of the execution, oldest first."""
    with get_db_session() as db:
        rows = db.execute(
            select(ExecutionEvent.step_name, ExecutionEvent.from_status, ExecutionEvent.to_status)
            .where(ExecutionEvent.execution_id == execution_id)
            .order_by(ExecutionEvent.id)
        ).all()
        return [(r.step_name, r.from_status, r.to_status) for r in rows]


def count(model: type[Any]) -> int:
    """Rows in ``model``'s table."""
    with get_db_session() as db:
        return int(db.scalar(select(func.count()).select_from(model)) or 0)


def insert_execution(
    workflow_id: str,
    input_data: Any,
    manager: SyncExecutionStateManager | None = None,
    **options: Any,
) -> str:
    """Insert an execution with the step rows given in ``steps`` (StepSpecs), through the
    state layer's create unit but without a registered workflow: for tests of the state
    machine itself, whose DAGs exist only as step rows."""
    database = get_database()
    new = new_execution(
        workflow_id, input_data, max_payload_bytes=database.settings.max_payload_bytes, **options
    )
    runner = manager or SyncExecutionStateManager()
    created = runner.run(create_execution, new)
    return created.execution_id


def database_reachable(conn: Connection, seconds: float) -> None:
    """Record that reconciler passes have seen the database for ``seconds`` without a
    gap, and keep seeing it for the next hour (test setup only): the stall scan judges
    heartbeats older than a stall timeout only on such evidence (``database_liveness``)."""
    row = {"id": 1, "last_seen_at": utcnow(3600), "reachable_since": utcnow(-seconds - 1)}
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(DatabaseLiveness).values(row)
    conn.execute(statement.on_conflict_do_update(index_elements=["id"], set_=row))


def database_reachable_for(seconds: float) -> None:
    """``database_reachable`` in a transaction of its own."""
    with get_database().engine.begin() as conn:
        database_reachable(conn, seconds)
