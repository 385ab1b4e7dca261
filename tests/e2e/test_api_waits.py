"""Waits over HTTP: events, signals and early wakes through the API (uvicorn), a real
in-process worker, database and broker; what waiting steps show; the waiting listing
and gauge. The workflows are tests/e2e/wait_workflows.py's (``invoice-approval``: request
-> approval wait -> pay; ``nap``: a one-hour sleep -> wake_up).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx2 as httpx
import pytest
from sqlalchemy import update

from core.database import get_db_session
from core.executions import StepSpec
from core.models import InboxEvent, WorkflowExecution
from tests.conftest import TestDatabase
from tests.e2e.conftest import running_worker
from tests.helpers.api import client, poll, user_with_token
from tests.helpers.state import count, force_execution_status, force_step_status, insert_execution
from worker.app import ConveyorCelery

FINAL = {"succeeded", "failed", "cancelled", "timed_out"}


@pytest.fixture
def member(api_url: str) -> Iterator[httpx.Client]:
    """A client of the API holding a member's token."""
    _, token = user_with_token("ann@example.com")
    with client(api_url, token) as http:
        yield http


def _start(http: httpx.Client, workflow: str, data: Any = None) -> str:
    response = http.post("/executions", json={"workflow": workflow, "input": data})
    assert response.status_code == 201, response.text
    execution_id: str = response.json()["execution_id"]
    return execution_id


def _waiting(http: httpx.Client, execution_id: str, step: str, timeout: float = 20) -> Any:
    """The execution's body once ``step`` waits, armed (a wake time or an event), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(f"/executions/{execution_id}").json()
        found = next(s for s in body["steps"] if s["name"] == step)
        wait = found["wait"]
        if wait is not None and (wait["wake_at"] or wait["event"]):
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"step {step} of {execution_id} is {found['status']}, not waiting")
        time.sleep(0.05)


def _listed(http: httpx.Client, execution_id: str, status: str, timeout: float = 20) -> None:
    """Return once ``GET /executions?status=STATUS`` lists the execution, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get("/executions", params={"status": status})
        assert response.status_code == 200, response.text
        if execution_id in {e["execution_id"] for e in response.json()["items"]}:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{execution_id} is not listed as {status}")
        time.sleep(0.05)


def _step(body: Any, name: str) -> Any:
    return next(s for s in body["steps"] if s["name"] == name)


def test_an_event_sent_over_http_before_its_wait_exists_completes_the_execution(
    database: TestDatabase, conveyor_app: ConveyorCelery, admin: httpx.Client
) -> None:
    execution_id = _start(admin, "invoice-approval", {"invoice_id": "inv-42"})
    event = {
        "name": "invoice.approved",
        "key": "inv-42",
        "payload": {"approved": True, "note": "ok by finance"},
        "idempotency_key": "approve-inv-42",
    }
    sent = admin.post("/events", json=event)
    assert sent.status_code == 201, sent.text
    assert sent.json()["consumed_by"] is None  # nobody waits yet: kept
    assert sent.json()["duplicate"] is False
    again = admin.post("/events", json=event)
    assert again.status_code == 200, again.text
    assert again.json() == {**sent.json(), "duplicate": True}
    other = admin.post("/events", json={**event, "payload": {"approved": False}})
    assert other.status_code == 409, other.text
    assert "approve-inv-42" in other.json()["detail"]
    assert count(InboxEvent) == 1

    with running_worker(conveyor_app):
        done: Any = poll(admin, f"/executions/{execution_id}", FINAL)
    assert done["status"] == "succeeded", done
    assert done["output"] == {"pay": {"paid": True, "note": "ok by finance"}}
    approval = _step(done, "approval")
    assert approval["kind"] == "event"
    assert approval["wait"] is None  # no longer waiting
    assert approval["output"] == {"approved": True, "note": "ok by finance"}


def test_a_bad_payload_is_refused_naming_its_fields_and_nothing_is_stored(
    database: TestDatabase, admin: httpx.Client
) -> None:
    refused = admin.post(
        "/events",
        json={"name": "invoice.approved", "key": "inv-1", "payload": {"approved": "maybe"}},
    )
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert {e["field"] for e in refused.json()["errors"]} == {"payload.approved"}
    unknown_field = admin.post(
        "/events", json={"name": "invoice.approved", "key": "inv-1", "colour": "red"}
    )
    assert unknown_field.status_code == 422
    assert count(InboxEvent) == 0


def test_only_admins_send_events(
    database: TestDatabase, api_url: str, member: httpx.Client
) -> None:
    body = {"name": "invoice.approved", "key": "inv-1", "payload": {"approved": True}}
    forbidden = member.post("/events", json=body)
    assert forbidden.status_code == 403, forbidden.text
    with client(api_url, None) as anonymous:
        assert anonymous.post("/events", json=body).status_code == 401
    assert count(InboxEvent) == 0


