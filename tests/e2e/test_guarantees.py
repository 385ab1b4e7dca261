"""What users rely on: duplicates run once, retries, failures, cancel, retry, limits."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from core.database import get_db_session
from core.errors import InputValidationError, WorkflowNotFound
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from tests.e2e import workflows
from tests.e2e.conftest import running_worker, wait_for
from tests.helpers.state import count, events, insert_execution, step_row
from worker.app import ConveyorCelery
from worker.producer import enqueue, enqueue_many


def test_a_step_delivered_five_times_runs_and_advances_once(
    conveyor_app: ConveyorCelery,
) -> None:
    execution_id = enqueue("linear", {"start": 1}, app=conveyor_app)
    # Admit before any worker runs, so the root step's message waits in Redis; then
    # publish four more copies of it, as redeliveries and republishes would.
    conveyor_app.engine.admit("linear", [execution_id])
    conveyor_app.engine.publish_steps([(execution_id, "double")] * 4)
    with running_worker(conveyor_app):
        execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert workflows.CALLS[(execution_id, "double")] == 1
    assert workflows.CALLS[(execution_id, "add_one")] == 1
    history = events(execution_id)
    assert history.count(("double", "running", "succeeded")) == 1
    assert history.count(("add_one", "pending", "queued")) == 1
    assert history.count((None, "running", "succeeded")) == 1


def test_transient_errors_are_retried_with_backoff_until_success(worker: ConveyorCelery) -> None:
    execution_id = enqueue("flaky", app=worker)
    execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert execution.output_data == {"sometimes": "ok on attempt 3"}
    assert workflows.FLAKY_CALLS[execution_id] == 3
    row = step_row(execution_id, "sometimes")
    assert row["attempt"] == 3
    assert events(execution_id).count(("sometimes", "running", "queued")) == 2


def test_failure_skips_downstream_and_fails_the_execution(worker: ConveyorCelery) -> None:
    execution_id = enqueue("broken", app=worker)
    execution = wait_for(execution_id)
    assert execution.status == "failed"
    # retry_on=(KeyError,) does not match ValueError: one attempt only.
    failed = step_row(execution_id, "explode")
    assert (failed["status"], failed["attempt"]) == ("failed", 1)
    assert failed["error"]["type"] == "ValueError"
    assert failed["error"]["message"] == "the data is bad"
    assert "raise ValueError" in failed["error"]["traceback"]
    assert step_row(execution_id, "never")["status"] == "skipped"
    assert step_row(execution_id, "fine")["status"] == "succeeded"
    assert execution.error["step"] == "explode"
    assert execution.error["type"] == "ValueError"


def test_cancel_mid_run_stops_the_dag(worker: ConveyorCelery) -> None:
    workflows.SLOW_STARTED.clear()
    execution_id = enqueue("slow", app=worker)
    assert workflows.SLOW_STARTED.wait(timeout=20)
    assert worker.engine.cancel(execution_id)
    execution = wait_for(execution_id)
    assert execution.status == "cancelled"
    # The running step saw the cancellation and returned: its late result is kept,
    # but it advanced nothing.
    deadline_row = wait_for(
        execution_id,
        lambda _: step_row(execution_id, "wait_for_cancel")["output_data"] is not None,
    )
    assert deadline_row.status == "cancelled"
    assert step_row(execution_id, "wait_for_cancel")["status"] == "cancelled"
    assert step_row(execution_id, "wait_for_cancel")["output_data"] == "saw cancellation"
    assert step_row(execution_id, "after")["status"] == "cancelled"
    assert not worker.engine.cancel(execution_id)


def test_retry_from_failure_keeps_succeeded_outputs(worker: ConveyorCelery) -> None:
    workflows.BROKEN.add("retry-me")
    execution_id = enqueue("recovering", {"token": "retry-me"}, app=worker)
    first = wait_for(execution_id)
    assert first.status == "failed"
    assert first.error["message"] == "the downstream service is down"
    workflows.BROKEN.discard("retry-me")

    assert worker.engine.retry(execution_id)
    second = wait_for(execution_id)
    assert second.status == "succeeded"
    assert second.attempt == 2
    assert second.error is None
    assert second.output_data == {"conclude": "prepared+risky+done"}
    assert workflows.CALLS[(execution_id, "prepare")] == 1
    assert workflows.CALLS[(execution_id, "risky")] == 2
    assert step_row(execution_id, "risky")["attempt"] == 2
    assert not worker.engine.retry(execution_id)


def test_idempotency_key_enqueues_once(worker: ConveyorCelery) -> None:
    first = enqueue("linear", {"start": 5}, idempotency_key="invoice-42", app=worker)
    second = enqueue("linear", {"start": 5}, idempotency_key="invoice-42", app=worker)
    assert first == second
    wait_for(first)
    assert count(WorkflowExecution) == 1
    assert workflows.CALLS[(first, "double")] == 1


def test_concurrency_limit_holds_under_load(conveyor_app: ConveyorCelery) -> None:
    workflows.OVERLAP.update(now=0, max=0)
    ids = enqueue_many("limited", [None] * 8, app=conveyor_app)
    with running_worker(conveyor_app, concurrency=6):
        for execution_id in ids:
            assert wait_for(execution_id).status == "succeeded"
    assert workflows.OVERLAP["max"] == 2
    with get_db_session() as db:
        admitted = db.execute(
            select(func.count())
            .select_from(ExecutionEvent)
            .where(ExecutionEvent.reason == "admitted")
        ).scalar_one()
    assert admitted == 8


def test_waiting_executions_start_by_priority_then_fifo(conveyor_app: ConveyorCelery) -> None:
    workflows.STARTED.clear()
    low_1 = enqueue("serial", priority=0, app=conveyor_app)
    low_2 = enqueue("serial", priority=0, app=conveyor_app)
    mid = enqueue("serial", priority=5, app=conveyor_app)
    high = enqueue("serial", priority=9, app=conveyor_app)
    with running_worker(conveyor_app, concurrency=2):
        for execution_id in (low_1, low_2, mid, high):
            wait_for(execution_id)
    assert [high, mid, low_1, low_2] == workflows.STARTED


def test_broker_delivers_higher_priority_first(conveyor_app: ConveyorCelery) -> None:
    workflows.ORDER.clear()
    low = enqueue_many("ordered", [None] * 3, priority=1, app=conveyor_app)
    high = enqueue_many("ordered", [None] * 3, priority=8, app=conveyor_app)
    with running_worker(conveyor_app, concurrency=1):
        for execution_id in low + high:
            wait_for(execution_id)
    assert set(workflows.ORDER[:3]) == set(high)
    assert set(workflows.ORDER[3:]) == set(low)


def test_bad_input_is_refused_and_writes_nothing(conveyor_app: ConveyorCelery) -> None:
    with pytest.raises(WorkflowNotFound, match="no workflow 'nope'; registered: "):
        enqueue("nope", {}, app=conveyor_app)
    with pytest.raises(InputValidationError) as invalid:
        enqueue("linear", {"start": "ten", "times": -1.5}, app=conveyor_app)
    assert "start: Input should be a valid integer" in str(invalid.value)
    assert "times: Input should be a valid integer" in str(invalid.value)
    with pytest.raises(InputValidationError, match="priority must be 0-9"):
        enqueue("linear", {"start": 1}, priority=12, app=conveyor_app)
    with pytest.raises(InputValidationError, match="start: Field required"):
        enqueue_many("linear", [{"start": 1}, {}], app=conveyor_app)
    small = conveyor_app.engine.settings.model_copy(update={"max_payload_bytes": 64})
    conveyor_app.engine.settings = small
    with pytest.raises(InputValidationError, match="the limit is 64"):
        enqueue("fan", {"padding": "x" * 100}, app=conveyor_app)
    assert count(WorkflowExecution) == 0
    assert count(StepExecution) == 0


def test_committed_execution_survives_a_failed_publish(
    conveyor_app: ConveyorCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broker_down(*_: object, **__: object) -> None:
        raise ConnectionError("broker unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(conveyor_app.engine, "publish_starts", broker_down)
        execution_id = enqueue("linear", {"start": 2}, app=conveyor_app)
    assert wait_for(execution_id, lambda e: True).status == "pending"
    # The reconciler finds it (here: any pending execution counts as stale) and sends its
    # start message again.
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"start_after": 0.001})
    with running_worker(conveyor_app):
        report = engine.reconcile()
        assert report.start == [(execution_id, "linear", 0)]
        assert wait_for(execution_id).status == "succeeded"


def test_a_workflow_this_worker_does_not_know_fails_with_a_clear_error(
    worker: ConveyorCelery,
) -> None:
    from core.executions import StepSpec

    execution_id = insert_execution(
        "retired_workflow", {}, steps=[StepSpec("a"), StepSpec("b", unmet_deps=1)]
    )
    worker.engine.admit("retired_workflow", [execution_id])
    execution = wait_for(execution_id)
    assert execution.status == "failed"
    assert execution.error["type"] == "WorkflowNotFound"
    assert "no workflow 'retired_workflow'" in execution.error["message"]
    assert step_row(execution_id, "b")["status"] == "skipped"


def test_a_batch_waiting_on_a_limit_starts_in_the_order_it_was_given(
    conveyor_app: ConveyorCelery,
) -> None:
    workflows.STARTED.clear()
    # One INSERT: every row has the same created_at; the ids must carry the order.
    ids = enqueue_many("serial", [None] * 8, app=conveyor_app)
    with running_worker(conveyor_app, concurrency=2):
        for execution_id in ids:
            wait_for(execution_id)
    assert ids == workflows.STARTED
