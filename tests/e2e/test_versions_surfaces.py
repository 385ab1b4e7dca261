"""What an operator sees of a rolling deploy: a step handed back waits visibly in the
API (``wait.kind`` version), `GET /versions` counts it, `GET /versions/check` names its
execution, the dashboard's execution page says what it waits for, and `POST
/executions/{id}/migrate` moves it to the API's code (admins only)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from conveyor.api.app import create_app as create_api
from core.accounts import Role
from core.config import Settings
from tests.e2e.conftest import running_worker, wait_for
from tests.e2e.test_dashboard_browser import WAIT_MS, browser, log_in  # noqa: F401
from tests.e2e.test_versions import _app, _held, settings  # noqa: F401
from tests.helpers.api import client, serve, user_with_token
from worker.app import ConveyorCelery
from worker.producer import enqueue

pytestmark = pytest.mark.postgresql_only


@pytest.fixture
def held(settings: Settings) -> Iterator[tuple[ConveyorCelery, str, str]]:  # noqa: F811
    """The new release's worker and API up, an execution of the old release handed back
    (renamed step): (new app, API URL, execution id)."""
    old, new = _app(settings, "old"), _app(settings, "new", "renamed")
    with running_worker(new), serve(create_api(new)) as url:
        execution_id = enqueue("deploy", {}, app=old)
        wait_for(execution_id, _held(execution_id))
        yield new, url, execution_id


def test_the_api_shows_the_held_step_counts_it_and_migrates_it(
    held: tuple[ConveyorCelery, str, str],
) -> None:
    _, url, execution_id = held
    _, admin_token = user_with_token("ops@example.com", Role.ADMIN)
    _, member_token = user_with_token("dev@example.com", Role.MEMBER)
    with client(url, admin_token) as admin, client(url, member_token) as member:
        detail = admin.get(f"/executions/{execution_id}").json()
        (first,) = [s for s in detail["steps"] if s["name"] == "first"]
        assert first["status"] == "waiting"
        assert first["wait"]["kind"] == "version"
        assert first["wait"]["why"] == "compatible_worker"

        shapes = {s["shape"]: s for s in member.get("/versions?workflow=deploy").json()}
        (old_shape,) = [s for s in shapes.values() if not s["current"]]
        assert (old_shape["open_executions"], old_shape["held_steps"]) == (1, 1)
        assert old_shape["live_workers"] == 0
        (current,) = [s for s in shapes.values() if s["current"]]
        assert current["live_workers"] == 1

        assert member.get("/versions/check").status_code == 403
        check = admin.get("/versions/check").json()
        assert [row["execution_id"] for row in check] == [execution_id]
        assert "third" in check[0]["reason"]

        assert member.post(f"/executions/{execution_id}/migrate").status_code == 403
        moved = admin.post(f"/executions/{execution_id}/migrate")
        assert moved.status_code == 200, moved.text
        execution = wait_for(execution_id)
        assert execution.output_data == {"third_renamed": "new>new>new"}
        assert admin.get("/versions/check").json() == []
        again = admin.post(f"/executions/{execution_id}/migrate")
        assert again.status_code == 409


def test_the_dashboard_says_what_a_handed_back_step_waits_for(
    held: tuple[ConveyorCelery, str, str],
    browser: Browser,  # noqa: F811
) -> None:
    _, url, execution_id = held
    _, token = user_with_token("ops@example.com", Role.ADMIN)
    context = browser.new_context(base_url=url, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page: Page = context.new_page()
    errors: list[Any] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        log_in(page, token)
        page.goto(f"/ui/executions/{execution_id}")
        box = page.locator('.wait[data-wait="first"]')
        expect(box).to_have_attribute("data-kind", "version")
        expect(box.locator(".version-held")).to_have_text(
            re.compile("a worker whose code has a compatible shape")
        )
    finally:
        context.close()
    assert errors == []