def test_a_signal_completes_a_members_approval_and_a_finished_one_is_a_conflict(
    database: TestDatabase, conveyor_app: ConveyorCelery, api_url: str, member: httpx.Client
) -> None:
    _, other_token = user_with_token("bob@example.com")
    with running_worker(conveyor_app), client(api_url, other_token) as bob:
        execution_id = _start(member, "invoice-approval", {"invoice_id": "inv-7"})
        body = _waiting(member, execution_id, "approval")
        approval = _step(body, "approval")
        assert approval["status"] == "waiting"
        assert approval["kind"] == "event"
        wait = approval["wait"]
        assert wait["kind"] == "event"
        assert (wait["event"], wait["key"], wait["child_execution_id"]) == (
            "invoice.approved",
            "inv-7",
            None,
        )
        assert wait["since"] is not None
        assert wait["wake_at"] is not None  # its 7-day timeout
        request = _step(body, "request")
        assert (request["kind"], request["wait"]) == ("task", None)
        assert (body["parent_execution_id"], body["depth"]) == (None, 0)
        assert body["children"] == []
        # Parked: every open step waits, so it is listed as waiting (and still running).
        _listed(member, execution_id, "waiting")
        parked = member.get(f"/executions/{execution_id}").json()
        assert parked["status"] == "running"
        assert parked["parked_at"] is not None
        assert execution_id in {
            e["execution_id"]
            for e in member.get(
                "/executions", params=[("status", "waiting"), ("status", "failed")]
            ).json()["items"]
        }
        assert member.get("/executions", params={"status": "succeeded"}).json()["items"] == []
        assert member.get("/executions", params={"status": "asleep"}).status_code == 422

        # Another member does not see it; a bad payload is refused, nothing consumed.
        assert bob.post(f"/executions/{execution_id}/signals/approval", json={}).status_code == 404
        bad = member.post(
            f"/executions/{execution_id}/signals/approval", json={"payload": {"note": 3}}
        )
        assert bad.status_code == 422, bad.text
        assert {e["field"] for e in bad.json()["errors"]} == {
            "payload.approved",
            "payload.note",
        }
        assert count(InboxEvent) == 0
        unknown = member.post(f"/executions/{execution_id}/signals/nope", json={"payload": {}})
        assert unknown.status_code == 404, unknown.text

        signalled = member.post(
            f"/executions/{execution_id}/signals/approval",
            json={"payload": {"approved": False, "note": "duplicate invoice"}},
        )
        assert signalled.status_code == 200, signalled.text
        assert signalled.json()["consumed_by"] == f"{execution_id}/approval"
        done: Any = poll(member, f"/executions/{execution_id}", FINAL)
    assert done["status"] == "succeeded", done
    assert done["output"] == {"pay": {"paid": False, "note": "duplicate invoice"}}
    reasons = [e["reason"] or "" for e in done["events"] if e["step"] == "approval"]
    assert any("ann@example.com" in r for r in reasons), reasons

    late = member.post(
        f"/executions/{execution_id}/signals/approval", json={"payload": {"approved": True}}
    )
    assert late.status_code == 409, late.text
    assert late.json()["detail"] == f"execution {execution_id} is succeeded"


def test_a_sleep_takes_no_signal_and_an_early_wake_completes_it(
    database: TestDatabase, conveyor_app: ConveyorCelery, admin: httpx.Client
) -> None:
    with running_worker(conveyor_app):
        execution_id = _start(admin, "nap")
        body = _waiting(admin, execution_id, "nap")
        nap = _step(body, "nap")
        assert (nap["status"], nap["kind"], nap["wait"]["kind"]) == ("waiting", "sleep", "sleep")
        assert (nap["wait"]["event"], nap["wait"]["key"]) == (None, None)
        slept = _iso(nap["wait"]["wake_at"]) - _iso(nap["wait"]["since"])
        assert timedelta(minutes=59) < slept < timedelta(minutes=61)

        signalled = admin.post(f"/executions/{execution_id}/signals/nap", json={"payload": 1})
        assert signalled.status_code == 422, signalled.text
        assert signalled.json()["errors"][0]["field"] == "step"
        assert "use wake" in signalled.json()["detail"]
        task = admin.post(f"/executions/{execution_id}/steps/wake_up/wake")
        assert task.status_code == 422, task.text
        assert admin.post(f"/executions/{execution_id}/steps/nope/wake").status_code == 404
        assert admin.post("/executions/no-such-id/steps/nap/wake").status_code == 404

        woken = admin.post(f"/executions/{execution_id}/steps/nap/wake")
        assert woken.status_code == 200, woken.text
        assert woken.json()["status"] == "succeeded"
        assert woken.json()["wait"] is None
        done: Any = poll(admin, f"/executions/{execution_id}", FINAL)
    assert done["status"] == "succeeded", done
    reasons = [e["reason"] for e in done["events"] if e["step"] == "nap"]
    assert "woken early by root@example.com" in reasons
    again = admin.post(f"/executions/{execution_id}/steps/nap/wake")
    assert again.status_code == 409, again.text
    assert again.json()["detail"] == f"execution {execution_id} is succeeded"


