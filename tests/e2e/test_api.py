"""The HTTP API over real HTTP (uvicorn), on real databases, Redis and Celery workers."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2 as httpx
import pytest
from sqlalchemy import select, update

from conveyor.api.app import create_app
from core.database import get_db_session
from core.executions import StepSpec
from core.models import UserSession
from core.sql import utcnow
from tests.conftest import TestDatabase
from tests.helpers.api import client, poll, serve, user_with_token
from tests.helpers.processes import worker_process
from tests.helpers.state import force_execution_status, force_step_status, insert_execution
from worker.app import ConveyorCelery
from worker.producer import enqueue

FINAL = {"succeeded", "failed", "cancelled", "timed_out"}


def member(api_url: str, email: str) -> tuple[str, httpx.Client]:
    """A member's id and a client holding their token."""
    user_id, token = user_with_token(email)
    return user_id, client(api_url, token)


@pytest.mark.postgresql_only
def test_a_user_created_over_http_enqueues_and_follows_executions_run_by_a_worker_process(
    database: TestDatabase, redis_url: str, admin: httpx.Client, api_url: str, tmp_path: Path
) -> None:
    created = admin.post("/users", json={"email": "Ada@Example.com", "first_name": "Ada"})
    assert created.status_code == 201, created.text
    ada = created.json()
    assert ada["email"] == "ada@example.com"
    assert created.headers["location"] == f"/users/{ada['id']}"
    issued = admin.post("/tokens", json={"user_id": ada["id"], "name": "ci"})
    assert issued.status_code == 201, issued.text
    assert issued.json()["token"].startswith("cvy_")

    with (
        worker_process(database, redis_url, tmp_path / "worker.log"),
        client(api_url, issued.json()["token"]) as http,
    ):
        response = http.post("/executions", json={"workflow": "linear", "input": {"start": 3}})
        assert response.status_code == 201, response.text
        location = response.headers["location"]
        assert response.json()["triggered_by"] == ada["id"]

        done = poll(http, location, FINAL)
        assert done["status"] == "succeeded"
        assert done["output"] == {"describe": {"result": 7, "attempt": 1}}
        steps = {s["name"]: s for s in done["steps"]}  # type: ignore[attr-defined]
        assert {s["status"] for s in steps.values()} == {"succeeded"}
        assert all(s["worker"] for s in steps.values())
        history = [(e["step"], e["to_status"]) for e in done["events"]]  # type: ignore[attr-defined]
        assert history[0] == (None, "pending")
        assert history[-1] == (None, "succeeded")
        assert ("double", "succeeded") in history

        # A failing workflow, then a retry of it over HTTP: it runs again and fails again.
        failing = http.post("/executions", json={"workflow": "broken"}).json()
        failed = poll(http, f"/executions/{failing['execution_id']}", FINAL)
        assert failed["status"] == "failed"
        explode = next(s for s in failed["steps"] if s["name"] == "explode")  # type: ignore[attr-defined]
        assert explode["error"]["type"] == "ValueError"
        retried = http.post(f"/executions/{failing['execution_id']}/retry")
        assert retried.status_code == 200, retried.text
        assert retried.json()["attempt"] == 2
        again = poll(http, f"/executions/{failing['execution_id']}", FINAL)
        assert again["status"] == "failed"
        assert again["attempt"] == 2

        # A long step, cancelled over HTTP while it runs: it sees the cancellation and stops.
        slow = http.post("/executions", json={"workflow": "slow"}).json()
        poll(http, f"/executions/{slow['execution_id']}", {"running"})
        cancelled = http.post(
            f"/executions/{slow['execution_id']}/cancel", json={"reason": "no longer needed"}
        )
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        final = poll(http, f"/executions/{slow['execution_id']}", FINAL)
        assert final["status"] == "cancelled"
        reasons = [e["reason"] or "" for e in final["events"]]  # type: ignore[attr-defined]
        assert any("no longer needed (by ada@example.com)" in r for r in reasons)
        # Cancelling again is a no-op; retrying what succeeded is a conflict.
        assert http.post(f"/executions/{slow['execution_id']}/cancel").status_code == 200
        conflict = http.post(f"{location}/retry")
        assert conflict.status_code == 409
        assert conflict.headers["content-type"] == "application/problem+json"
        assert "only failed, cancelled or timed-out" in conflict.json()["detail"]


def test_enqueue_refuses_bad_requests_with_each_bad_field_and_writes_nothing(
    database: TestDatabase, admin: httpx.Client
) -> None:
    unknown = admin.post("/executions", json={"workflow": "nope"})
    assert unknown.status_code == 422
    assert unknown.json()["errors"][0]["field"] == "workflow"
    assert "no workflow 'nope'" in unknown.json()["errors"][0]["message"]

    bad_input = admin.post(
        "/executions", json={"workflow": "linear", "input": {"start": "x", "times": []}}
    )
    assert bad_input.status_code == 422
    assert bad_input.headers["content-type"] == "application/problem+json"
    assert {e["field"] for e in bad_input.json()["errors"]} == {"input.start", "input.times"}

    many = admin.post(
        "/executions",
        json={"workflow": "", "priority": 10, "deadline": "tomorrow", "colour": "red"},
    )
    assert many.status_code == 422
    fields = {e["field"] for e in many.json()["errors"]}
    assert fields == {"workflow", "priority", "deadline", "colour"}

    assert admin.get("/executions").json() == {"items": [], "next_cursor": None}


