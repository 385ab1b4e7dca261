"""``conveyor wake``, ``signal``, ``events send``, ``list --status waiting`` and what
``status`` shows of waiting steps, against a real database, Redis and an in-process
worker running tests/e2e/wait_workflows.py's ``nap`` and ``invoice-approval``."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from conveyor.cli import render
from conveyor.cli.main import CliState, app
from core.models import InboxEvent, StepExecution
from core.registry import WorkflowRegistry, configure_registry
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
from tests.e2e.wait_workflows import invoice_approval, nap
from tests.helpers.state import count, step_row
from worker.app import ConveyorCelery, create_app


@pytest.fixture
def celery_app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    """An app of the wait workflows, on the test database and a real Redis."""
    registry = WorkflowRegistry([invoice_approval, nap])
    configure_registry(registry)
    return create_app(clean_app_settings(database, redis_url), registry)


@pytest.fixture
def worker(celery_app: ConveyorCelery) -> Iterator[ConveyorCelery]:
    """An in-process worker of ``celery_app`` running for the test."""
    with running_worker(celery_app) as running:
        yield running


@pytest.fixture
def state(celery_app: ConveyorCelery) -> CliState:
    """What the commands run against."""
    return CliState(celery_app=celery_app)


def invoke(state: CliState, *args: str) -> Result:
    """Run ``conveyor ARGS``; an exception other than an exit fails the test."""
    return CliRunner().invoke(app, list(args), obj=state, catch_exceptions=False)


def run(state: CliState, workflow: str, data: Any = None) -> str:
    result = invoke(state, "run", workflow, "--input", json.dumps(data))
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def waiting(execution_id: str, step: str, timeout: float = 20) -> dict[str, Any]:
    """The step's row once it waits, armed (a wake time or an event), or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        row = step_row(execution_id, step)
        if row["status"] == "waiting" and (row["wake_at"] or row["wait_event"]):
            return row
        if time.monotonic() > deadline:
            pytest.fail(f"step {step} of {execution_id} is {row['status']}, not waiting")
        time.sleep(0.05)


