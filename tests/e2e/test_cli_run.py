"""``conveyor run --wait`` and ``conveyor retry --wait`` through a real in-process worker."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update
from typer.testing import CliRunner, Result

from conveyor.cli import main as cli_main
from conveyor.cli.main import CliState, app
from core.database import get_db_session
from core.models import WorkflowExecution
from tests.helpers.state import execution_row
from worker.app import ConveyorCelery


def invoke(worker: ConveyorCelery, *args: str) -> Result:
    """Run ``conveyor ARGS`` against the worker's app."""
    state = CliState(celery_app=worker)
    return CliRunner().invoke(app, list(args), obj=state, catch_exceptions=False)


def test_run_wait_follows_the_execution_and_prints_its_output(worker: ConveyorCelery) -> None:
    result = invoke(worker, "run", "linear", "-i", '{"start": 20}', "--wait", "--timeout", "30")
    assert result.exit_code == 0, result.output
    execution_id, outcome, *output = result.stdout.splitlines()
    assert outcome.startswith(f"succeeded: linear {execution_id} after ")
    assert json.loads("\n".join(output)) == {"describe": {"result": 41, "attempt": 1}}
    assert "3/3 steps" in result.stderr  # the progress bar's last state
    assert execution_row(execution_id)["status"] == "succeeded"

    status = invoke(worker, "status", execution_id)
    assert status.exit_code == 0, status.output
    assert "└── double  succeeded" in status.stdout
    assert "    └── add_one  succeeded" in status.stdout
    assert "        └── describe  succeeded" in status.stdout
    assert '"result": 41' in status.stdout


def test_run_wait_of_a_failing_workflow_exits_1_with_the_error_and_retry_reruns_it(
    worker: ConveyorCelery,
) -> None:
    result = invoke(worker, "run", "broken", "--wait", "--timeout", "30")
    assert result.exit_code == 1, result.output
    execution_id, outcome, error = result.stdout.splitlines()
    assert outcome.startswith(f"failed: broken {execution_id} after ")
    assert error == "step explode: ValueError: the data is bad"

    # Retried a day after it first ran: "after" is the retry's own run, not a day.
    a_day_ago = datetime.now(UTC) - timedelta(days=1)
    with get_db_session(commit=True) as session:
        session.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == execution_id)
            .values(started_at=a_day_ago, finished_at=a_day_ago + timedelta(seconds=1))
        )
    retried_at = datetime.now(UTC)
    retried = invoke(worker, "retry", execution_id, "--wait", "--timeout", "30")
    assert retried.exit_code == 1, retried.output
    lines = retried.stdout.splitlines()
    assert lines[0] == f"Retrying {execution_id} (attempt 2)."
    assert lines[1].startswith(f"failed: broken {execution_id} after ")
    assert lines[1].endswith("(attempt 2)")
    took = lines[1].removeprefix(f"failed: broken {execution_id} after ").split()[0]
    assert re.fullmatch(r"\d+\.\d+s", took), took  # seconds: not "24h00m"
    row = execution_row(execution_id)
    assert (row["status"], row["attempt"]) == ("failed", 2)
    assert row["started_at"].replace(tzinfo=UTC) >= retried_at.replace(microsecond=0)


def answering_within(app: ConveyorCelery, timeout: float) -> int | None:
    """How many workers answer a ping, asking again (each ask waits PING_TIMEOUT) while
    none has, for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    answering = cli_main.workers_answering(app)
    while answering == 0 and time.monotonic() < deadline:
        answering = cli_main.workers_answering(app)
    return answering


def test_run_wait_gives_no_worker_hint_when_a_worker_answers(
    worker: ConveyorCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the hint asks. A worker just started is ready before its broadcast consumer has
    # subscribed (kombu's Redis transport subscribes from the event loop), and a ping
    # published before that reaches no one: ask until it answers, as the CLI keeps asking.
    assert answering_within(worker, timeout=10) == 1
    monkeypatch.setattr(cli_main, "HINT_AFTER", 0.0)  # ping at the first poll that sees pending
    result = invoke(worker, "run", "linear", "-i", '{"start": 1}', "--wait", "--timeout", "30")
    assert result.exit_code == 0, result.output
    assert "hint:" not in result.stderr
