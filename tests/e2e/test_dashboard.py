"""The dashboard over HTTP (no browser): login, what is hidden without it, the cookie's
CSRF header rule on the JSON API, counts by status (waiting ones too), each page
rendered, and the approval form a wait's payload schema becomes."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any, Literal

import httpx2 as httpx
from pydantic import BaseModel, Field

from conveyor.api.auth import TOKEN_COOKIE, UI_HEADER
from conveyor.api.ui.waits import form_fields
from core.accounts import Role
from core.executions import ExecutionFilter
from tests.conftest import TestDatabase
from tests.e2e.conftest import running_worker, wait_for
from tests.helpers.api import client, user_with_token
from worker.app import ConveyorCelery


@contextmanager
def logged_in(api_url: str, token: str) -> Iterator[httpx.Client]:
    """A browser-like client that logged in through the form (it holds the cookie only)."""
    with httpx.Client(base_url=api_url, timeout=30, follow_redirects=False) as browser:
        response = browser.post("/ui/login", data={"token": token, "next": "/ui"})
        assert response.status_code == 303, response.text
        assert response.headers["location"] == "/ui"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"{TOKEN_COOKIE}=")
        assert "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower()
        assert "Secure" not in cookie  # served over plain HTTP here
        yield browser


def test_nothing_under_ui_is_visible_without_a_valid_token(
    database: TestDatabase, api_url: str
) -> None:
    with httpx.Client(base_url=api_url, timeout=30, follow_redirects=False) as anonymous:
        for path in ("/ui", "/ui/workflows", "/ui/workflows/linear", "/ui/executions/x"):
            response = anonymous.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"].startswith("/ui/login?next=")
        assert anonymous.get("/ui/counts").status_code == 303
        form = anonymous.get("/ui/login")
        assert form.status_code == 200
        assert 'name="token"' in form.text
        assert "default-src 'self'" in form.headers["content-security-policy"]
        assert anonymous.get("/ui/static/dashboard.css").status_code == 200

        refused = anonymous.post("/ui/login", data={"token": "cvy_made-up"})
        assert refused.status_code == 401
        assert "not valid" in refused.text
        assert "set-cookie" not in refused.headers
        with httpx.Client(
            base_url=api_url, cookies={TOKEN_COOKIE: "cvy_made-up"}, timeout=30
        ) as forger:
            assert forger.get("/ui", follow_redirects=False).status_code == 303

        # A login posted from another site's page is refused (login CSRF).
        _, token = user_with_token("eve@example.com")
        cross = anonymous.post(
            "/ui/login", data={"token": token}, headers={"Origin": "https://evil.example"}
        )
        assert cross.status_code == 403
        # After a login, "next" only ever leads back into the dashboard.
        offsite = anonymous.post("/ui/login", data={"token": token, "next": "//evil.example/"})
        assert offsite.headers["location"] == "/ui"


def test_the_cookie_authenticates_the_json_api_but_writes_need_the_dashboard_header(
    database: TestDatabase, api_url: str
) -> None:
    _, token = user_with_token("ada@example.com")
    with logged_in(api_url, token) as browser:
        assert browser.get("/executions").status_code == 200
        body = {"workflow": "linear", "input": {"start": 1}}
        # What a cross-site form could send: the cookie, no custom header.
        forged = browser.post("/executions", json=body)
        assert forged.status_code == 403
        assert UI_HEADER in forged.json()["detail"]
        created = browser.post("/executions", json=body, headers={UI_HEADER: "1"})
        assert created.status_code == 201, created.text
        execution_id = created.json()["execution_id"]
        cancel = browser.post(f"/executions/{execution_id}/cancel", json={})
        assert cancel.status_code == 403

        page = browser.get(f"/ui/executions/{execution_id}")
        assert page.status_code == 200
        assert execution_id in page.text

        logout = browser.post("/ui/logout")
        assert logout.status_code == 303
        assert TOKEN_COOKIE in logout.headers["set-cookie"]
        browser.cookies.clear()
        assert browser.get("/ui").status_code == 303
    # A bearer token needs no header: API clients are not browsers.
    with client(api_url, token) as http:
        assert http.post("/executions", json=body).status_code == 201


def test_counts_by_status_follow_what_the_viewer_may_see(
    database: TestDatabase, api_url: str, conveyor_app: ConveyorCelery
) -> None:
    _, admin_token = user_with_token("root@example.com", Role.ADMIN)
    alice_id, alice_token = user_with_token("alice@example.com")
    _, bob_token = user_with_token("bob@example.com")
    with client(api_url, alice_token) as alice, client(api_url, bob_token) as bob:
        for start in (1, 2):
            alice.post("/executions", json={"workflow": "linear", "input": {"start": start}})
        made = bob.post("/executions", json={"workflow": "broken"}).json()
        assert bob.post(f"/executions/{made['execution_id']}/cancel").status_code == 200

    with logged_in(api_url, alice_token) as browser:
        counts = browser.get("/ui/counts").json()
        assert counts["total"] == 2
        assert counts["counts"]["pending"] == 2
        assert counts["counts"]["cancelled"] == 0
        page = browser.get("/ui")
        assert page.status_code == 200
        assert page.text.count('<tr data-id="') == 2
    with logged_in(api_url, admin_token) as browser:
        counts = browser.get("/ui/counts").json()
        assert counts["total"] == 3
        assert counts["counts"]["cancelled"] == 1
        assert browser.get("/ui/counts", params={"workflow": "broken"}).json()["total"] == 1
        filtered = browser.get("/ui", params={"status": "cancelled"})
        assert filtered.text.count('<tr data-id="') == 1
        assert "broken" in filtered.text

    from core import execution_counts

    def by_workflow(conn: object) -> set[tuple[str | None, str, int]]:
        where = ExecutionFilter(triggered_by=alice_id)
        found = execution_counts.count_by_status(conn, where, by_workflow=True)  # type: ignore[arg-type]
        return {(c.workflow, c.status, c.count) for c in found}

    assert conveyor_app.engine.manager.run(by_workflow) == {("linear", "pending", 2)}


def test_pages_render_the_workflow_its_dag_and_a_paged_listing(
    database: TestDatabase, api_url: str
) -> None:
    _, token = user_with_token("root@example.com", Role.ADMIN)
    with client(api_url, token) as http:
        for start in range(55):
            http.post("/executions", json={"workflow": "linear", "input": {"start": start}})
    with logged_in(api_url, token) as browser:
        first = browser.get("/ui")
        assert first.text.count('<tr data-id="') == 50
        next_link = re.search(r'id="next-page" href="\?([^"]+)"', first.text)
        assert next_link is not None
        second = browser.get("/ui?" + next_link.group(1).replace("&amp;", "&"))
        assert second.text.count('<tr data-id="') == 5
        assert 'id="next-page"' not in second.text

        workflow = browser.get("/ui/workflows/fan")
        assert workflow.status_code == 200
        assert workflow.text.count('class="node step"') == 52  # split, 50 squares, total
        linear = browser.get("/ui/workflows/linear").text
        assert 'id="schema"' in linear
        assert "&#34;start&#34;" in linear  # the input schema's field, escaped
        assert browser.get("/ui/workflows/nope").status_code == 404
        assert browser.get("/ui/executions/nope").status_code == 404
        listing = browser.get("/ui/workflows")
        assert "/ui/workflows/slow" in listing.text


def page_data(text: str) -> Any:
    """The JSON a page hands its script (the ``page-data`` element)."""
    found = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', text, re.S)
    assert found is not None
    return json.loads(html.unescape(found.group(1)))


def test_waiting_executions_are_counted_listed_and_their_waits_described(
    database: TestDatabase, api_url: str, conveyor_app: ConveyorCelery
) -> None:
    _, token = user_with_token("wes@example.com")
    _, other_token = user_with_token("otto@example.com")
    with running_worker(conveyor_app), client(api_url, token) as http:
        invoice = {"workflow": "invoice-approval", "input": {"invoice_id": "inv-9"}}
        approval = http.post("/executions", json=invoice).json()["execution_id"]
        nap = http.post("/executions", json={"workflow": "nap"}).json()["execution_id"]
        ran = http.post("/executions", json={"workflow": "linear", "input": {"start": 1}})
        linear = ran.json()["execution_id"]
        for execution_id in (approval, nap):
            wait_for(execution_id, lambda e: e.parked_at is not None)
        wait_for(linear)
    with client(api_url, other_token) as other:
        other.post("/executions", json={"workflow": "nap"})

    with logged_in(api_url, token) as browser:
        # Waiting ones are running ones (parked): counted apart, but not twice in all.
        counts = browser.get("/ui/counts").json()
        assert counts["counts"]["waiting"] == 2
        assert counts["counts"]["running"] == 2
        assert counts["counts"]["succeeded"] == 1
        assert counts["total"] == 3
        assert browser.get("/ui/counts", params={"workflow": "nap"}).json()["counts"] == {
            **dict.fromkeys(counts["counts"], 0),
            "running": 1,
            "waiting": 1,
        }
        listing = browser.get("/ui", params={"status": "waiting"})
        assert listing.status_code == 200
        assert set(re.findall(r'<tr data-id="([^"]+)"', listing.text)) == {approval, nap}
        assert 'value="waiting" checked' in listing.text
        assert page_data(listing.text)["api_query"].startswith("status=waiting")
        both = browser.get("/ui", params=[("status", "waiting"), ("status", "succeeded")])
        assert set(re.findall(r'<tr data-id="([^"]+)"', both.text)) == {approval, nap, linear}

        # The execution page hands its script each wait node's declaration and form.
        page = browser.get(f"/ui/executions/{approval}")
        assert page.status_code == 200
        # Graphviz writes "-" in attributes as &#45;; the event wait is a hexagon.
        assert 'class="node step kind&#45;event"' in page.text
        data = page_data(page.text)
        wait = data["waits"]["approval"]
        assert (wait["kind"], wait["event"], wait["timeout_seconds"]) == (
            "event",
            "invoice.approved",
            7 * 24 * 3600.0,
        )
        assert wait["on_timeout"] == "fail"
        assert [(f["name"], f["widget"], f["required"]) for f in wait["fields"]] == [
            ("approved", "choice", True),
            ("note", "text", False),
        ]
        assert data["execution"]["children"] == []
        step = next(s for s in data["execution"]["steps"] if s["name"] == "approval")
        assert (step["kind"], step["wait"]["key"]) == ("event", "inv-9")
        assert data["may_act"] is True
        slept = page_data(browser.get(f"/ui/executions/{nap}").text)["waits"]["nap"]
        assert (slept["kind"], slept["duration_seconds"], slept["until"]) == (
            "sleep",
            3600.0,
            False,
        )


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


class Everything(BaseModel):
    approved: bool
    urgent: bool = False
    note: str = Field(default="", max_length=200, description="Why")
    amount: int = Field(ge=1, le=1000)
    rate: float | None = None
    colour: Colour = Colour.RED
    size: Literal["s", "m", "l"]
    tags: list[str] = []


def test_a_payload_schema_becomes_form_fields_of_the_matching_inputs() -> None:
    fields = {f["name"]: f for f in form_fields(Everything.model_json_schema())}
    assert list(fields) == [
        "approved",
        "urgent",
        "note",
        "amount",
        "rate",
        "colour",
        "size",
        "tags",
    ]
    widgets = {name: (f["widget"], f["required"]) for name, f in fields.items()}
    assert widgets == {
        # A required yes/no with no default must be chosen: radios, neither checked.
        "approved": ("choice", True),
        "urgent": ("checkbox", False),
        "note": ("text", False),
        "amount": ("number", True),
        "rate": ("number", False),
        "colour": ("select", False),
        "size": ("select", True),
        "tags": ("json", False),
    }
    assert (fields["note"]["maxlength"], fields["note"]["description"]) == (200, "Why")
    assert (fields["amount"]["min"], fields["amount"]["max"], fields["amount"]["integer"]) == (
        1,
        1000,
        True,
    )
    assert (fields["rate"]["integer"], fields["rate"]["nullable"]) == (False, True)
    assert (fields["colour"]["options"], fields["colour"]["default"]) == (["red", "blue"], "red")
    assert fields["size"]["options"] == ["s", "m", "l"]
    assert fields["urgent"]["default"] is False
    # No schema (any JSON), or one without properties: the payload as one JSON field.
    for schema in (None, {"type": "array", "items": {"type": "integer"}}):
        assert form_fields(schema) == [
            {"name": "", "label": "Payload (JSON)", "widget": "json", "required": False}
        ]