def one_line_error(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.usefixtures("worker")
def test_status_shows_a_sleep_and_wake_ends_it_early(state: CliState) -> None:
    execution_id = run(state, "nap")
    row = waiting(execution_id, "nap")
    shown = invoke(state, "status", execution_id)
    assert shown.exit_code == 0, shown.output
    until = row["wake_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    assert re.search(rf"until {until} \((in 59m \d\ds|in 1h 00m)\)", shown.stdout), shown.stdout
    assert "waits for" in shown.stdout
    assert "nap [sleep]" in shown.stdout  # the DAG tree marks the wait node
    assert "waiting since" in shown.stdout  # parked: every open step waits

    listed = invoke(state, "list", "--status", "waiting")
    assert listed.exit_code == 0, listed.output
    assert re.search(rf"{execution_id}\s+nap v1\s+running \(waiting\)", listed.stdout), (
        listed.stdout
    )
    document = json.loads(invoke(state, "status", execution_id, "--json").stdout)
    nap_step = next(s for s in document["steps"] if s["name"] == "nap")
    assert nap_step["kind"] == "sleep"
    assert nap_step["wait"]["kind"] == "sleep"
    assert nap_step["wait"]["wake_at"] == row["wake_at"].astimezone(UTC).isoformat()
    assert document["parked_at"] is not None

    woken = invoke(state, "wake", execution_id, "nap")
    assert woken.exit_code == 0, woken.output
    assert woken.stdout.strip() == f"Woke nap of {execution_id}."
    assert wait_for(execution_id).status == "succeeded"
    history = invoke(state, "status", execution_id, "--history")
    assert "woken early by" in history.stdout
    assert "(command line)" in history.stdout
    assert execution_id not in invoke(state, "list", "--status", "waiting").stdout

    again = invoke(state, "wake", execution_id, "nap")
    assert again.exit_code == 1
    assert one_line_error(again) == f"error: execution {execution_id} is succeeded"


@pytest.mark.usefixtures("worker")
def test_signal_checks_its_payload_and_completes_the_wait(state: CliState) -> None:
    execution_id = run(state, "invoice-approval", {"invoice_id": "inv-42"})
    waiting(execution_id, "approval")
    shown = invoke(state, "status", execution_id)
    assert re.search(
        r"event invoice\.approved key inv-42 \(times out \d{4}-\d\d-\d\d \d\d:\d\d UTC, "
        r"(in 6d 23h|in 7d 0h)\)",
        shown.stdout,
    ), shown.stdout
    assert "approval [event]" in shown.stdout

    not_json = invoke(state, "signal", execution_id, "approval", "--payload", "{approved")
    assert not_json.exit_code == 2
    assert one_line_error(not_json).startswith("error: --payload is not valid JSON")
    refused = invoke(state, "signal", execution_id, "approval", "--payload", '{"approved": 3}')
    assert refused.exit_code == 1
    assert "payload.approved" in one_line_error(refused)
    sleep = invoke(state, "signal", execution_id, "request", "--payload", "{}")
    assert sleep.exit_code == 1
    assert "not an event wait" in one_line_error(sleep)
    assert count(InboxEvent) == 0

    payload = '{"approved": true, "note": "ok"}'
    signalled = invoke(state, "signal", execution_id, "approval", "--payload", payload)
    assert signalled.exit_code == 0, signalled.output
    assert signalled.stdout.strip() == f"Signalled approval of {execution_id}: it completed."
    finished = wait_for(execution_id)
    assert finished.status == "succeeded"
    assert finished.output_data == {"pay": {"paid": True, "note": "ok"}}


def test_an_event_sent_before_its_wait_is_kept_and_taken(
    state: CliState, celery_app: ConveyorCelery
) -> None:
    # No worker yet: the execution stays pending, its wait not established.
    execution_id = run(state, "invoice-approval", {"invoice_id": "inv-7"})
    bad = invoke(state, "events", "send", "invoice.approved", "inv-7", "--payload", "nope")
    assert bad.exit_code == 2
    assert one_line_error(bad).startswith("error: --payload is not valid JSON")
    invalid = invoke(
        state, "events", "send", "invoice.approved", "inv-7", "--payload", '{"note": "x"}'
    )
    assert invalid.exit_code == 1
    assert "payload.approved" in one_line_error(invalid)
    assert count(InboxEvent) == 0

    args = ["events", "send", "invoice.approved", "inv-7", "--payload", '{"approved": true}']
    sent = invoke(state, *args, "--idempotency-key", "k-7")
    assert sent.exit_code == 0, sent.output
    assert re.fullmatch(
        r"Event #\d+ stored: no execution waits for invoice\.approved key inv-7 yet; "
        r"kept \S+ for one that does \(an execution created before now: later ones never "
        r"take an earlier event\)\.",
        sent.stdout.strip(),
    ), sent.stdout
    again = invoke(state, *args, "--idempotency-key", "k-7")
    assert again.exit_code == 0, again.output
    assert "was sent before with idempotency key k-7" in again.stdout
    assert count(InboxEvent) == 1

    with running_worker(celery_app):
        finished = wait_for(execution_id)
        assert finished.status == "succeeded"
        assert finished.output_data == {"pay": {"paid": True, "note": ""}}

        # With the next one waiting, an event is taken at once.
        second = run(state, "invoice-approval", {"invoice_id": "inv-8"})
        waiting(second, "approval")
        taken = invoke(
            state, "events", "send", "invoice.approved", "inv-8", "--payload", '{"approved": false}'
        )
        assert taken.exit_code == 0, taken.output
        assert re.fullmatch(rf"Event #\d+ taken by {second}/approval\.", taken.stdout.strip())
        assert wait_for(second).status == "succeeded"


def waiting_row(**values: Any) -> StepExecution:
    """A step row (not stored) that waits: a row starts pending, as the models insist."""
    row = StepExecution(status="pending", **values)
    row.status = "waiting"
    return row


def test_what_a_waiting_step_waits_for_reads_from_now() -> None:
    now = datetime(2026, 12, 5, 7, 0, tzinfo=UTC)
    sleep = waiting_row(
        step_name="cooldown", wait_kind="sleep", wake_at=now + timedelta(days=2, hours=3)
    )
    assert render.waits_for(sleep, now=now) == "until 2026-12-07 10:00 UTC (in 2d 3h)"
    event = waiting_row(
        step_name="approval",
        wait_kind="event",
        wait_event="invoice.approved",
        wait_key="inv-42",
        wake_at=now + timedelta(minutes=4, seconds=5),
    )
    assert render.waits_for(event, now=now) == (
        "event invoice.approved key inv-42 (times out 2026-12-05 07:04 UTC, in 4m 05s)"
    )
    child = waiting_row(step_name="load", wait_kind="child", child_execution_id="c-1")
    assert render.waits_for(child, {"c-1": "running"}, now=now) == "child c-1 (running)"
    overdue = waiting_row(
        step_name="cooldown", wait_kind="sleep", wake_at=now - timedelta(seconds=3)
    )
    assert render.waits_for(overdue, now=now) == "until 2026-12-05 06:59 UTC (3s ago)"
    overdue.status = "succeeded"
    assert render.waits_for(overdue, now=now) == ""
