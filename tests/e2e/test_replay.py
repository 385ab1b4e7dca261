"""Replaying a recorded step (``conveyor replay``, ``conveyor_test.replay``): the
step's current code runs here with exactly the input, upstream outputs and attempt its
execution recorded, and nothing of the execution changes; refused, naming the reason,
when it could not be faithful."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner, Result

from conveyor.cli.main import CliState, app
from core.database import get_db_session
from core.errors import NotReplayable, StepNotFound
from core.models import ExecutionEvent, WorkflowExecution
from core.registry import WorkflowRegistry
from core.workflows import Retry, Workflow
from tests.e2e.conftest import running_worker, wait_for
from tests.helpers.state import execution_row, step_row
from worker.app import ConveyorCelery
from worker.producer import enqueue
from worker.replay import replay

SEEN: list[tuple[str, int, Any]] = []


def _workflow(*, fixed: bool = False, annotation: Any = list[int]) -> Workflow:
    """Release of "divide": ``fixed`` skips the zero that fails the first release;
    ``annotation`` is what ``divide`` takes (a contract change when not list[int])."""
    wf = Workflow("divide")

    @wf.step()
    def load(ctx: Any) -> list[int]:
        return [5, 2, 0]

    def divide(ctx: Any, load: Any) -> list[float]:
        SEEN.append((ctx.step_name, ctx.attempt, ctx.input))
        return [10 / x for x in load if x or not fixed]

    divide.__annotations__ = {"ctx": Any, "load": annotation, "return": list[float]}
    wf.step("divide", depends_on=["load"], retry=Retry(max_attempts=2, backoff=0))(divide)
    wf.sleep("pause", depends_on=["divide"], duration=timedelta(0))

    @wf.map(over="load")
    def halve(ctx: Any, item: int) -> float:
        return item / 2

    return wf


def _registry(workflow: Workflow) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.register(workflow)
    return registry


def _cli(worker: ConveyorCelery, registry: WorkflowRegistry, *args: str) -> Result:
    state = CliState(celery_app=worker, registry=registry)
    return CliRunner().invoke(app, ["replay", *args], obj=state, catch_exceptions=False)


def _history(execution_id: str) -> tuple[int, Any]:
    with get_db_session() as db:
        events = db.execute(
            select(func.count())
            .select_from(ExecutionEvent)
            .where(ExecutionEvent.execution_id == execution_id)
        ).scalar()
    return events, execution_row(execution_id)["updated_at"]


@pytest.fixture
def failed(conveyor_app: ConveyorCelery) -> tuple[ConveyorCelery, str]:
    """An execution of "divide" whose divide step failed (a zero), after 2 attempts."""
    conveyor_app.engine.registry.register(_workflow())
    with running_worker(conveyor_app):
        execution_id = enqueue("divide", {"run": 7}, app=conveyor_app)
        execution = wait_for(execution_id)
    assert execution.status == "failed"
    SEEN.clear()
    return conveyor_app, execution_id


def test_replay_runs_the_current_code_with_what_was_recorded_and_changes_nothing(
    failed: tuple[ConveyorCelery, str],
) -> None:
    worker, execution_id = failed
    before = _history(execution_id)
    recorded_attempt = step_row(execution_id, "divide")["attempt"]
    assert recorded_attempt == 2  # its second try failed for good

    # The code that failed: the same error, with its traceback, exit 1.
    result = _cli(worker, worker.engine.registry, execution_id, "divide")
    assert result.exit_code == 1
    assert "ZeroDivisionError" in result.stderr
    assert [("divide", recorded_attempt, {"run": 7})] == SEEN

    # The fix, same contract: its output, from the recorded upstream output.
    fixed = _registry(_workflow(fixed=True))
    result = _cli(worker, fixed, execution_id, "divide")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [2.0, 5.0]

    # A map's item, by index.
    replayed = replay(worker.engine.manager.run, fixed, execution_id, "halve", item=1)
    assert replayed.output == 1.0
    assert _history(execution_id) == before  # nothing of the execution changed


def test_replay_refuses_what_it_could_not_replay_faithfully(
    failed: tuple[ConveyorCelery, str],
) -> None:
    worker, execution_id = failed
    run = worker.engine.manager.run
    changed = _registry(_workflow(annotation=list[str]))
    with pytest.raises(NotReplayable, match=r"contract changed .*params"):
        replay(run, changed, execution_id, "divide")
    with pytest.raises(NotReplayable, match="sleep step, which runs no code"):
        replay(run, worker.engine.registry, execution_id, "pause")
    with pytest.raises(NotReplayable, match="map step: name an item"):
        replay(run, worker.engine.registry, execution_id, "halve")
    with pytest.raises(StepNotFound, match="has no step named 'nope'"):
        replay(run, worker.engine.registry, execution_id, "nope")
    result = _cli(worker, changed, execution_id, "divide")
    assert result.exit_code == 1
    assert "contract changed" in result.output
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == execution_id)
            .values(payloads_cleared_at=func.now())
        )
    with pytest.raises(NotReplayable, match="cleared by retention"):
        replay(run, worker.engine.registry, execution_id, "divide")
