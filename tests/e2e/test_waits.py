"""Waits are rows: sleeps and event waits through a real worker, database and broker.

Beat does not run here: each test calls ``Engine.wake()`` (what ``conveyor.wake`` runs
every second) when it wants due waits woken.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import func, select, update

from core.database import get_db_session
from core.errors import InputValidationError, WaitNotOpen
from core.models import ExecutionEvent, InboxEvent, StepExecution
from core.registry import WorkflowRegistry, configure_registry
from core.workflows import StepContext, Workflow
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
from tests.helpers.state import step_row
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue, send_event, signal, wake

RAN: list[tuple[str, str, object]] = []

napper = Workflow("waits-napper")


@napper.step()
def before(ctx: StepContext) -> dict[str, str]:
    return {"due_at": (datetime.now(UTC) + timedelta(seconds=1)).isoformat()}


napper.sleep("nap", depends_on=["before"], duration=timedelta(seconds=1))


@napper.step(depends_on=["nap"])
def after(ctx: StepContext, nap: str) -> str:
    RAN.append((ctx.execution_id, "after", nap))
    return nap


class Approval(BaseModel):
    approved: bool
    by: str


approver = Workflow("waits-approver")


@approver.step()
def request(ctx: StepContext) -> dict[str, str]:
    return {"invoice_id": ctx.input["invoice"]}


approver.wait(
    "approval",
    depends_on=["request"],
    event="invoice.approved",
    key=lambda ctx, request: request["invoice_id"],
    schema=Approval,
    timeout=timedelta(days=7),
)


@approver.step(depends_on=["approval"])
def pay(ctx: StepContext, approval: dict[str, object]) -> dict[str, object]:
    RAN.append((ctx.execution_id, "pay", approval))
    return approval


long_sleeper = Workflow("waits-long", max_concurrency=1)
long_sleeper.sleep("rest", duration=timedelta(days=3))


@long_sleeper.step(depends_on=["rest"])
def done(ctx: StepContext, rest: str) -> str:
    return "done"


@pytest.fixture
def app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    registry = WorkflowRegistry([napper, approver, long_sleeper])
    configure_registry(registry)
    RAN.clear()
    return create_app(clean_app_settings(database, redis_url), registry)


def _waiting(execution_id: str, step: str, timeout: float = 20) -> dict[str, Any]:
    """The step's row once it is waiting (and armed), or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        row = step_row(execution_id, step)
        if row["status"] == "waiting" and (row["wake_at"] or row["wait_event"]):
            return row
        if time.monotonic() > deadline:
            pytest.fail(f"step {step} of {execution_id} is {row['status']}, not waiting")
        time.sleep(0.05)


def _reasons(execution_id: str, step: str) -> list[str | None]:
    with get_db_session() as session:
        return list(
            session.scalars(
                select(ExecutionEvent.reason)
                .where(ExecutionEvent.execution_id == execution_id)
                .where(ExecutionEvent.step_name == step)
                .order_by(ExecutionEvent.id)
            )
        )


def _lags_observed(app: ConveyorCelery) -> float:
    """How many sleeps of ``napper`` this process's waker woke (its lateness observed)."""
    found = app.engine.metrics.registry.get_sample_value(
        "conveyor_wake_lag_seconds_count", {"workflow": napper.name}
    )
    return found or 0.0


def test_a_sleep_holds_no_message_and_wakes_when_due(app: ConveyorCelery) -> None:
    lags_before = _lags_observed(app)
    with running_worker(app):
        execution_id = enqueue(napper, {}, app=app)
        row = _waiting(execution_id, "nap")
        wake_at, since = row["wake_at"], row["waiting_since"]
        assert 0.8 < (wake_at - since).total_seconds() < 1.5
        # Not due yet: nothing taken; the next wake time falls before the next tick, so
        # the pass sends one wake message for that moment, which the worker runs.
        assert app.engine.wake() == 0
        finished = wait_for(execution_id)
    woke = step_row(execution_id, "nap")["finished_at"]
    assert timedelta(0) <= woke - wake_at < timedelta(seconds=1)
    # The waker's lateness is observed for the workflow (conveyor_wake_lag_seconds).
    assert _lags_observed(app) == lags_before + 1
    assert finished.status == "succeeded"
    assert [(execution_id, "after", wake_at.isoformat())] == RAN
    assert _reasons(execution_id, "nap") == ["upstream steps done", "woke up"]


