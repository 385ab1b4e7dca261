"""ExecutionStateManager: creating, reading and moving executions on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.enhanced_execution_state_manager import EnhancedExecutionStateManager
from core.errors import (
    ExecutionNotFound,
    IdempotencyConflict,
    InputValidationError,
    InvalidStatus,
    InvalidTransition,
)
from core.execution_state_manager import ExecutionStateManager, SyncExecutionStateManager
from core.executions import StepSpec
from core.models import ExecutionEvent, StepExecution, User, WorkflowExecution
from core.states import ExecutionStatus
from tests.conftest import TestDatabase
from tests.helpers.state import count, events, execution_row, insert_execution, step_row


@pytest.mark.asyncio
async def test_create_execution_as_in_the_guide(database: TestDatabase) -> None:
    execution_id = await ExecutionStateManager().create_execution(
        workflow_id="ingest", input_data={"url": "https://example.com", "pages": [1, 2]}
    )
    row = execution_row(execution_id)
    assert row["workflow_id"] == "ingest"
    assert row["input_data"] == {"url": "https://example.com", "pages": [1, 2]}
    assert row["status"] == "pending"
    assert row["attempt"] == 1
    assert row["created_at"].tzinfo is UTC
    assert events(execution_id) == [(None, None, "pending")]


@pytest.mark.asyncio
async def test_get_and_list_executions(database: TestDatabase) -> None:
    manager = ExecutionStateManager()
    first = await manager.create_execution("a", {"n": 1})
    second = await manager.create_execution("b", {"n": 2})
    await manager.transition_execution(second, "running")

    fetched = await manager.get_execution(first)
    assert (fetched.execution_id, fetched.workflow_id, fetched.input_data) == (first, "a", {"n": 1})
    running = await manager.list_executions(status="running")
    assert [e.execution_id for e in running] == [second]
    assert [e.execution_id for e in await manager.list_executions(workflow_id="a")] == [first]
    with pytest.raises(ExecutionNotFound, match="no workflow execution with id 'nope'"):
        await manager.get_execution("nope")
    with pytest.raises(InvalidStatus, match="'runing' is not a valid execution status"):
        await manager.list_executions(status="runing")


def test_sync_twin_runs_the_same_operations(database: TestDatabase) -> None:
    manager = SyncExecutionStateManager()
    execution_id = manager.create_execution("report", {"month": "2026-11"})
    result = manager.transition_execution(execution_id, "running", reason="worker started")
    assert result.applied
    assert (result.from_status, result.to_status) == ("pending", "running")
    assert manager.get_execution(execution_id).started_at is not None
    assert events(execution_id) == [(None, None, "pending"), (None, "pending", "running")]


def test_idempotency_key_returns_the_existing_execution(database: TestDatabase) -> None:
    manager = SyncExecutionStateManager()
    first = manager.create_or_get_execution("charge", {"cents": 500}, idempotency_key="order-7")
    again = manager.create_or_get_execution("charge", {"cents": 500}, idempotency_key="order-7")
    assert first.created
    assert not again.created
    assert again.execution_id == first.execution_id
    assert count(WorkflowExecution) == 1
    assert count(ExecutionEvent) == 1

    with pytest.raises(IdempotencyConflict, match="order-7"):
        manager.create_execution("charge", {"cents": 900}, idempotency_key="order-7")
    with pytest.raises(IdempotencyConflict, match="order-7"):
        manager.create_execution("refund", {"cents": 500}, idempotency_key="order-7")
    assert count(WorkflowExecution) == 1


def test_transition_applies_once_then_reports_not_applied(database: TestDatabase) -> None:
    manager = SyncExecutionStateManager()
    execution_id = manager.create_execution("w", {})
    assert manager.transition_execution(execution_id, "running").applied
    again = manager.transition_execution(execution_id, "running")
    assert not again.applied
    assert again.current_status == "running"
    # Its step never ran: it can fail (which closes the step), not succeed.
    done = manager.transition_execution(execution_id, "failed", expected="running")
    assert done.applied
    row = execution_row(execution_id)
    assert row["status"] == "failed"
    assert row["previous_status"] == "running"
    assert row["finished_at"] >= row["started_at"]
    assert events(execution_id)[1:] == [
        (None, "pending", "running"),
        (None, "running", "failed"),
        ("only", "pending", "cancelled"),
    ]


def test_explicit_retry_leaves_a_final_status(database: TestDatabase) -> None:
    manager = SyncExecutionStateManager()
    execution_id = manager.create_execution("w", {})
    manager.transition_execution(execution_id, "failed")
    with pytest.raises(InvalidTransition, match="failed -> running is not allowed"):
        manager.transition_execution(execution_id, "running", expected="failed")
    assert not manager.transition_execution(execution_id, "running").applied
    # A retry goes back to pending, to be admitted like a start: never straight to running.
    with pytest.raises(InvalidTransition, match="a retry goes back to pending"):
        manager.transition_execution(execution_id, "running", retry=True)
    retried = manager.transition_execution(execution_id, "pending", retry=True, reason="retry")
    assert retried.applied
    assert retried.attempt == 2
    row = execution_row(execution_id)
    assert (row["status"], row["finished_at"]) == ("pending", None)
    assert step_row(execution_id, "only")["status"] == "pending"


def test_unknown_ids_and_bad_statuses_are_typed_errors(database: TestDatabase) -> None:
    manager = SyncExecutionStateManager()
    with pytest.raises(ExecutionNotFound, match="'missing'"):
        manager.transition_execution("missing", "running")
    with pytest.raises(ExecutionNotFound):
        manager.cancel_execution("missing")
    with pytest.raises(InvalidStatus, match="'done' is not a valid execution status"):
        manager.transition_execution("missing", "done")
    with pytest.raises(InvalidStatus):
        manager.transition_execution("missing", "running", expected=["pending", 3])  # type: ignore[list-item]
    assert count(ExecutionEvent) == 0


def test_bad_input_is_refused_before_anything_is_written(database: TestDatabase) -> None:
    manager = SyncExecutionStateManager()
    with pytest.raises(InputValidationError, match="input_data is not JSON-serializable"):
        manager.create_execution("w", {"when": datetime.now(UTC)})
    with pytest.raises(InputValidationError, match="input_data is not JSON-serializable"):
        manager.create_execution("w", {"x": float("nan")})
    limit = database.settings.max_payload_bytes
    with pytest.raises(InputValidationError, match=f"the limit is {limit}"):
        manager.create_execution("w", {"blob": "x" * limit})
    with pytest.raises(InputValidationError, match="workflow_id must be a non-empty string"):
        manager.create_execution("", {})
    with pytest.raises(InputValidationError, match="deadline_at must be timezone-aware"):
        manager.create_execution("w", {}, deadline_at=datetime(2030, 1, 1))  # noqa: DTZ001
    with pytest.raises(InputValidationError, match="duplicate step names: a"):
        insert_execution("w", {}, steps=[StepSpec("a"), StepSpec("a")])
    assert count(WorkflowExecution) == 0
    assert count(ExecutionEvent) == 0


def test_database_constraint_errors_are_raised_at_once_and_write_nothing(
    database: TestDatabase,
) -> None:
    retries: list[int] = []
    from core.transactions import RetryPolicy

    policy = RetryPolicy(
        attempts=5,
        initial_wait=0,
        max_wait=0,
        on_retry=lambda state: retries.append(state.attempt_number),
    )
    manager = SyncExecutionStateManager(retry_policy=policy)
    with pytest.raises(InputValidationError, match="refers to a row that does not exist"):
        insert_execution(
            "w",
            {},
            manager=manager,
            triggered_by="no-such-user",
            steps=[StepSpec("a"), StepSpec("b", unmet_deps=1)],
        )
    assert retries == []
    assert count(WorkflowExecution) == 0
    assert count(StepExecution) == 0
    assert count(ExecutionEvent) == 0


def test_create_with_steps_deadline_and_trigger(database: TestDatabase) -> None:
    from core.database import get_db_session

    with get_db_session(commit=True) as db:
        user = User(email="ops@example.com")
        db.add(user)
    deadline = datetime.now(UTC) + timedelta(hours=1)
    execution_id = insert_execution(
        "etl",
        {"day": 1},
        triggered_by=user.id,
        priority=5,
        deadline_at=deadline,
        steps=[StepSpec("extract"), StepSpec("load", unmet_deps=1, max_attempts=3)],
    )
    row = execution_row(execution_id)
    assert (row["triggered_by"], row["priority"]) == (user.id, 5)
    assert abs(row["deadline_at"] - deadline) < timedelta(milliseconds=1)
    assert count(StepExecution) == 2


@pytest.mark.asyncio
async def test_cancel_execution_cancels_open_steps_in_one_transaction(
    database: TestDatabase,
) -> None:
    manager = EnhancedExecutionStateManager()
    execution_id = insert_execution(
        "w", {}, steps=[StepSpec("a"), StepSpec("b", unmet_deps=1), StepSpec("c", unmet_deps=1)]
    )
    await manager.transition_execution(execution_id, ExecutionStatus.RUNNING)
    await manager.transition_step(execution_id, "a", "queued")
    await manager.claim_step(execution_id, "a", worker="w1", celery_task_id="t1")
    await manager.complete_step(execution_id, "a", attempt=1, output_data=1, downstream=["b"])

    result = await manager.cancel_execution(execution_id, reason="user asked")
    assert result.applied
    steps = {s.step_name: s.status for s in await manager.get_steps(execution_id)}
    assert steps == {"a": "succeeded", "b": "cancelled", "c": "cancelled"}
    history = await manager.get_history(execution_id)
    cancels = [
        (e.step_name, e.from_status, e.reason) for e in history if e.to_status == "cancelled"
    ]
    assert sorted(cancels, key=str) == sorted(
        [
            (None, "running", "user asked"),
            ("b", "queued", "user asked"),
            ("c", "pending", "user asked"),
        ],
        key=str,
    )
    assert not (await manager.cancel_execution(execution_id)).applied
