"""Helpers for state tests: force rows into a status, read rows and events back."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select, update

from core.database import get_database, get_db_session
from core.execution_state_manager import SyncExecutionStateManager
from core.executions import create_execution, new_execution
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from core.sql import database_started, utcnow


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


def wait_until_database_up_for(seconds: float, timeout: float = 120.0) -> None:
    """Wait until the database server has been up ``seconds``: no step is judged stalled
    within a stall timeout of its start (``core.sql.database_started``), and the test
    servers start with the session."""
    deadline = time.monotonic() + timeout
    with get_database().engine.connect() as connection:
        while True:
            # The comparison the stalled-step scan makes.
            up = connection.execute(select(database_started() < utcnow(-seconds))).scalar_one()
            if up:
                return
            assert time.monotonic() < deadline, f"the database was not up {seconds}s in time"
            time.sleep(0.2)
