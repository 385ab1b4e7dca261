"""How an execution ends: a manual final transition closes its steps, and the
transaction of its last step finishes it under every interleaving."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from sqlalchemy import Connection

from core import executions, reconciler, steps
from core.database import get_database
from core.enhanced_execution_state_manager import (
    EnhancedExecutionStateManager,
    GivenDag,
    SyncEnhancedExecutionStateManager,
)
from core.errors import InvalidTransition
from core.executions import StepSpec
from core.outcomes import Claim, StepCompletion, TransitionResult
from tests.conftest import TestDatabase
from tests.helpers.race import complete_together, run_together
from tests.helpers.state import events, execution_row, insert_execution, step_row

SINKS = ("s1", "s2")


def _running(manager: SyncEnhancedExecutionStateManager, specs: list[StepSpec]) -> str:
    """A running execution with its root steps queued."""
    execution_id = insert_execution("w", {}, steps=specs)
    manager.transition_execution(execution_id, "running")
    roots = [s.name for s in specs if s.unmet_deps == 0]
    manager.transition_steps(execution_id, roots, "queued")
    return execution_id


def _claim(manager: SyncEnhancedExecutionStateManager, execution_id: str, step: str) -> Claim:
    claim = manager.run(steps.claim, execution_id, step, "w1", None, (), lambda _route: ())
    assert claim is not None
    return claim


def _reconcile(manager: SyncEnhancedExecutionStateManager) -> Any:
    """One reconciler pass that finds every queued step and pending execution overdue."""
    return manager.run(
        reconciler.reconcile_pass,
        stall_timeout=3600.0,
        republish_after=-1.0,
        start_after=-1.0,
        limit=100,
        max_recoveries=0,
        dag_of=lambda _workflow, _version: None,
    )


@pytest.mark.parametrize("target", ["failed", "cancelled", "timed_out"])
def test_a_manual_final_transition_closes_the_open_steps(
    database: TestDatabase, target: str
) -> None:
    manager = SyncEnhancedExecutionStateManager()
    specs = [StepSpec("a"), StepSpec("b"), StepSpec("c", unmet_deps=1)]
    execution_id = _running(manager, specs)
    _claim(manager, execution_id, "b")

    moved = manager.transition_execution(execution_id, target, reason="operator says so")
    assert moved.applied
    # Queued, running and pending steps: closed with the execution, with their events.
    for name, was in [("a", "queued"), ("b", "running"), ("c", "pending")]:
        assert step_row(execution_id, name)["status"] == "cancelled", f"{name} left {was}"
        assert (name, was, "cancelled") in events(execution_id)
    assert execution_row(execution_id)["status"] == target
    report = _reconcile(manager)
    assert not [key for key in report.republish if key[0] == execution_id]
    assert execution_row(execution_id)["status"] == target


def test_a_manual_success_with_open_steps_is_refused(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    execution_id = _running(manager, [StepSpec("a"), StepSpec("b")])
    with pytest.raises(InvalidTransition, match=r"step a, b are still open"):
        manager.transition_execution(execution_id, "succeeded")
    assert execution_row(execution_id)["status"] == "running"
    assert step_row(execution_id, "a")["status"] == "queued"
    # Once no step is open, it may be declared succeeded.
    manager.transition_steps(execution_id, None, "skipped")
    assert manager.transition_execution(execution_id, "succeeded").applied


@pytest.mark.postgresql_only
def test_sinks_completing_together_finish_the_execution(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    for _ in range(5):
        execution_id = _running(manager, [StepSpec(name) for name in SINKS])
        claims = [_claim(manager, execution_id, name) for name in SINKS]
        dag = GivenDag("", sink_steps=SINKS)
        # Both past their step's update before either checks for the finish.
        completions = complete_together(get_database().engine, claims, dag)
        assert all(c.transition.applied for c in completions)
        # No reconciler pass: the transaction of the last sink finished it.
        assert execution_row(execution_id)["status"] == "succeeded", "no sink finished it"
        assert [c.execution is not None for c in completions].count(True) == 1
        assert events(execution_id).count((None, "running", "succeeded")) == 1


@pytest.mark.asyncio
async def test_the_async_manager_closes_steps_and_retries_through_pending(
    database: TestDatabase,
) -> None:
    manager = EnhancedExecutionStateManager()
    execution_id = await manager.create_execution("w", {})
    await manager.transition_execution(execution_id, "running")
    ended = await manager.transition_execution(execution_id, "timed_out", reason="too slow")
    assert ended.applied
    assert [s.status for s in await manager.get_steps(execution_id)] == ["cancelled"]
    assert ("only", "pending", "cancelled") in events(execution_id)

    retried = await manager.retry_execution(execution_id)
    assert (retried.applied, retried.to_status, retried.attempt) == (True, "pending", 2)
    assert [s.status for s in await manager.get_steps(execution_id)] == ["pending"]
    assert not (await manager.retry_execution(execution_id)).applied


def _complete(claim: Claim, dag: GivenDag, conn: Connection) -> StepCompletion:
    return steps.complete(conn, claim, None, None, dag, None)


def _crashed(key: tuple[str, str], conn: Connection) -> list[TransitionResult]:
    """The reconciler's part for a step whose worker died with no recovery left: the
    step failed, then its execution's finish check, in one transaction."""
    reconciler.recover_stalled_steps(conn, [key], 0)
    return executions.finish_executions(conn, [key[0]], lambda _w, _v: SINKS)


@pytest.mark.postgresql_only
def test_a_crashed_step_failed_while_the_other_sink_completes_finishes_the_execution(
    database: TestDatabase,
) -> None:
    manager = SyncEnhancedExecutionStateManager()
    dag = GivenDag("", sink_steps=SINKS)
    for _ in range(3):
        execution_id = _running(manager, [StepSpec(name) for name in SINKS])
        done, lost = (_claim(manager, execution_id, name) for name in SINKS)
        works: list[Callable[[Connection], object]] = [
            partial(_complete, done, dag),
            partial(_crashed, (execution_id, lost.step_name)),
        ]
        # Each records its step before either checks for the end.
        completion, finished = run_together(get_database().engine, works)
        assert isinstance(completion, StepCompletion)
        assert completion.transition.applied
        # No later pass: whichever transaction committed last finished it.
        assert execution_row(execution_id)["status"] == "failed", "neither finished it"
        assert (completion.execution is not None) != bool(finished)
