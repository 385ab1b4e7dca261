"""Limits over HTTP: the keys listed with what they hold and hold back, a held step's key
in its execution's detail, the keys' gauges on ``/metrics``, and an admin's pause and
resume of a key (and who may see and do what, the dashboard's Limits page included),
through the API (uvicorn), a real in-process worker, database and broker. The workflows
are tests/e2e/limit_workflows.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2 as httpx
import pytest

from conveyor.api.auth import UI_HEADER
from core.accounts import Role
from tests.e2e.limit_workflows import (
    BATCH_KEY,
    GATE,
    GPU_KEY,
    HOURLY_KEY,
    METERED_KEY,
    batch,
    gated,
    hourly,
    metered,
)
from tests.e2e.test_dashboard import logged_in
from tests.helpers.api import client, poll, user_with_token
from worker.app import ConveyorCelery

FINAL = {"succeeded", "failed", "cancelled", "timed_out"}


@pytest.fixture
def limited(worker: ConveyorCelery) -> Iterator[ConveyorCelery]:
    """The running worker's app with the limited workflows; the gate opened at the end
    (before the worker stops, which waits for its running steps)."""
    for workflow in (gated, metered, hourly, batch):
        worker.engine.registry.register(workflow)
    GATE.clear()
    yield worker
    GATE.set()


@pytest.fixture
def member(api_url: str) -> Iterator[httpx.Client]:
    """A client of the API holding a member's token."""
    _, token = user_with_token("mia@example.com")
    with client(api_url, token) as http:
        yield http


def _start(http: httpx.Client, workflow: str) -> str:
    response = http.post("/executions", json={"workflow": workflow})
    assert response.status_code == 201, response.text
    execution_id: str = response.json()["execution_id"]
    return execution_id


def _step_when(
    http: httpx.Client, execution_id: str, name: str, ready: Callable[[Any], bool]
) -> Any:
    """Step ``name`` of the execution once ``ready(step)``, or fail after 20 s."""
    deadline = time.monotonic() + 20
    while True:
        body = http.get(f"/executions/{execution_id}").json()
        step = next(s for s in body["steps"] if s["name"] == name)
        if ready(step):
            return step
        if time.monotonic() > deadline:
            pytest.fail(f"step {name} of {execution_id} stayed {step['status']}: {step}")
        time.sleep(0.05)


def _held(step: Any) -> bool:
    return bool(step["status"] == "waiting" and step["wait"] and step["wait"]["key"])


def _reasons(http: httpx.Client, execution_id: str) -> list[str]:
    return [e["reason"] for e in http.get(f"/executions/{execution_id}").json()["events"]]


def test_a_step_held_by_its_key_is_listed_described_and_measured(
    limited: ConveyorCelery, admin: httpx.Client, member: httpx.Client
) -> None:
    first = _start(admin, gated.name)
    _step_when(admin, first, "render", lambda s: s["status"] == "running")
    second = _start(admin, gated.name)

    held = _step_when(admin, second, "render", _held)
    assert held["kind"] == "task"  # a task behind limits, not a wait node
    wait = held["wait"]
    assert (wait["kind"], wait["key"], wait["why"], wait["wake_at"]) == (
        "key",
        GPU_KEY,
        "concurrency",
        None,
    )
    assert wait["since"] is not None
    # A member sees every key's counts (the admin's executions here): keys are shared.
    listed = member.get("/limits", params={"key": GPU_KEY})
    assert listed.status_code == 200, listed.text
    assert listed.json() == [
        {
            "key": GPU_KEY,
            "limit": 1,
            "running": 1,
            "waiting": 1,
            "rate_per_second": None,
            "paused_until": None,
        }
    ]
    assert GPU_KEY in {k["key"] for k in member.get("/limits").json()}
    assert member.get("/limits", params={"key": "no-such-key"}).json() == []
    scraped = admin.get("/metrics").text
    assert f'conveyor_key_running{{key="{GPU_KEY}"}} 1.0' in scraped
    assert f'conveyor_key_waiting{{key="{GPU_KEY}"}} 1.0' in scraped

    GATE.set()
    for execution_id in (first, second):
        assert poll(admin, f"/executions/{execution_id}", FINAL)["status"] == "succeeded"
    (after,) = member.get("/limits", params={"key": GPU_KEY}).json()
    assert (after["running"], after["waiting"]) == (0, 0)
    assert f"held: key {GPU_KEY} has no free slot" in _reasons(admin, second)
    scraped = admin.get("/metrics").text
    assert f'conveyor_key_waiting{{key="{GPU_KEY}"}} 0.0' in scraped


