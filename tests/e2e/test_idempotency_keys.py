"""Idempotency keys over HTTP: each user's keys are their own, and `schedule:` keys
belong to schedules.

The API is served for real (uvicorn) on an app with a scheduled workflow and Kombu's
in-memory broker: starts are published and go nowhere, as no test here runs steps.
Schedules fire through ``worker.schedules.fire_schedules`` with the clock given.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx2 as httpx
import pytest
from pydantic import BaseModel
from sqlalchemy import select

from conveyor.api.app import create_app as create_api
from core.config import Settings
from core.database import get_db_session
from core.models import WorkflowExecution
from core.registry import WorkflowRegistry
from core.schedules import Schedule, tick_key
from core.workflows import StepContext, Workflow
from tests.conftest import TestDatabase
from tests.helpers.api import client, serve, user_with_token
from worker.app import ConveyorCelery, create_app
from worker.schedules import fire_schedules

T0 = datetime(2026, 11, 25, 10, 0, 30, tzinfo=UTC)
FIVE = timedelta(minutes=5)
EVERY_FIVE = Schedule(every=FIVE, input={"scope": "recent"}, name="recent")


class Scope(BaseModel):
    scope: str


report = Workflow("report", input_model=Scope, schedules=[EVERY_FIVE])


@report.step()
def build(ctx: StepContext) -> str:
    return str(ctx.input.scope)


@pytest.fixture
def app(database: TestDatabase) -> ConveyorCelery:
    """An app on the test database and the in-memory broker, with ``report``."""
    settings = Settings(
        database_url=database.url,
        broker_url="memory://localhost/",
        db_retry_initial_wait=0.01,
        db_retry_max_wait=0.2,
    )
    return create_app(settings, WorkflowRegistry([report]))


@pytest.fixture
def api_url(app: ConveyorCelery) -> Iterator[str]:
    """The HTTP API of ``app``, served by uvicorn."""
    with serve(create_api(app)) as url:
        yield url


def member(api_url: str, email: str) -> tuple[str, httpx.Client]:
    """A member's id and a client holding their token."""
    user_id, token = user_with_token(email)
    return user_id, client(api_url, token)


def by_key(key: str) -> list[tuple[str, str | None, str]]:
    """(workflow, triggered_by, scope) of each execution holding ``key``."""
    with get_db_session() as db:
        rows = db.execute(
            select(
                WorkflowExecution.workflow_id,
                WorkflowExecution.triggered_by,
                WorkflowExecution.idempotency_scope,
            ).where(WorkflowExecution.idempotency_key == key)
        ).all()
    return [(r.workflow_id, r.triggered_by, r.idempotency_scope) for r in rows]


def test_a_member_cannot_take_a_future_ticks_key_and_the_tick_still_runs(
    app: ConveyorCelery, api_url: str
) -> None:
    assert fire_schedules(app, now=T0) == []  # the schedule's row: next tick 10:05
    tick = datetime(2026, 11, 25, 10, 5, tzinfo=UTC)
    key = tick_key("report", EVERY_FIVE, tick)
    _, mallory = member(api_url, "mallory@example.com")
    with mallory:
        for body in (
            {"workflow": "report", "input": {"scope": "recent"}, "idempotency_key": key},
            {"workflow": "report", "input": {"scope": "mine"}, "idempotency_key": key},
            {"workflow": "report", "input": {"scope": "mine"}, "idempotency_key": "schedule:"},
        ):
            taken = mallory.post("/executions", json=body)
            assert taken.status_code == 422, taken.text
            problem = taken.json()
            assert [e["field"] for e in problem["errors"]] == ["idempotency_key"]
            assert "'schedule:'" in problem["detail"]
            assert "reserved" in problem["detail"]
    assert by_key(key) == []

    [fired] = fire_schedules(app, now=tick + timedelta(seconds=1))
    assert (fired.tick, fired.advanced) == (tick, True)
    assert fired.execution_id is not None
    assert by_key(key) == [("report", None, "")]


def test_each_user_has_their_own_keys_and_a_conflict_names_only_their_own_execution(
    app: ConveyorCelery, api_url: str
) -> None:
    alice_id, alice = member(api_url, "alice@example.com")
    bob_id, bob = member(api_url, "bob@example.com")
    body = {"workflow": "report", "input": {"scope": "a"}, "idempotency_key": "order-7"}
    with alice, bob:
        first = alice.post("/executions", json=body)
        assert first.status_code == 201, first.text
        # Bob's key of the same name is his own: neither a conflict nor Alice's execution.
        theirs = bob.post("/executions", json=body)
        assert theirs.status_code == 201, theirs.text
        alices, bobs = first.json(), theirs.json()
        assert alices["execution_id"] != bobs["execution_id"]
        assert (alices["triggered_by"], bobs["triggered_by"]) == (alice_id, bob_id)

        again = alice.post("/executions", json=body)
        assert again.status_code == 200, again.text
        assert again.json()["execution_id"] == alices["execution_id"]
        assert again.headers["location"] == f"/executions/{alices['execution_id']}"
        assert bob.post("/executions", json=body).json()["execution_id"] == bobs["execution_id"]

        other = alice.post("/executions", json={**body, "input": {"scope": "b"}})
        assert other.status_code == 409, other.text
        detail = other.json()["detail"]
        assert alices["execution_id"] in detail
        assert bobs["execution_id"] not in detail
        assert "user" not in detail
    assert sorted(by_key("order-7")) == sorted(
        [("report", alice_id, alice_id), ("report", bob_id, bob_id)]
    )


def test_a_key_a_producer_holds_is_not_a_users_and_theirs_is_not_the_producers(
    app: ConveyorCelery, api_url: str
) -> None:
    from worker.producer import enqueue

    produced = enqueue("report", {"scope": "a"}, idempotency_key="nightly", app=app)
    carol_id, carol = member(api_url, "carol@example.com")
    with carol:
        response = carol.post(
            "/executions",
            json={"workflow": "report", "input": {"scope": "z"}, "idempotency_key": "nightly"},
        )
    assert response.status_code == 201, response.text
    assert response.json()["execution_id"] != produced
    assert enqueue("report", {"scope": "a"}, idempotency_key="nightly", app=app) == produced
    assert sorted(by_key("nightly"), key=lambda r: r[2]) == [
        ("report", None, ""),
        ("report", carol_id, carol_id),
    ]
