"""What metrics read from the state: open steps by workflow (scrape-time gauges), and how
long a claimed step waited in the queue."""

from __future__ import annotations

from datetime import timedelta

from core import steps
from core.database import get_database
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.executions import StepSpec
from core.sql import utcnow
from core.workload import OpenSteps, open_steps
from tests.conftest import TestDatabase
from tests.helpers.state import force_execution_status, force_step_status, step_row
from tests.helpers.state import insert_execution as insert
from worker.metrics import api_registry


def _open_world() -> None:
    """Workflow a: one step queued, one running, one pending; b: one running."""
    first = insert("a", {}, steps=[StepSpec("x"), StepSpec("y"), StepSpec("z", unmet_deps=1)])
    force_execution_status(first, "running")
    force_step_status(first, "x", "queued")
    force_step_status(first, "y", "running")
    second = insert("b", {}, steps=[StepSpec("x")])
    force_execution_status(second, "running")
    force_step_status(second, "x", "running")


def test_open_steps_are_counted_by_workflow_and_status(database: TestDatabase) -> None:
    _open_world()
    with get_database().engine.connect() as conn:
        counts = open_steps(conn)
    assert sorted(counts, key=lambda c: (c.workflow, c.status)) == [
        OpenSteps("a", "queued", 1, version=1, step="x"),
        OpenSteps("a", "running", 1),
        OpenSteps("b", "running", 1),
    ]


def test_the_api_registry_reads_the_gauges_at_each_scrape(database: TestDatabase) -> None:
    registry = api_registry(get_database())
    assert registry.get_sample_value("conveyor_steps_running", {"workflow": "b"}) is None
    _open_world()
    queued_a = {"workflow": "a", "queue": "conveyor"}  # a is not registered: the default
    assert registry.get_sample_value("conveyor_steps_queued", queued_a) == 1.0
    assert registry.get_sample_value("conveyor_steps_running", {"workflow": "a"}) == 1.0
    assert registry.get_sample_value("conveyor_steps_running", {"workflow": "b"}) == 1.0
    assert registry.get_sample_value("conveyor_steps_queued", {**queued_a, "workflow": "b"}) is None
    # This process's counters come along (a family of them, whatever their values).
    names = {family.name for family in registry.collect()}
    assert {"conveyor_executions_started", "conveyor_step_duration_seconds"} <= names


def test_queued_steps_are_counted_by_the_queue_of_their_step(database: TestDatabase) -> None:
    queues = {"x": "gpu", "y": "gpu", "z": "reports"}
    execution_id = insert("a", {}, steps=[StepSpec(name) for name in queues])
    force_execution_status(execution_id, "running")
    for name in queues:
        force_step_status(execution_id, name, "queued")
    registry = api_registry(get_database(), lambda workflow, version, step: queues[step])
    gauge = "conveyor_steps_queued"
    assert registry.get_sample_value(gauge, {"workflow": "a", "queue": "gpu"}) == 2.0
    assert registry.get_sample_value(gauge, {"workflow": "a", "queue": "reports"}) == 1.0


def test_a_claim_says_how_long_its_step_was_queued(database: TestDatabase) -> None:
    execution_id = insert("a", {}, steps=[StepSpec("x")])
    force_execution_status(execution_id, "running")
    force_step_status(execution_id, "x", "queued", queued_at=utcnow(-10))
    manager = SyncEnhancedExecutionStateManager()
    claim = manager.run(steps.claim, execution_id, "x", "w1", None, [], lambda _: ())
    assert claim is not None
    assert 10 <= claim.waited < 60


def test_a_retry_is_queued_from_when_it_is_due(database: TestDatabase) -> None:
    """Its backoff is no time spent waiting in the queue."""
    execution_id = insert("a", {}, steps=[StepSpec("x")])
    force_execution_status(execution_id, "running")
    force_step_status(execution_id, "x", "running")
    manager = SyncEnhancedExecutionStateManager()
    moved = manager.run(steps.schedule_retry, execution_id, "x", 1, 30.0, {"type": "Glitch"})
    assert moved.applied
    row = step_row(execution_id, "x")
    assert row["queued_at"] == row["next_attempt_at"]
    assert row["queued_at"] - row["updated_at"] > timedelta(seconds=25)