def test_a_wait_that_ended_is_a_conflict_naming_its_status(
    database: TestDatabase, admin: httpx.Client
) -> None:
    # Rows as a running execution has them once its wait nodes ended (no worker runs
    # here, so nothing moves them on).
    running = insert_execution(
        "nap", None, steps=[StepSpec("nap", wait_kind="sleep"), StepSpec("wake_up", 1)]
    )
    force_execution_status(running, "running")
    force_step_status(running, "nap", "succeeded")
    ended = admin.post(f"/executions/{running}/steps/nap/wake")
    assert ended.status_code == 409, ended.text
    assert ended.json()["detail"] == "step nap is succeeded"
    approval = insert_execution(
        "invoice-approval",
        {"invoice_id": "inv-5"},
        steps=[StepSpec("request"), StepSpec("approval", 1, wait_kind="event"), StepSpec("pay", 1)],
    )
    force_execution_status(approval, "running")
    force_step_status(approval, "approval", "cancelled")
    signalled = admin.post(
        f"/executions/{approval}/signals/approval", json={"payload": {"approved": True}}
    )
    assert signalled.status_code == 409, signalled.text
    assert signalled.json()["detail"] == "step approval is cancelled"
    assert count(InboxEvent) == 0
    # A cancelled execution: the execution is named.
    cancelled = _start(admin, "nap")
    assert admin.post(f"/executions/{cancelled}/cancel").status_code == 200
    conflict = admin.post(f"/executions/{cancelled}/steps/nap/wake")
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["detail"] == f"execution {cancelled} is cancelled"


def test_the_gauge_counts_waiting_steps_by_workflow_and_kind(
    database: TestDatabase, conveyor_app: ConveyorCelery, admin: httpx.Client
) -> None:
    with running_worker(conveyor_app):
        first = _start(admin, "nap")
        second = _start(admin, "nap")
        approval = _start(admin, "invoice-approval", {"invoice_id": "inv-9"})
        for execution_id, step in ((first, "nap"), (second, "nap"), (approval, "approval")):
            _waiting(admin, execution_id, step)
        scraped = admin.get("/metrics").text
        assert 'conveyor_steps_waiting{kind="sleep",workflow="nap"} 2.0' in scraped
        assert 'conveyor_steps_waiting{kind="event",workflow="invoice-approval"} 1.0' in scraped
        sent = admin.post(
            "/events",
            json={"name": "invoice.approved", "key": "inv-9", "payload": {"approved": True}},
        )
        assert sent.json()["consumed_by"] == f"{approval}/approval"
        assert admin.post(f"/executions/{first}/steps/nap/wake").status_code == 200
        poll(admin, f"/executions/{approval}", FINAL)
        poll(admin, f"/executions/{first}", FINAL)
        scraped = admin.get("/metrics").text
    assert 'conveyor_steps_waiting{kind="sleep",workflow="nap"} 1.0' in scraped
    assert 'conveyor_steps_waiting{kind="event",workflow="invoice-approval"}' not in scraped
    # The counters of this process (the API's and the worker's, in this test's process).
    assert 'conveyor_events_total{outcome="consumed"}' in scraped
    assert 'conveyor_waits_woken_total{how="early",kind="sleep",workflow="nap"}' in scraped
    assert 'conveyor_waits_woken_total{how="event",kind="event",workflow="invoice-approval"}' in (
        scraped
    )


def test_workflows_describe_their_wait_nodes_and_executions_their_children(
    database: TestDatabase, admin: httpx.Client
) -> None:
    described = admin.get("/workflows/invoice-approval")
    assert described.status_code == 200, described.text
    steps = {s["name"]: s for s in described.json()["steps"]}
    assert (steps["request"]["kind"], steps["request"]["wait"]) == ("task", None)
    wait = steps["approval"]["wait"]
    assert steps["approval"]["kind"] == wait["kind"] == "event"
    assert wait["event"] == "invoice.approved"
    assert wait["timeout_seconds"] == timedelta(days=7).total_seconds()
    schema = wait["payload_schema"]
    assert set(schema["properties"]) == {"approved", "note"}
    assert schema["required"] == ["approved"]
    nap = {s["name"]: s for s in admin.get("/workflows/nap").json()["steps"]}["nap"]
    assert nap["wait"]["kind"] == "sleep"
    assert nap["wait"]["duration_seconds"] == 3600.0
    assert nap["wait"]["payload_schema"] is None

    # A parent lists the executions its child nodes started (rows written by hand: this
    # reads them, whoever writes them).
    parent = insert_execution("linear", {"start": 1}, steps=[StepSpec("double")])
    child = insert_execution("linear", {"start": 2}, steps=[StepSpec("double")])
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == child)
            .values(
                parent_execution_id=parent,
                parent_step_name="load",
                parent_attempt=1,
                root_execution_id=parent,
                depth=1,
            )
        )
    body = admin.get(f"/executions/{parent}").json()
    assert body["children"] == [
        {"execution_id": child, "workflow": "linear", "status": "pending", "step": "load"}
    ]
    child_body = admin.get(f"/executions/{child}").json()
    assert (child_body["parent_execution_id"], child_body["root_execution_id"]) == (parent, parent)
    assert child_body["depth"] == 1


def _iso(text: str) -> datetime:
    return datetime.fromisoformat(text)
