"""Repairing from the dashboard, in a real browser (Debian's chromium driven by
Playwright) against the real API, a worker, PostgreSQL and Redis: a failed step's panel
resolves it (a bad output's field named, nothing changed), and the Failures page shows a
group and retries all of it; the browser, page and login are test_dashboard_browser.py's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from conveyor.api.app import create_app as create_api
from core.accounts import Role
from tests.e2e.conftest import running_worker, wait_for
from tests.e2e.test_dashboard_browser import WAIT_MS, browser, log_in  # noqa: F401
from tests.e2e.test_repair import _mend
from tests.helpers.api import serve, user_with_token
from tests.helpers.state import events
from worker.app import ConveyorCelery
from worker.producer import enqueue

pytestmark = pytest.mark.postgresql_only


@pytest.fixture
def served(conveyor_app: ConveyorCelery) -> Iterator[tuple[ConveyorCelery, str]]:
    conveyor_app.engine.registry.register(_mend())
    with running_worker(conveyor_app), serve(create_api(conveyor_app)) as url:
        yield conveyor_app, url


@pytest.fixture
def page(browser, served: tuple[ConveyorCelery, str]) -> Iterator[Page]:  # type: ignore[no-untyped-def]  # noqa: F811
    _, url = served
    context = browser.new_context(base_url=url, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert errors == []


def test_a_failed_step_is_resolved_from_its_panel(
    served: tuple[ConveyorCelery, str], page: Page
) -> None:
    app, _ = served
    owner_id, token = user_with_token("ops@example.com", Role.ADMIN)
    execution_id = enqueue("mend", triggered_by=owner_id, app=app)
    assert wait_for(execution_id).status == "failed"
    log_in(page, token)
    page.goto(f"/ui/executions/{execution_id}")
    expect(page.locator("#execution-status")).to_have_text("failed")
    page.locator("#dag g.node.status-failed").click()
    form = page.locator('[data-repair="b"]')
    form.locator("#repair-output").fill('{"amount": "lots"}')
    form.locator("button.resolve").click()
    expect(form.locator(".repair-error")).to_contain_text("output.amount")
    assert ("b", "failed", "succeeded") not in events(execution_id)
    form.locator("#repair-output").fill('{"amount": 7}')
    form.locator("#repair-reason").fill("billed by hand")
    form.locator("button.resolve").click()
    expect(page.locator("#execution-status")).to_have_text("succeeded")
    assert wait_for(execution_id).output_data == {"d": 15, "report": "billed 7"}


def test_the_failures_page_groups_failures_and_retries_a_group(
    served: tuple[ConveyorCelery, str], page: Page
) -> None:
    app, _ = served
    owner_id, token = user_with_token("ops@example.com", Role.ADMIN)
    ids = [enqueue("mend", triggered_by=owner_id, app=app) for _ in range(3)]
    for execution_id in ids:
        assert wait_for(execution_id).status == "failed"
    log_in(page, token)
    page.goto("/ui/failures")
    row = page.locator("#failures tr[data-group]")
    expect(row).to_have_count(1)
    expect(row.locator('[data-field="count"]')).to_have_text("3")
    expect(row).to_contain_text("ConnectionError: billing is down")
    row.locator("button.retry-group").click()
    expect(row.locator(".group-result")).to_have_text("retried 3")
    for execution_id in ids:
        retried = [e for e in events(execution_id) if e == (None, "failed", "pending")]
        assert len(retried) == 1
