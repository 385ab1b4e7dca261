"""Workflows run end to end on a real Celery worker, Redis broker and SQL state."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sqlalchemy import create_engine, select

from core.config import Settings
from core.models import WorkflowExecution
from tests.conftest import TestDatabase
from tests.conftest import _migrate as migrate
from tests.e2e.conftest import wait_for
from tests.e2e.workflows import FAN_WIDTH, JOIN_RUNS
from tests.helpers.state import count, step_row
from tests.helpers.workflows import state_registry
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue, enqueue_many


def test_linear_workflow_passes_outputs_downstream(worker: ConveyorCelery) -> None:
    execution_id = enqueue("linear", {"start": 20}, app=worker)
    execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert execution.output_data == {"describe": {"result": 41, "attempt": 1}}
    assert step_row(execution_id, "double")["output_data"] == 40


def test_diamond_joins_both_branches(worker: ConveyorCelery) -> None:
    execution_id = enqueue("diamond", {"start": 3}, app=worker)
    execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert execution.output_data == {"join": 4 * 5}


def test_wide_fan_out_joins_fifty_branches(worker: ConveyorCelery) -> None:
    execution_id = enqueue("fan", None, app=worker)
    execution = wait_for(execution_id, timeout=60)
    assert execution.status == "succeeded"
    assert execution.output_data == {"total": sum(i * i for i in range(FAN_WIDTH))}


def test_join_runs_once_in_200_diamonds_with_simultaneous_branches(
    worker: ConveyorCelery,
) -> None:
    ids = enqueue_many("diamond", [{"start": n} for n in range(200)], app=worker)
    for n, execution_id in enumerate(ids):
        execution = wait_for(execution_id, timeout=120)
        assert execution.status == "succeeded"
        assert execution.output_data == {"join": (n + 1) * (n + 2)}
    runs = Counter(run for run in JOIN_RUNS if run in set(ids))
    assert len(runs) == 200
    assert set(runs.values()) == {1}


def test_an_app_for_another_database_keeps_its_state_there(
    database: TestDatabase, redis_url: str, tmp_path: Path
) -> None:
    other = Settings(database_url=f"sqlite:///{tmp_path / 'other.db'}", broker_url=redis_url)
    engine = create_engine(other.sync_database_url)
    migrate(engine)
    app = create_app(other, state_registry())

    execution_id = enqueue("w", {}, app=app)

    with engine.connect() as connection:
        found = connection.execute(
            select(WorkflowExecution.workflow_id).where(
                WorkflowExecution.execution_id == execution_id
            )
        ).scalar_one()
    engine.dispose()
    app.engine.manager.database.dispose()
    assert found == "w"
    assert count(WorkflowExecution) == 0  # nothing in the process's own database