def test_an_early_wake_completes_the_sleep_and_is_audited(app: ConveyorCelery) -> None:
    with running_worker(app):
        execution_id = enqueue(long_sleeper, {}, app=app)
        _waiting(execution_id, "rest")
        wake(execution_id, "rest", actor="ops@example.com", app=app)
        assert wait_for(execution_id).status == "succeeded"
    assert _reasons(execution_id, "rest") == [
        "upstream steps done",
        "woken early by ops@example.com",
    ]
    with pytest.raises(WaitNotOpen, match="succeeded"):
        wake(execution_id, "rest", app=app)


def test_an_event_sent_before_its_wait_exists_is_delivered(app: ConveyorCelery) -> None:
    execution_id = enqueue(approver, {"invoice": "inv-1"}, app=app)
    receipt = send_event(
        "invoice.approved", key="inv-1", payload={"approved": True, "by": "ann"}, app=app
    )
    assert receipt.consumed_by is None  # nobody waits yet: kept
    with running_worker(app):
        finished = wait_for(execution_id)
    assert finished.status == "succeeded", finished.error
    assert [(execution_id, "pay", {"approved": True, "by": "ann"})] == RAN


def test_an_event_sent_to_an_established_wait_completes_it_once(app: ConveyorCelery) -> None:
    with running_worker(app):
        first = enqueue(approver, {"invoice": "inv-2"}, app=app)
        _waiting(first, "approval")
        second = enqueue(approver, {"invoice": "inv-2"}, app=app)
        _waiting(second, "approval")
        payload = {"approved": True, "by": "bob"}
        receipt = send_event("invoice.approved", key="inv-2", payload=payload, app=app)
        assert receipt.consumed_by == f"{first}/approval"  # the oldest wait
        again = send_event(
            "invoice.approved", key="inv-2", payload=payload, idempotency_key="k1", app=app
        )
        repeat = send_event(
            "invoice.approved", key="inv-2", payload=payload, idempotency_key="k1", app=app
        )
        assert again.event_id == repeat.event_id
        assert repeat.duplicate
        assert again.consumed_by == f"{second}/approval"
        assert wait_for(first).status == "succeeded"
        assert wait_for(second).status == "succeeded"


def test_a_payload_against_the_schema_is_refused_naming_the_field(app: ConveyorCelery) -> None:
    with pytest.raises(InputValidationError) as refused:
        send_event("invoice.approved", key="x", payload={"approved": "maybe"}, app=app)
    fields = {f["field"] for f in refused.value.errors}
    assert {"payload.approved", "payload.by"} <= fields
    with get_db_session() as session:
        assert session.scalar(select(func.count()).select_from(InboxEvent)) == 0


def test_a_signal_completes_one_executions_wait(app: ConveyorCelery) -> None:
    with running_worker(app):
        execution_id = enqueue(approver, {"invoice": "inv-3"}, app=app)
        _waiting(execution_id, "approval")
        signal(execution_id, "approval", {"approved": False, "by": "cy"}, actor="cy", app=app)
        assert wait_for(execution_id).status == "succeeded"
    assert [(execution_id, "pay", {"approved": False, "by": "cy"})] == RAN
    with pytest.raises(WaitNotOpen, match="succeeded"):
        signal(execution_id, "approval", {"approved": True, "by": "cy"}, app=app)


