"""Workflows run end to end on a real Celery worker, Redis broker and SQL state."""

from __future__ import annotations

from tests.e2e.conftest import wait_for
from tests.e2e.workflows import FAN_WIDTH
from tests.helpers.state import step_row
from worker.app import ConveyorCelery
from worker.producer import enqueue


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