def test_tokens_are_required_and_refused_once_expired_or_revoked(
    database: TestDatabase, api_url: str, admin: httpx.Client
) -> None:
    with client(api_url, None) as anonymous:
        refused = anonymous.get("/executions")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/openapi.json").status_code == 200
    with client(api_url, "cvy_made-up") as forged:
        assert forged.get("/users/me").status_code == 401

    user_id, http = member(api_url, "bo@example.com")
    with http:
        assert http.get("/users/me").json()["id"] == user_id
        second = http.post("/tokens", json={"name": "laptop", "expires_in_days": 2}).json()
        listed = {t["id"]: t for t in http.get("/tokens").json()}
        assert "token" not in listed[second["id"]]
        assert listed[second["id"]]["name"] == "laptop"

        with client(api_url, second["token"]) as laptop:
            assert laptop.get("/users/me").status_code == 200
            assert http.delete(f"/tokens/{second['id']}").status_code == 204
            assert laptop.get("/users/me").status_code == 401

        # An expired token: the same request a moment after its expiry is refused.
        with get_db_session(commit=True) as db:
            db.execute(
                update(UserSession)
                .where(UserSession.user_id == user_id)
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        expired = http.get("/users/me")
        assert expired.status_code == 401
        assert expired.json()["detail"] == "the API token is not valid"


def test_members_see_and_act_on_their_own_executions_and_admins_on_all(
    database: TestDatabase, api_url: str, admin: httpx.Client
) -> None:
    alice_id, alice = member(api_url, "alice@example.com")
    _, bob = member(api_url, "bob@example.com")
    with alice, bob:
        mine = alice.post("/executions", json={"workflow": "linear", "input": {"start": 1}})
        execution_id = mine.json()["execution_id"]
        path = f"/executions/{execution_id}"
        assert alice.get(path).status_code == 200
        for response in (
            bob.get(path),
            bob.post(f"{path}/cancel"),
            bob.post(f"{path}/retry"),
        ):
            assert response.status_code == 404
            assert execution_id in response.json()["detail"]
        assert bob.get("/executions").json()["items"] == []
        assert [e["execution_id"] for e in admin.get("/executions").json()["items"]] == [
            execution_id
        ]
        assert admin.get(path).json()["triggered_by"] == alice_id

        # Admin-only acts are refused to members with 403.
        assert bob.post("/users", json={"email": "eve@example.com"}).status_code == 403
        assert bob.post("/tokens", json={"user_id": alice_id}).status_code == 403
        assert bob.get("/tokens", params={"user_id": alice_id}).status_code == 403
        assert bob.get(f"/users/{alice_id}").status_code == 404
        # Keys are each user's own: the same key is Bob's own execution, not Alice's
        # (tests/e2e/test_idempotency_keys.py holds the rest of it).
        keyed = {"workflow": "linear", "input": {"start": 1}, "idempotency_key": "k-1"}
        alices = alice.post("/executions", json=keyed)
        assert alices.status_code == 201
        assert alice.post("/executions", json=keyed).status_code == 200
        bobs = bob.post("/executions", json=keyed)
        assert bobs.status_code == 201
        assert bobs.json()["execution_id"] != alices.json()["execution_id"]


def test_a_duplicate_email_is_a_conflict(database: TestDatabase, admin: httpx.Client) -> None:
    assert admin.post("/users", json={"email": "sam@example.com"}).status_code == 201
    again = admin.post("/users", json={"email": "SAM@example.com", "role": "admin"})
    assert again.status_code == 409
    assert again.json()["detail"] == "a user with email 'sam@example.com' already exists"


def test_pages_neither_skip_nor_repeat_rows_while_others_are_inserted(
    database: TestDatabase, conveyor_app: ConveyorCelery, api_url: str
) -> None:
    owner_id, http = member(api_url, "pager@example.com")
    before = {
        enqueue("linear", {"start": n}, triggered_by=owner_id, app=conveyor_app) for n in range(60)
    }
    stop = threading.Event()
    grew = threading.Condition()
    inserted: list[str] = []

    def insert_meanwhile() -> None:
        while not stop.is_set():
            execution_id = enqueue("linear", {"start": -1}, triggered_by=owner_id, app=conveyor_app)
            with grew:
                inserted.append(execution_id)
                grew.notify_all()

    writer = threading.Thread(target=insert_meanwhile)
    writer.start()
    seen: list[str] = []
    cursor: str | None = None
    try:
        with http:
            while True:
                mark = len(inserted)
                params: dict[str, str | int] = {"limit": 7}
                if cursor:
                    params["cursor"] = cursor
                page = http.get("/executions", params=params).json()
                seen.extend(e["execution_id"] for e in page["items"])
                cursor = page["next_cursor"]
                if cursor is None:
                    break
                # Rows were inserted between this page and the next (with OFFSET paging
                # each would push a row seen already onto the next page).
                with grew:
                    assert grew.wait_for(lambda: len(inserted) > mark, timeout=30)  # noqa: B023 (used now)
    finally:
        stop.set()
        writer.join()
    assert len(seen) == len(set(seen)), "a row was repeated"
    assert before <= set(seen), "a row that existed before paging began was skipped"


def test_listing_filters_by_status_workflow_and_time(
    database: TestDatabase, conveyor_app: ConveyorCelery, admin: httpx.Client
) -> None:
    first = enqueue("linear", {"start": 1}, app=conveyor_app)
    middle = datetime.now(UTC)
    # created_at comes from the database's clock, which on SQLite counts milliseconds:
    # the second execution is created once that clock has passed ``middle`` (at most a
    # millisecond), or both could carry the millisecond ``middle`` falls in.
    with get_db_session() as db:
        while db.execute(select(utcnow())).scalar_one() <= middle:
            pass
    second = enqueue("broken", None, app=conveyor_app)
    ids = lambda response: [e["execution_id"] for e in response.json()["items"]]  # noqa: E731
    assert ids(admin.get("/executions")) == [second, first]
    assert ids(admin.get("/executions", params={"workflow": "broken"})) == [second]
    assert ids(admin.get("/executions", params={"status": ["pending", "failed"]})) == [
        second,
        first,
    ]
    assert ids(admin.get("/executions", params={"status": "failed"})) == []
    after = admin.get("/executions", params={"created_after": middle.isoformat()})
    assert ids(after) == [second]
    assert ids(admin.get("/executions", params={"created_before": middle.isoformat()})) == [first]
    bad = admin.get("/executions", params={"status": "finished", "cursor": "garbage!"})
    assert bad.status_code == 422
    assert {e["field"] for e in bad.json()["errors"]} == {"status.0"}
    assert admin.get("/executions", params={"cursor": "garbage"}).status_code == 422


def test_workflows_list_their_steps_and_input_schema(
    database: TestDatabase, admin: httpx.Client
) -> None:
    listed = {w["name"]: w for w in admin.get("/workflows").json()}
    linear = listed["linear"]
    assert linear["input_schema"]["properties"]["start"]["type"] == "integer"
    assert [(s["name"], s["depends_on"]) for s in linear["steps"]][:2] == [
        ("double", []),
        ("add_one", ["double"]),
    ]
    assert admin.get("/workflows/linear").json() == linear
    assert admin.get("/workflows/nope").status_code == 404


def test_health_names_what_is_unreachable(
    database: TestDatabase, conveyor_app: ConveyorCelery, api_url: str
) -> None:
    with client(api_url, None) as http:
        health = http.get("/healthz")
        assert health.json() == {
            "status": "ok",
            "database": {"status": "ok", "detail": None},
            "broker": {"status": "ok", "detail": None},
        }
        ready = http.get("/readyz").json()
        assert ready["status"] == "ok", ready
    conveyor_app.conf.broker_url = "redis://127.0.0.1:1/0"
    with serve(create_app(conveyor_app)) as url, client(url, None) as http:
        down = http.get("/healthz")
        assert down.status_code == 503
        assert down.json()["database"]["status"] == "ok"
        assert down.json()["broker"]["status"] == "error"


def test_an_oversize_body_is_refused_unread(database: TestDatabase, admin: httpx.Client) -> None:
    huge = {"workflow": "linear", "input": {"start": 1, "pad": "x" * 3_000_000}}
    response = admin.post("/executions", json=huge)
    assert response.status_code == 413
    assert "CONVEYOR_API_MAX_BODY_BYTES" in response.json()["detail"]
    assert admin.get("/executions").json()["items"] == []


def test_metrics_are_served_to_admins_with_the_open_steps_of_every_workflow(
    database: TestDatabase, api_url: str, admin: httpx.Client
) -> None:
    execution_id = insert_execution("linear", {"start": 1}, steps=[StepSpec("double")])
    force_execution_status(execution_id, "running")
    force_step_status(execution_id, "double", "queued")
    scraped = admin.get("/metrics", follow_redirects=False)
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    assert 'conveyor_steps_queued{queue="conveyor",workflow="linear"} 1.0' in scraped.text
    _, bob = member(api_url, "bob@example.com")
    with bob, client(api_url, None) as anonymous:
        assert bob.get("/metrics").status_code == 403
        assert anonymous.get("/metrics").status_code == 401
