"""Step-level state: claiming, fan-in without races, bulk heartbeats, stall recovery."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import event

from core.enhanced_execution_state_manager import (
    EnhancedExecutionStateManager,
    SyncEnhancedExecutionStateManager,
)
from core.errors import InputValidationError, StepNotFound
from core.executions import StepSpec
from core.outcomes import StepCompletion
from tests.conftest import TestDatabase
from tests.helpers.state import (
    database_reachable_for,
    events,
    execution_row,
    force_step_status,
    insert_execution,
    step_row,
)

DIAMOND = [
    StepSpec("a"),
    StepSpec("b", unmet_deps=1),
    StepSpec("c", unmet_deps=1),
    StepSpec("d", unmet_deps=2),
]


def _start(manager: SyncEnhancedExecutionStateManager, steps: list[StepSpec]) -> str:
    execution_id = insert_execution("w", {}, steps=steps)
    manager.transition_execution(execution_id, "running")
    roots = [s.name for s in steps if s.unmet_deps == 0]
    manager.transition_steps(execution_id, roots, "queued")
    return execution_id


def _run(
    manager: SyncEnhancedExecutionStateManager,
    execution_id: str,
    step: str,
    downstream: list[str],
    output: Any = None,
) -> StepCompletion:
    claim = manager.claim_step(execution_id, step, worker="w1", celery_task_id=f"task-{step}")
    assert claim.applied, claim
    return manager.complete_step(
        execution_id, step, attempt=1, output_data=output, downstream=downstream
    )


def test_diamond_runs_to_success_in_order(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    execution_id = _start(manager, DIAMOND)
    assert _run(manager, execution_id, "a", ["b", "c"], {"rows": 3}).queued == ("b", "c")
    assert _run(manager, execution_id, "b", ["d"]).queued == ()
    last = _run(manager, execution_id, "c", ["d"])
    assert last.queued == ("d",)
    assert last.execution is None
    final = _run(manager, execution_id, "d", [])
    assert final.execution is not None
    assert final.execution.to_status == "succeeded"
    assert step_row(execution_id, "a")["output_data"] == {"rows": 3}
    assert execution_row(execution_id)["status"] == "succeeded"


def test_join_is_queued_exactly_once_when_branches_finish_together(
    database: TestDatabase,
) -> None:
    manager = SyncEnhancedExecutionStateManager()
    for _ in range(25):
        execution_id = _start(manager, DIAMOND)
        _run(manager, execution_id, "a", ["b", "c"])
        for name in ("b", "c"):
            manager.claim_step(execution_id, name, worker="w", celery_task_id=None)
        barrier = threading.Barrier(2)

        def finish(name: str, eid: str = execution_id, gate: Any = barrier) -> StepCompletion:
            gate.wait(timeout=30)
            return manager.complete_step(eid, name, attempt=1, output_data=name, downstream=["d"])

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(finish, ["b", "c"]))
        assert sorted(r.queued for r in results) == [(), ("d",)]
        assert step_row(execution_id, "d")["unmet_deps"] == 0
        assert [e for e in events(execution_id) if e[0] == "d"] == [("d", "pending", "queued")]


def test_duplicate_and_stale_completions_change_nothing(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    execution_id = _start(manager, DIAMOND)
    assert not manager.claim_step(execution_id, "b", worker="w", celery_task_id=None).applied
    first = _run(manager, execution_id, "a", ["b", "c"], output="first")
    duplicate = manager.complete_step(
        execution_id, "a", attempt=1, output_data="again", downstream=["b", "c"]
    )
    assert first.transition.applied
    assert not duplicate.transition.applied
    assert duplicate.transition.current_status == "succeeded"
    assert duplicate.queued == ()
    assert step_row(execution_id, "a")["output_data"] == "first"
    assert step_row(execution_id, "b")["unmet_deps"] == 0

    # A completion from an attempt that has since been recovered and re-run.
    manager.claim_step(execution_id, "b", worker="w", celery_task_id=None)
    force_step_status(execution_id, "b", "running", attempt=2)
    stale = manager.complete_step(
        execution_id, "b", attempt=1, output_data="late", downstream=["d"]
    )
    assert not stale.transition.applied
    assert step_row(execution_id, "b")["status"] == "running"
    assert step_row(execution_id, "d")["unmet_deps"] == 2


def test_failed_step_fails_the_execution_when_all_are_final(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    execution_id = _start(manager, [StepSpec("a"), StepSpec("b", unmet_deps=1)])
    manager.claim_step(execution_id, "a", worker="w", celery_task_id=None)
    error = {"type": "ValueError", "message": "bad row"}
    assert manager.transition_step(execution_id, "a", "failed", error=error).applied
    manager.transition_steps(execution_id, ["b"], "skipped", reason="upstream failed")
    from core import executions

    done = manager.run(executions.finish_if_done, execution_id)
    assert done is not None
    assert done.to_status == "failed"
    assert step_row(execution_id, "a")["error"] == error


def test_a_success_holds_its_sinks_outputs_and_a_failure_its_earliest_error(
    database: TestDatabase,
) -> None:
    manager = SyncEnhancedExecutionStateManager()
    fork = [StepSpec("a"), StepSpec("b", unmet_deps=1), StepSpec("c", unmet_deps=1)]
    succeeded = _start(manager, fork)
    _run(manager, succeeded, "a", ["b", "c"], {"rows": 3})
    _run(manager, succeeded, "b", [], "from b")
    manager.claim_step(succeeded, "c", worker="w1", celery_task_id=None)
    last = manager.complete_step(succeeded, "c", attempt=1, output_data=[1], sinks=["b", "c"])

    assert last.execution is not None
    assert last.execution.to_status == "succeeded"
    assert execution_row(succeeded)["output_data"] == {"b": "from b", "c": [1]}
    assert execution_row(succeeded)["error"] is None

    failed = _start(manager, [StepSpec("x"), StepSpec("y")])
    for name, message in (("y", "first"), ("x", "second")):
        manager.claim_step(failed, name, worker="w1", celery_task_id=None)
        error = {"type": "ValueError", "message": message}
        assert manager.transition_step(failed, name, "failed", error=error).applied
    from core import executions

    done = manager.run(executions.finish_if_done, failed, ["x", "y"])

    assert done is not None
    assert (done.from_status, done.to_status) == ("running", "failed")
    row = execution_row(failed)
    assert row["error"] == {"step": "y", "type": "ValueError", "message": "first"}
    assert row["output_data"] is None
    assert events(failed)[-1] == (None, "running", "failed")


def test_step_errors_are_typed(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    execution_id = _start(manager, [StepSpec("a")])
    with pytest.raises(StepNotFound, match="has no step named 'zz'"):
        manager.transition_step(execution_id, "zz", "running")
    manager.claim_step(execution_id, "a", worker="w", celery_task_id=None)
    with pytest.raises(InputValidationError, match="output_data is not JSON-serializable"):
        manager.complete_step(execution_id, "a", attempt=1, output_data={1, 2})
    assert step_row(execution_id, "a")["status"] == "running"


def test_heartbeat_touches_all_of_a_workers_steps_in_one_statement(
    database: TestDatabase,
) -> None:
    manager = SyncEnhancedExecutionStateManager()
    steps = [StepSpec(f"s{i}") for i in range(10)]
    execution_id = _start(manager, steps)
    for spec in steps[:6]:
        manager.claim_step(execution_id, spec.name, worker="worker-1", celery_task_id=None)
    for spec in steps[6:8]:
        manager.claim_step(execution_id, spec.name, worker="worker-2", celery_task_id=None)
    before = {s.name: step_row(execution_id, s.name)["heartbeat_at"] for s in steps}

    statements: list[str] = []
    engine = manager.database.work_engine

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        touched = manager.heartbeat("worker-1")
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert touched == 6
    assert len(statements) == 1
    after = {s.name: step_row(execution_id, s.name)["heartbeat_at"] for s in steps}
    assert all(after[f"s{i}"] > before[f"s{i}"] for i in range(6))
    assert all(after[f"s{i}"] == before[f"s{i}"] for i in range(6, 10))


def test_stalled_steps_are_requeued_until_their_crash_recoveries_are_spent(
    database: TestDatabase,
) -> None:
    # Crash recoveries are counted apart from error retries: a step allowed one attempt
    # is still run again after its worker died, until CONVEYOR_MAX_CRASH_RECOVERIES (3).
    database_reachable_for(5)
    manager = SyncEnhancedExecutionStateManager()
    execution_id = insert_execution(
        "w", {}, steps=[StepSpec("recoverable"), StepSpec("spent"), StepSpec("fresh")]
    )
    manager.transition_execution(execution_id, "running")
    manager.transition_steps(execution_id, None, "queued")
    for name in ("recoverable", "spent", "fresh"):
        manager.claim_step(execution_id, name, worker="host:41", celery_task_id=None)
    from datetime import UTC, datetime, timedelta

    old = datetime.now(UTC) - timedelta(minutes=10)
    force_step_status(execution_id, "recoverable", "running", heartbeat_at=old)
    force_step_status(execution_id, "spent", "running", heartbeat_at=old, recoveries=3, attempt=4)

    stalled = manager.find_stalled_steps(5)
    assert sorted(stalled) == [(execution_id, "recoverable"), (execution_id, "spent")]
    recovery = manager.recover_stalled_steps(stalled)
    assert [(r.step_name, r.attempt) for r in recovery.requeued] == [("recoverable", 2)]
    assert [r.step_name for r in recovery.failed] == ["spent"]
    recovered = step_row(execution_id, "recoverable")
    assert (recovered["status"], recovered["recoveries"]) == ("queued", 1)
    assert recovered["error"]["type"] == "StepStalled"
    crashed = step_row(execution_id, "spent")["error"]
    assert crashed["type"] == "StepCrashed"
    assert crashed["worker"] == "host:41"
    assert crashed["attempts"] == 4
    assert "host:41" in crashed["message"]
    assert "4 attempt(s)" in crashed["message"]
    assert step_row(execution_id, "fresh")["status"] == "running"
    # A second sweep over the same keys finds nothing left to do.
    again = manager.recover_stalled_steps(stalled)
    assert again.requeued == []
    assert again.failed == []


@pytest.mark.asyncio
async def test_async_manager_drives_the_same_plans(database: TestDatabase) -> None:
    manager = EnhancedExecutionStateManager()
    execution_id = insert_execution("w", {}, steps=[StepSpec("only")])
    await manager.transition_execution(execution_id, "running")
    await manager.transition_steps(execution_id, ["only"], "queued")
    assert (await manager.claim_step(execution_id, "only", worker="a", celery_task_id="t")).applied
    assert await manager.heartbeat("a") == 1
    done = await manager.complete_step(execution_id, "only", attempt=1, output_data=[1])
    assert done.execution is not None
    assert done.execution.to_status == "succeeded"
    history = [
        (e.step_name, e.from_status, e.to_status) for e in await manager.get_history(execution_id)
    ]
    assert history == [
        (None, None, "pending"),
        (None, "pending", "running"),
        ("only", "pending", "queued"),
        ("only", "queued", "running"),
        ("only", "running", "succeeded"),
        (None, "running", "succeeded"),
    ]
