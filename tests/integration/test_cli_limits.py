"""``conveyor limits`` (list, pause, resume) and ``conveyor status`` of a step held by
its key, against a real database, Redis and an in-process worker running
tests/e2e/limit_workflows.py's ``limits-gated`` and ``limits-metered``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner, Result

from conveyor.cli.main import CliState, app
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.models import StepExecution
from core.registry import WorkflowRegistry, configure_registry
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
from tests.e2e.limit_workflows import GATE, GPU_KEY, METERED_KEY, gated, metered
from worker.app import ConveyorCelery, create_app


@pytest.fixture
def state(database: TestDatabase, redis_url: str) -> Iterator[CliState]:
    registry = WorkflowRegistry([gated, metered])
    configure_registry(registry)
    celery_app: ConveyorCelery = create_app(clean_app_settings(database, redis_url), registry)
    GATE.clear()
    with running_worker(celery_app):
        try:
            yield CliState(celery_app=celery_app)
        finally:
            GATE.set()  # before the worker stops: it waits for its running steps


def invoke(state: CliState, *args: str) -> Result:
    return CliRunner().invoke(app, list(args), obj=state, catch_exceptions=False)


def _run(state: CliState, workflow: str) -> str:
    result = invoke(state, "run", workflow)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def _step_until(execution_id: str, status: str, held: bool = False) -> StepExecution:
    """The execution's only step once in ``status`` (and, with ``held``, held by a key)."""
    manager = SyncEnhancedExecutionStateManager()
    deadline = time.monotonic() + 20
    while True:
        (step,) = manager.get_steps(execution_id)
        if step.status == status and (not held or step.wait_key is not None):
            return step
        if time.monotonic() > deadline:
            pytest.fail(f"{execution_id}'s step stayed {step.status}")
        time.sleep(0.05)


def _line(output: str, start: str) -> str:
    return next(row for row in output.splitlines() if row.strip().startswith(start))


def test_limits_lists_each_keys_counts_and_status_says_what_holds_a_step(
    state: CliState,
) -> None:
    empty = invoke(state, "limits")
    assert empty.exit_code == 0, empty.output
    assert "No keys" in empty.stdout
    first = _run(state, gated.name)
    _step_until(first, "running")
    second = _run(state, gated.name)
    _step_until(second, "waiting", held=True)

    table = invoke(state, "limits")
    assert table.exit_code == 0, table.output
    assert _line(table.stdout, GPU_KEY).split() == [GPU_KEY, "1", "1", "1", "-", "-"]
    listed = json.loads(invoke(state, "limits", "--key", GPU_KEY, "--json").stdout)
    assert listed == [
        {
            "key": GPU_KEY,
            "limit": 1,
            "running": 1,
            "waiting": 1,
            "rate_per_second": None,
            "paused_until": None,
        }
    ]
    status = invoke(state, "status", second)
    assert status.exit_code == 0, status.output
    assert f"key {GPU_KEY} (no free slot)" in _line(status.stdout, "render")
    document = json.loads(invoke(state, "status", second, "--json").stdout)
    (step,) = document["steps"]
    assert (step["kind"], step["wait"]["kind"], step["wait"]["key"], step["wait"]["why"]) == (
        "task",
        "key",
        GPU_KEY,
        "concurrency",
    )

    GATE.set()
    assert wait_for(first).status == "succeeded"
    assert wait_for(second).status == "succeeded"
    after = json.loads(invoke(state, "limits", "--key", GPU_KEY, "--json").stdout)
    assert (after[0]["running"], after[0]["waiting"]) == (0, 0)


def test_an_operator_pauses_a_key_from_the_cli_and_resumes_it(state: CliState) -> None:
    until = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    unknown = invoke(state, "limits", "pause", METERED_KEY, "--until", until.isoformat())
    assert unknown.exit_code == 1
    assert f"no key {METERED_KEY!r}" in unknown.stderr
    assert wait_for(_run(state, metered.name)).status == "succeeded"
    for bad, problem in (
        ("tomorrow", "is not an ISO 8601 date-time"),
        ("2030-01-01T00:00:00", "has no timezone"),
        ("2020-01-01T00:00:00Z", "is not in the future"),
    ):
        refused = invoke(state, "limits", "pause", METERED_KEY, "--until", bad)
        assert refused.exit_code == 1
        assert problem in refused.stderr

    paused = invoke(state, "limits", "pause", METERED_KEY, "--until", until.isoformat())
    assert paused.exit_code == 0, paused.output
    held = _run(state, metered.name)
    _step_until(held, "waiting", held=True)
    row = _line(invoke(state, "limits").stdout, METERED_KEY)
    assert "100/s" in row
    assert until.strftime("%Y-%m-%d %H:%M UTC") in row
    described = _line(invoke(state, "status", held).stdout, "call")
    assert f"key {METERED_KEY} (paused until {until.strftime('%Y-%m-%d %H:%M UTC')}" in described

    resumed = invoke(state, "limits", "resume", METERED_KEY)
    assert resumed.exit_code == 0, resumed.output
    assert "1 held step(s) due now" in resumed.stdout
    assert wait_for(held).status == "succeeded"
    listed = json.loads(invoke(state, "limits", "--key", METERED_KEY, "--json").stdout)
    assert listed[0]["paused_until"] is None
