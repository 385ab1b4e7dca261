"""Recovery without holes: every producer path starts its work, no claimed step is left
running, and a freed concurrency slot is used at once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from core.database import get_async_db_session, get_db_session
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.errors import InputValidationError, WorkflowNotFound
from core.execution_state_manager import ExecutionStateManager
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from tests.conftest import TestDatabase
from tests.e2e.conftest import running_worker, wait_for
from tests.helpers.state import count, step_row
from worker.app import ConveyorCelery
from worker.heartbeat import Heartbeat
from worker.producer import enqueue

# Well under CONVEYOR_START_AFTER (30 s): "promptly" means the start was dispatched,
# not found later by the reconciler.
PROMPTLY = 10.0


@pytest.mark.asyncio
async def test_the_seed_guides_create_execution_runs_the_workflow(
    worker: ConveyorCelery,
) -> None:
    execution_id = await ExecutionStateManager().create_execution(
        workflow_id="linear", input_data={"start": 4}
    )

    execution = await asyncio.to_thread(wait_for, execution_id, None, PROMPTLY)
    assert execution.status == "succeeded"
    assert execution.output_data == {"describe": {"result": 9, "attempt": 1}}
    names = {s.step_name for s in SyncEnhancedExecutionStateManager().get_steps(execution_id)}
    assert names == {"double", "add_one", "describe"}


@pytest.mark.asyncio
async def test_the_seed_guides_create_execution_refuses_what_cannot_run(
    database: TestDatabase, conveyor_app: ConveyorCelery
) -> None:
    manager = ExecutionStateManager()
    with pytest.raises(WorkflowNotFound, match="no workflow 'no_such_workflow'"):
        await manager.create_execution(workflow_id="no_such_workflow", input_data={"a": 1})
    with pytest.raises(InputValidationError, match="start: Input should be a valid integer"):
        await manager.create_execution(workflow_id="linear", input_data={"start": "four"})
    assert count(WorkflowExecution) == 0
    assert count(StepExecution) == 0
    assert count(ExecutionEvent) == 0


@pytest.mark.asyncio
async def test_an_execution_added_through_the_orm_as_in_pattern_1_runs(
    worker: ConveyorCelery,
) -> None:
    async with get_async_db_session() as db:
        execution = WorkflowExecution(
            workflow_id="linear", input_data={"start": 1}, status="pending"
        )
        db.add(execution)
        await db.commit()
        await db.refresh(execution)
        execution_id = execution.execution_id

    finished = await asyncio.to_thread(wait_for, execution_id, None, PROMPTLY)
    assert finished.status == "succeeded"
    assert finished.output_data == {"describe": {"result": 3, "attempt": 1}}


@pytest.mark.asyncio
async def test_the_orm_refuses_an_execution_of_an_unknown_workflow(
    database: TestDatabase, conveyor_app: ConveyorCelery
) -> None:
    async def add_unknown() -> None:
        async with get_async_db_session() as db:
            db.add(WorkflowExecution(workflow_id="nope", input_data={}, status="pending"))
            await db.commit()

    with pytest.raises(WorkflowNotFound, match="no workflow 'nope'"):
        await add_unknown()
    assert count(WorkflowExecution) == 0


def test_the_heartbeat_refreshes_only_the_steps_it_holds(
    database: TestDatabase, conveyor_app: ConveyorCelery
) -> None:
    manager = SyncEnhancedExecutionStateManager()
    heartbeats = Heartbeat(manager, interval=3600)
    first = enqueue("linear", {"start": 1}, app=conveyor_app)
    second = enqueue("linear", {"start": 2}, app=conveyor_app)
    conveyor_app.engine.admit("linear", [first, second])
    for execution_id in (first, second):
        claimed = manager.claim_step(
            execution_id, "double", worker=heartbeats.worker_id, celery_task_id=None
        )
        assert claimed.applied
    old = datetime.now(UTC) - timedelta(hours=1)
    with get_db_session(commit=True) as db:
        db.execute(update(StepExecution).values(heartbeat_at=old))

    with heartbeats.beating((first, "double")):
        assert heartbeats.beat() == 1
    heartbeats.stop()

    assert step_row(first, "double")["heartbeat_at"] > old
    # Claimed by this process but not held: an orphan, which must go stale.
    assert step_row(second, "double")["heartbeat_at"] == old


def test_an_error_after_the_claim_records_the_step_at_once(conveyor_app: ConveyorCelery) -> None:
    execution_id = enqueue("linear", {"start": 1}, app=conveyor_app)
    # The stored input no longer fits the model (a model changed under stored rows):
    # reading it fails after the step was claimed, outside the step's own code.
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == execution_id)
            .values(input_data={"start": "one"})
        )
    with running_worker(conveyor_app):
        execution = wait_for(execution_id, timeout=PROMPTLY)
    assert execution.status == "failed"
    step = step_row(execution_id, "double")
    assert step["status"] == "failed"
    assert step["error"]["type"] == "InputValidationError"
    assert "no longer fits its input model" in step["error"]["message"]


def _gate_running(execution_id: str) -> bool:
    return step_row(execution_id, "hold")["status"] == "running"


@pytest.mark.asyncio
async def test_cancelling_through_core_frees_the_concurrency_slot_at_once(
    worker: ConveyorCelery,
) -> None:
    holder = enqueue("gate", app=worker)
    waiting = enqueue("gate", app=worker)
    await asyncio.to_thread(wait_for, holder, lambda _: _gate_running(holder), PROMPTLY)
    assert SyncEnhancedExecutionStateManager().get_execution(waiting).status == "pending"

    result = await ExecutionStateManager().cancel_execution(holder)

    assert result.applied
    await asyncio.to_thread(wait_for, waiting, lambda _: _gate_running(waiting), PROMPTLY)
    worker.engine.cancel(waiting)


def test_a_timed_out_execution_frees_the_concurrency_slot_at_once(
    worker: ConveyorCelery,
) -> None:
    holder = enqueue("gate", deadline=timedelta(seconds=1), app=worker)
    waiting = enqueue("gate", app=worker)
    wait_for(holder, lambda _: _gate_running(holder), PROMPTLY)

    deadline_passed = wait_for(
        holder, lambda e: e.deadline_at is not None and datetime.now(UTC) > e.deadline_at
    )
    assert deadline_passed.status == "running"
    report = worker.engine.reconcile()

    assert report.timed_out == [holder]
    assert report.freed == ["gate"]
    wait_for(waiting, lambda _: _gate_running(waiting), PROMPTLY)
    worker.engine.cancel(waiting)
