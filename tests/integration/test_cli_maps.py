"""``conveyor status`` of a map, ``conveyor items`` and ``conveyor retry --failed-items``
against a real database, Redis and an in-process worker running
tests/e2e/map_workflows.py's ``maps-repairable`` (batch -> process, a map 3 at a time ->
report)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner, Result

from conveyor.cli.main import CliState, app
from core.registry import WorkflowRegistry, configure_registry
from tests.conftest import TestDatabase
from tests.e2e import map_workflows
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
from tests.e2e.map_workflows import repairable
from worker.app import ConveyorCelery, create_app


@pytest.fixture
def celery_app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    registry = WorkflowRegistry([repairable])
    configure_registry(registry)
    map_workflows.FLAKY.clear()
    return create_app(clean_app_settings(database, redis_url), registry)


@pytest.fixture
def state(celery_app: ConveyorCelery) -> Iterator[CliState]:
    with running_worker(celery_app):
        yield CliState(celery_app=celery_app)
    map_workflows.FLAKY.clear()


def invoke(state: CliState, *args: str) -> Result:
    return CliRunner().invoke(app, list(args), obj=state, catch_exceptions=False)


def _failed_run(state: CliState, n: int, broken: set[int]) -> str:
    map_workflows.FLAKY.update(broken)
    result = invoke(state, "run", repairable.name, "--input", json.dumps({"n": n}))
    assert result.exit_code == 0, result.output
    execution_id = result.stdout.strip()
    assert wait_for(execution_id).status == "failed"
    return execution_id


def test_status_shows_a_map_as_one_line_with_its_counts(state: CliState) -> None:
    execution_id = _failed_run(state, 9, {2})
    result = invoke(state, "status", execution_id)
    assert result.exit_code == 0, result.output
    line = next(row for row in result.stdout.splitlines() if row.strip().startswith("process"))
    assert "failed" in line
    assert "/9 done" in line
    assert "failed 1" in line


def test_items_pages_through_a_maps_items_and_filters_by_status(state: CliState) -> None:
    execution_id = _failed_run(state, 9, {2})
    first = invoke(state, "items", execution_id, "process", "--limit", "2")
    assert first.exit_code == 0, first.output
    rows = [r.split() for r in first.stdout.splitlines() if r.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]
    assert f"conveyor items {execution_id} process --after 1" in first.stdout.replace("\n", "")
    failed = invoke(state, "items", execution_id, "process", "--status", "failed", "--json")
    body = json.loads(failed.stdout)
    assert [item["index"] for item in body["items"]] == [2]
    assert body["items"][0]["error"]["type"] == "RuntimeError"
    assert body["next"] is None


def test_items_refuses_a_step_that_is_no_map_and_a_bad_status(state: CliState) -> None:
    execution_id = _failed_run(state, 3, {0})
    task = invoke(state, "items", execution_id, "batch")
    assert task.exit_code == 1
    assert "step batch is a task, not a map" in task.stderr
    bad = invoke(state, "items", execution_id, "process", "--status", "done")
    assert bad.exit_code == 1
    assert "--status 'done' is no item status" in bad.stderr


def test_retry_failed_items_runs_only_those_again(state: CliState) -> None:
    execution_id = _failed_run(state, 9, {4})
    map_workflows.FLAKY.clear()
    result = invoke(state, "retry", execution_id, "--failed-items", "--wait")
    assert result.exit_code == 0, result.output
    assert wait_for(execution_id).output_data == {"report": sum(range(100, 109))}
    listed = json.loads(invoke(state, "items", execution_id, "process", "--json").stdout)
    attempts = {item["index"]: item["attempt"] for item in listed["items"]}
    assert attempts[4] == 2
    again = invoke(state, "retry", execution_id, "--failed-items")
    assert again.exit_code == 1
    assert "no map step failed with items to run again" in again.stderr