def test_a_timed_out_wait_fails_with_wait_timed_out(app: ConveyorCelery) -> None:
    with running_worker(app):
        execution_id = enqueue(approver, {"invoice": "inv-4"}, app=app)
        _waiting(execution_id, "approval")
        with get_db_session(commit=True) as session:
            session.execute(
                update(StepExecution)
                .where(StepExecution.execution_id == execution_id)
                .where(StepExecution.step_name == "approval")
                .values(wake_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        assert app.engine.wake() == 1
        finished = wait_for(execution_id)
    assert finished.status == "failed"
    assert step_row(execution_id, "approval")["error"]["type"] == "WaitTimedOut"
    assert step_row(execution_id, "pay")["status"] == "skipped"


def test_a_sleeping_execution_holds_no_concurrency_slot(app: ConveyorCelery) -> None:
    with running_worker(app):
        first = enqueue(long_sleeper, {}, app=app)
        _waiting(first, "rest")
        second = enqueue(long_sleeper, {}, app=app)
        _waiting(second, "rest")  # admitted while the first sleeps
        wake(second, "rest", app=app)
        assert wait_for(second).status == "succeeded"
        assert step_row(first, "rest")["status"] == "waiting"


planner = Workflow("waits-planner")


@planner.step()
def plan(ctx: StepContext) -> dict[str, str]:
    return {"due_at": ctx.input["due_at"]}


def _due_at(ctx: StepContext, plan: dict[str, str]) -> datetime:
    return datetime.fromisoformat(plan["due_at"])


planner.sleep("until_due", depends_on=["plan"], until=_due_at)


@planner.step(depends_on=["until_due"])
def go(ctx: StepContext, until_due: str) -> str:
    RAN.append((ctx.execution_id, "go", until_due))
    return until_due


lenient = Workflow("waits-lenient")
lenient.wait(
    "maybe",
    event="lenient.answer",
    key=lambda ctx: ctx.input["id"],
    timeout=timedelta(hours=1),
    on_timeout={"answer": "no reply"},
)


@lenient.step(depends_on=["maybe"])
def use(ctx: StepContext, maybe: dict[str, str]) -> dict[str, str]:
    return maybe


@pytest.fixture
def more_app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    registry = WorkflowRegistry([planner, lenient])
    configure_registry(registry)
    RAN.clear()
    return create_app(clean_app_settings(database, redis_url), registry)


def test_a_wake_time_in_the_past_wakes_in_the_upstreams_transaction(
    more_app: ConveyorCelery,
) -> None:
    past = datetime(2020, 1, 1, tzinfo=UTC)
    with running_worker(more_app):
        execution_id = enqueue(planner, {"due_at": past.isoformat()}, app=more_app)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded"
    assert [(execution_id, "go", past.isoformat())] == RAN
    # No waker pass ran: the sleep ended where plan's completion entered it.
    assert _reasons(execution_id, "until_due") == ["upstream steps done", "wake time passed"]


def test_a_wait_whose_own_function_fails_fails_alone_and_its_upstream_stands(
    more_app: ConveyorCelery,
) -> None:
    with running_worker(more_app):
        execution_id = enqueue(planner, {"due_at": "2030-01-01T00:00:00"}, app=more_app)
        finished = wait_for(execution_id)
    assert finished.status == "failed"
    assert step_row(execution_id, "plan")["status"] == "succeeded"
    sleep = step_row(execution_id, "until_due")
    assert sleep["status"] == "failed"
    assert sleep["error"]["type"] == "InputValidationError"
    assert "timezone-aware" in sleep["error"]["message"]
    assert step_row(execution_id, "go")["status"] == "skipped"


def test_a_root_wait_times_out_to_its_on_timeout_value(more_app: ConveyorCelery) -> None:
    with running_worker(more_app):
        execution_id = enqueue(lenient, {"id": "a-1"}, app=more_app)
        row = _waiting(execution_id, "maybe")
        assert row["wait_key"] == "a-1"
        with get_db_session(commit=True) as session:
            session.execute(
                update(StepExecution)
                .where(StepExecution.execution_id == execution_id)
                .where(StepExecution.step_name == "maybe")
                .values(wake_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        more_app.engine.wake()
        finished = wait_for(execution_id)
    assert finished.status == "succeeded"
    assert finished.output_data == {"use": {"answer": "no reply"}}


def test_a_cancelled_execution_cancels_its_wait_and_a_later_event_is_kept(
    more_app: ConveyorCelery,
) -> None:
    with running_worker(more_app):
        execution_id = enqueue(lenient, {"id": "a-2"}, app=more_app)
        _waiting(execution_id, "maybe")
        assert more_app.engine.cancel(execution_id)
        receipt = send_event("lenient.answer", key="a-2", payload={"answer": "late"}, app=more_app)
    assert step_row(execution_id, "maybe")["status"] == "cancelled"
    assert receipt.consumed_by is None  # nobody waits: kept for a wait to come
