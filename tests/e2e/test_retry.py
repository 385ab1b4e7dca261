"""Retrying an execution is one operation: a fresh deadline, admission like a start, and
every reset step's retry policy and crash recoveries whole again.

The engine's own entry points drive each execution (``Engine.retry``, ``Engine.admit``
as a start message runs it, ``Engine.run_step`` as a step message runs it, a reconciler
pass) against the real database and broker; no worker consumes the messages, so each
test decides when what runs.
"""

from __future__ import annotations

from collections import Counter
from contextlib import suppress
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from conveyor.cli import documents
from core import reconciler, steps
from core.database import get_db_session
from core.models import StepExecution, WorkflowExecution
from core.registry import WorkflowRegistry, configure_registry
from core.workflows import Retry, StepContext, Workflow
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings
from tests.helpers.state import events, execution_row, step_row
from worker.app import ConveyorCelery, create_app
from worker.failures import StepFailed
from worker.producer import enqueue

CALLS: Counter[tuple[str, str]] = Counter()
FAILING: set[str] = set()  # executions whose steps raise
MAX_RECOVERIES = 1  # as CONVEYOR_MAX_CRASH_RECOVERIES=1


def _call(ctx: StepContext) -> str:
    CALLS[(ctx.execution_id, ctx.step_name)] += 1
    if ctx.execution_id in FAILING:
        raise RuntimeError("the service is down")
    return "ok"


deadlined = Workflow("retry-deadlined", deadline=timedelta(hours=1))
serial = Workflow("retry-serial", max_concurrency=1)
patient = Workflow("retry-patient")
fragile = Workflow("retry-fragile")


@deadlined.step()
def before_deadline(ctx: StepContext) -> str:
    return _call(ctx)


@serial.step()
def one_at_a_time(ctx: StepContext) -> str:
    return _call(ctx)


@patient.step(retry=Retry(max_attempts=3, backoff=0, jitter=False))
def three_tries(ctx: StepContext) -> str:
    return _call(ctx)


@fragile.step()
def crashes(ctx: StepContext) -> str:
    return _call(ctx)


@pytest.fixture
def app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    registry = WorkflowRegistry([deadlined, serial, patient, fragile])
    configure_registry(registry)
    settings = clean_app_settings(database, redis_url)
    CALLS.clear()
    FAILING.clear()
    return create_app(settings, registry)


def _start(app: ConveyorCelery, workflow: Workflow, execution_id: str) -> None:
    """What the start message of ``execution_id`` does in a worker."""
    app.engine.admit(workflow.name, [execution_id])


def _run(app: ConveyorCelery, execution_id: str, step: str) -> None:
    """What a delivery of the step's message does in a worker; a failure is expected."""
    with suppress(StepFailed):
        app.engine.run_step(execution_id, step, None)


def _past_deadline(execution_id: str) -> None:
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == execution_id)
            .values(deadline_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def test_a_timed_out_execution_retried_gets_a_new_deadline_and_succeeds(
    app: ConveyorCelery,
) -> None:
    execution_id = enqueue(deadlined, app=app)
    _start(app, deadlined, execution_id)
    _past_deadline(execution_id)
    app.engine.reconcile()
    assert execution_row(execution_id)["status"] == "timed_out"

    assert app.engine.retry(execution_id)
    _start(app, deadlined, execution_id)
    app.engine.reconcile()  # a pass between the retry and the step finds nothing due
    _run(app, execution_id, "before_deadline")
    assert execution_row(execution_id)["status"] == "succeeded", "timed out again"
    # The workflow's deadline again, counted from the retry.
    assert execution_row(execution_id)["deadline_at"] > datetime.now(UTC) + timedelta(minutes=59)
    assert events(execution_id).count((None, "running", "timed_out")) == 1


def test_a_retried_execution_waits_for_a_free_slot(app: ConveyorCelery) -> None:
    first = enqueue(serial, app=app)
    FAILING.add(first)
    _start(app, serial, first)
    _run(app, first, "one_at_a_time")
    assert execution_row(first)["status"] == "failed"
    FAILING.discard(first)
    second = enqueue(serial, app=app)
    _start(app, serial, second)
    assert execution_row(second)["status"] == "running"

    assert app.engine.retry(first)
    # max_concurrency=1 and the second one runs: the retried one waits its turn.
    assert execution_row(first)["status"] == "pending", "retry went past max_concurrency=1"
    assert step_row(first, "one_at_a_time")["status"] == "pending"
    _start(app, serial, first)  # its start message, delivered while the slot is taken
    assert execution_row(first)["status"] == "pending"
    _run(app, second, "one_at_a_time")  # the second finishes; its slot goes to the first
    assert execution_row(second)["status"] == "succeeded"
    assert execution_row(first)["status"] == "running"
    _run(app, first, "one_at_a_time")
    assert execution_row(first)["status"] == "succeeded"
    assert events(first).count((None, "failed", "pending")) == 1


def test_a_retried_step_gets_its_whole_retry_policy_again(app: ConveyorCelery) -> None:
    execution_id = enqueue(patient, app=app)
    FAILING.add(execution_id)
    _start(app, patient, execution_id)
    for _ in range(3):
        _run(app, execution_id, "three_tries")
    assert CALLS[(execution_id, "three_tries")] == 3
    assert execution_row(execution_id)["status"] == "failed"

    assert app.engine.retry(execution_id)
    _start(app, patient, execution_id)
    for _ in range(2):
        _run(app, execution_id, "three_tries")
    assert CALLS[(execution_id, "three_tries")] == 5, "the retried step ran fewer than 2 tries"
    row = step_row(execution_id, "three_tries")
    assert row["status"] == "queued", "a retried step got fewer than its 3 attempts"
    FAILING.discard(execution_id)
    _run(app, execution_id, "three_tries")
    assert execution_row(execution_id)["status"] == "succeeded"
    # Attempts count on across runs (a late message from attempt 3 cannot touch attempt
    # 6): the second run's attempts are 4, 5 and 6.
    assert step_row(execution_id, "three_tries")["attempt"] == 6
    # What the CLI, the API and the dashboard show against max_attempts is the try of
    # this run's policy, not the attempt counted across runs ("3/3", never "6/3").
    with get_db_session() as session:
        step = session.get(StepExecution, (execution_id, "three_tries"))
        assert step is not None
        assert (step.policy_attempt, step.max_attempts) == (3, 3)
        assert documents.step(step, None)["policy_attempt"] == 3


def test_a_retried_step_gets_its_crash_recoveries_again(app: ConveyorCelery) -> None:
    execution_id = enqueue(fragile, app=app)
    _start(app, fragile, execution_id)
    manager = app.engine.manager
    key = (execution_id, "crashes")

    def crash() -> None:
        """A worker claims the step and dies; the reconciler judges it stalled."""
        claim = manager.run(steps.claim, *key, "doomed", None, (), lambda _route: ())
        assert claim is not None
        manager.run(reconciler.recover_stalled_steps, [key], MAX_RECOVERIES)

    crash()  # recovered: one recovery allowed
    assert step_row(*key)["status"] == "queued"
    crash()  # spent: StepCrashed
    assert step_row(*key)["status"] == "failed"
    app.engine.reconcile()  # which finishes the execution whose last step it failed
    assert execution_row(execution_id)["status"] == "failed"

    assert app.engine.retry(execution_id)
    _start(app, fragile, execution_id)
    crash()
    assert step_row(*key)["status"] == "queued", "a retried step kept its spent recoveries"
    _run(app, execution_id, "crashes")
    assert execution_row(execution_id)["status"] == "succeeded"
