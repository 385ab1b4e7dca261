"""The reconciler recovers lost and stalled work, publishes due retries and enforces
deadlines; overlapping passes never do the same work twice."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import redis

from core import reconciler
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.executions import StepSpec
from tests.e2e import workflows
from tests.e2e.conftest import running_worker, wait_for
from tests.helpers.state import (
    database_reachable_for,
    events,
    force_step_status,
    insert_execution,
    step_row,
)
from worker.app import ConveyorCelery
from worker.logs import current_step
from worker.producer import enqueue


def _reconcile_until(app: ConveyorCelery, done: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the reconciler never got there"
        app.engine.reconcile()
        time.sleep(0.2)


def test_a_lost_queue_is_republished(conveyor_app: ConveyorCelery, redis_url: str) -> None:
    execution_id = enqueue("linear", {"start": 4}, app=conveyor_app)
    conveyor_app.engine.admit("linear", [execution_id])
    client = redis.Redis.from_url(redis_url)
    client.flushdb()  # the broker loses every message
    client.close()
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"republish_after": 0.001})
    report = engine.reconcile()
    assert report.republish == [(execution_id, "double")]
    with running_worker(conveyor_app):
        assert wait_for(execution_id).status == "succeeded"
    assert ("double", "queued", "queued") in events(execution_id)
    assert workflows.CALLS[(execution_id, "double")] == 1


def test_long_retry_delays_are_published_by_the_reconciler(conveyor_app: ConveyorCelery) -> None:
    engine = conveyor_app.engine
    # No countdown messages at all: every retry waits for a reconciler pass.
    engine.settings = engine.settings.model_copy(update={"retry_countdown_max": 0.0})
    execution_id = enqueue("flaky", app=conveyor_app)
    with running_worker(conveyor_app):
        _reconcile_until(
            conveyor_app, lambda: wait_for(execution_id, lambda e: True).status == "succeeded"
        )
    assert workflows.FLAKY_CALLS[execution_id] == 3
    assert events(execution_id).count(("sometimes", "queued", "queued")) == 2


def test_deadline_times_out_the_execution_and_cancels_its_steps(
    conveyor_app: ConveyorCelery,
) -> None:
    workflows.SLOW_STARTED.clear()
    with running_worker(conveyor_app):
        execution_id = enqueue("slow", deadline=timedelta(seconds=1), app=conveyor_app)
        assert workflows.SLOW_STARTED.wait(timeout=20)
        _reconcile_until(
            conveyor_app, lambda: wait_for(execution_id, lambda e: True).status == "timed_out"
        )
        # The running step saw it through is_cancelled() and stopped.
        wait_for(
            execution_id,
            lambda _: step_row(execution_id, "wait_for_cancel")["output_data"] is not None,
        )
    assert step_row(execution_id, "wait_for_cancel")["status"] == "cancelled"
    assert step_row(execution_id, "after")["status"] == "cancelled"
    assert (None, "running", "timed_out") in events(execution_id)


def test_overlapping_passes_recover_each_stalled_step_once(
    conveyor_app: ConveyorCelery,
) -> None:
    database_reachable_for(conveyor_app.engine.settings.stall_timeout)
    manager = SyncEnhancedExecutionStateManager()
    names = [f"s{i}" for i in range(20)]
    execution_id = insert_execution(
        "linear", {"start": 1}, steps=[StepSpec(n, max_attempts=2) for n in names]
    )
    manager.transition_execution(execution_id, "running")
    manager.transition_steps(execution_id, names, "queued")
    old = datetime.now(UTC) - timedelta(hours=1)
    for name in names:
        manager.claim_step(execution_id, name, worker="dead", celery_task_id=None)
        force_step_status(execution_id, name, "running", heartbeat_at=old)
    barrier = threading.Barrier(4)

    def one_pass(_: int) -> int:
        barrier.wait(timeout=30)
        return len(conveyor_app.engine.reconcile().requeued)

    with ThreadPoolExecutor(4) as pool:
        requeued = list(pool.map(one_pass, range(4)))
    assert sum(requeued) == len(names)
    history = events(execution_id)
    assert all(history.count((n, "running", "queued")) == 1 for n in names)
    assert all(step_row(execution_id, n)["attempt"] == 2 for n in names)


def crashed_out_step(app: ConveyorCelery, worker: str) -> str:
    """An execution of linear whose step ``double`` ran on ``worker``, which stopped beating
    an hour ago after the step had used up its crash recoveries: its id."""
    settings = app.engine.settings
    database_reachable_for(settings.stall_timeout)
    execution_id = enqueue("linear", {"start": 1}, app=app)
    app.engine.admit("linear", [execution_id])
    manager = SyncEnhancedExecutionStateManager()
    assert manager.claim_step(execution_id, "double", worker=worker, celery_task_id=None)
    old = datetime.now(UTC) - timedelta(hours=1)
    spent = settings.max_crash_recoveries
    force_step_status(execution_id, "double", "running", heartbeat_at=old, recoveries=spent)
    return execution_id


def test_a_step_failed_for_crashing_too_often_logs_one_warning_naming_it(
    conveyor_app: ConveyorCelery, caplog: pytest.LogCaptureFixture
) -> None:
    engine = conveyor_app.engine
    execution_id = crashed_out_step(conveyor_app, worker="gone:8")
    seen: list[tuple[str, str] | None] = []

    class Step(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            current = current_step()
            seen.append((current.execution_id, current.step) if current else None)
            return True

    engine_log = logging.getLogger("worker.engine")
    step_filter = Step()
    engine_log.addFilter(step_filter)
    try:
        with caplog.at_level(logging.WARNING, logger="worker.engine"):
            report = engine.reconcile()
    finally:
        engine_log.removeFilter(step_filter)
    assert report.stalled_failed == [(execution_id, "double")]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert message.startswith(
        f"step double of execution {execution_id} (workflow linear) failed on attempt 1: "
        "StepCrashed: step double was lost with its worker gone:8"
    )
    # The record is about that step (its fields come from the step's log context).
    assert seen == [(execution_id, "double")]


def test_a_step_crashed_too_often_fails_its_execution_in_the_recovering_transaction(
    conveyor_app: ConveyorCelery,
) -> None:
    engine = conveyor_app.engine
    settings = engine.settings
    execution_id = crashed_out_step(conveyor_app, worker="gone:7")
    manager = SyncEnhancedExecutionStateManager()
    spent = settings.max_crash_recoveries

    # The reconciler's scan alone, one transaction: failing the step, skipping what
    # depends on it and finishing the execution commit together (no follow-up that a
    # crash could lose).
    report = manager.run(
        reconciler.reconcile_pass,
        stall_timeout=settings.stall_timeout,
        republish_after=settings.republish_after,
        start_after=settings.start_after,
        limit=settings.reconcile_batch,
        max_recoveries=spent,
        dag_of=engine.definition,
    )
    assert report.stalled_failed == [(execution_id, "double")]
    assert report.finished == [execution_id]
    assert report.freed == ["linear"]
    execution = manager.get_execution(execution_id)
    assert execution.status == "failed"
    assert execution.error["type"] == "StepCrashed"
    assert execution.error["step"] == "double"
    assert "gone:7" in execution.error["message"]
    assert step_row(execution_id, "add_one")["status"] == "skipped"
    assert step_row(execution_id, "describe")["status"] == "skipped"