def test_an_admin_pauses_a_key_and_resuming_it_admits_what_it_held(
    limited: ConveyorCelery, admin: httpx.Client, member: httpx.Client
) -> None:
    until = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    path = f"/limits/{METERED_KEY}/pause"
    # A key exists once something under it was admitted or held: a typo is a 404.
    unknown = admin.post(path, json={"until": until.isoformat()})
    assert unknown.status_code == 404, unknown.text
    assert METERED_KEY in unknown.json()["detail"]
    assert admin.delete(path).status_code == 404
    first = _start(admin, metered.name)
    assert poll(admin, f"/executions/{first}", FINAL)["status"] == "succeeded"

    assert member.post(path, json={"until": until.isoformat()}).status_code == 403
    assert member.delete(path).status_code == 403
    past = admin.post(path, json={"until": "2020-01-01T00:00:00Z"})
    assert past.status_code == 422, past.text
    assert [e["field"] for e in past.json()["errors"]] == ["until"]
    paused = admin.post(path, json={"until": until.isoformat()})
    assert paused.status_code == 200, paused.text
    assert datetime.fromisoformat(paused.json()["paused_until"]) == until
    assert paused.json()["rate_per_second"] == pytest.approx(100.0)

    second = _start(admin, metered.name)
    wait = _step_when(admin, second, "call", _held)["wait"]
    assert (wait["kind"], wait["key"], wait["why"]) == ("key", METERED_KEY, "paused")
    assert datetime.fromisoformat(wait["wake_at"]) == until
    (listed,) = member.get("/limits", params={"key": METERED_KEY}).json()
    assert listed["waiting"] == 1
    assert datetime.fromisoformat(listed["paused_until"]) == until

    resumed = admin.delete(path)
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["paused_until"] is None
    assert poll(admin, f"/executions/{second}", FINAL)["status"] == "succeeded"
    reasons = _reasons(admin, second)
    assert f"held: key {METERED_KEY} is paused" in reasons
    assert "admitted" in reasons


def test_a_step_a_rate_holds_back_says_when_it_may_start(
    limited: ConveyorCelery, admin: httpx.Client
) -> None:
    first = _start(admin, hourly.name)
    assert poll(admin, f"/executions/{first}", FINAL)["status"] == "succeeded"
    second = _start(admin, hourly.name)
    wait = _step_when(admin, second, "report", _held)["wait"]
    assert (wait["kind"], wait["key"], wait["why"]) == ("key", HOURLY_KEY, "rate")
    # Once an hour: the next start is about an hour after the first.
    left = datetime.fromisoformat(wait["wake_at"]) - datetime.now(UTC)
    assert timedelta(minutes=55) < left <= timedelta(hours=1)
    (listed,) = admin.get("/limits", params={"key": HOURLY_KEY}).json()
    assert listed["rate_per_second"] == pytest.approx(1 / 3600)
    assert (listed["limit"], listed["running"], listed["waiting"]) == (None, 0, 1)
    cancelled = admin.post(f"/executions/{second}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    (after,) = admin.get("/limits", params={"key": HOURLY_KEY}).json()
    assert after["waiting"] == 0


def test_resuming_a_workflows_own_key_starts_the_executions_it_kept_pending(
    limited: ConveyorCelery, admin: httpx.Client
) -> None:
    first = _start(admin, batch.name)
    assert poll(admin, f"/executions/{first}", FINAL)["status"] == "succeeded"
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    paused = admin.post(f"/limits/{BATCH_KEY}/pause", json={"until": until})
    assert paused.status_code == 200, paused.text
    second = _start(admin, batch.name)
    # Held at its start: pending (its admission retries within a minute, at most).
    held = admin.get(f"/executions/{second}").json()
    assert held["status"] == "pending"
    assert admin.delete(f"/limits/{BATCH_KEY}/pause").status_code == 200
    # Admitted at the resume itself, not at the retry a minute on.
    done = poll(admin, f"/executions/{second}", FINAL, timeout=20)
    assert done["status"] == "succeeded"


def test_the_limits_page_needs_a_login_and_gives_only_admins_the_pause(
    limited: ConveyorCelery, api_url: str, admin: httpx.Client
) -> None:
    assert poll(admin, f"/executions/{_start(admin, metered.name)}", FINAL)["status"] == (
        "succeeded"
    )
    with httpx.Client(base_url=api_url, timeout=30, follow_redirects=False) as anonymous:
        response = anonymous.get("/ui/limits")
        assert response.status_code == 303
        assert response.headers["location"].startswith("/ui/login?next=")
    until = {"until": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}
    _, member_token = user_with_token("max@example.com")
    with logged_in(api_url, member_token) as member:
        shown = member.get(f"/ui/limits?key={METERED_KEY}")
        assert shown.status_code == 200
        assert f'data-key="{METERED_KEY}"' in shown.text
        assert "<th>Pause</th>" not in shown.text
        assert "default-src 'self'" in shown.headers["content-security-policy"]
        # A pause sent by cookie: without the dashboard's header (a forged form), then
        # with it by a member: both refused, and the key is not paused.
        path = f"/limits/{METERED_KEY}/pause"
        assert member.post(path, json=until).status_code == 403
        assert member.post(path, json=until, headers={UI_HEADER: "1"}).status_code == 403
    (listed,) = admin.get("/limits", params={"key": METERED_KEY}).json()
    assert listed["paused_until"] is None
    _, admin_token = user_with_token("ada@example.com", Role.ADMIN)
    with logged_in(api_url, admin_token) as root:
        assert "<th>Pause</th>" in root.get("/ui/limits").text
        paused = root.post(path, json=until, headers={UI_HEADER: "1"})
        assert paused.status_code == 200, paused.text
