"""The dashboard's Limits page and a step held by its key, in a real browser (Debian's
chromium driven by Playwright) against the real API, a worker, PostgreSQL and Redis;
the browser, page and login are tests/e2e/test_dashboard_browser.py's."""

from __future__ import annotations

import re
from pathlib import Path

import httpx2 as httpx
import pytest
from playwright.sync_api import Page, expect

from core.accounts import Role
from tests.conftest import TestDatabase
from tests.e2e.limit_workflows import GATE, GPU_KEY, gated
from tests.e2e.test_dashboard_browser import api_url, browser, log_in, page  # noqa: F401
from tests.helpers.api import client, poll, user_with_token
from worker.app import ConveyorCelery

pytestmark = pytest.mark.postgresql_only
# api_url, browser and page above are that module's fixtures, imported so that pytest
# finds them here (the test's parameters of those names are them).


def _start(http: httpx.Client) -> str:
    response = http.post("/executions", json={"workflow": gated.name})
    assert response.status_code == 201, response.text
    execution_id: str = response.json()["execution_id"]
    return execution_id


def test_a_held_step_links_to_its_key_whose_counts_live_on_the_limits_page(
    database: TestDatabase,
    worker: ConveyorCelery,
    api_url: str,  # noqa: F811
    page: Page,  # noqa: F811
    tmp_path: Path,
) -> None:
    worker.engine.registry.register(gated)
    GATE.clear()
    _, token = user_with_token("lu@example.com", Role.ADMIN)
    try:
        with client(api_url, token) as http:
            first = _start(http)
            poll(http, f"/executions/{first}", {"running"})
            second = _start(http)
            log_in(page, token)

            # The execution page: the held step, its key (a link) and why it waits.
            page.goto(f"/ui/executions/{second}")
            held = page.locator('#waits [data-wait="render"]')
            expect(held.locator(".wait-key")).to_have_text(GPU_KEY)
            expect(held.locator(".held")).to_have_text("no free slot")
            page.screenshot(path=str(tmp_path / "held.png"))
            held.locator(".wait-key").click()

            # The Limits page, filtered on that key: 1 of 1 slot in use, 1 waiting.
            expect(page).to_have_url(re.compile(rf"/ui/limits\?key={GPU_KEY}$"))
            expect(page.locator("nav a[aria-current]")).to_have_text("Limits")
            row = page.locator(f'#limits tr[data-key="{GPU_KEY}"]')
            expect(row.locator('[data-field="limit"]')).to_have_text("1")
            expect(row.locator('[data-field="running"]')).to_have_text("1")
            expect(row.locator('[data-field="waiting"]')).to_have_text("1")
            expect(row.locator(".slot-bar .used.full")).to_have_count(1)
            page.screenshot(path=str(tmp_path / "limits.png"))

            # It refreshes by itself as the slot frees and the held step runs.
            GATE.set()
            expect(row.locator('[data-field="waiting"]')).to_have_text("0")
            expect(row.locator('[data-field="running"]')).to_have_text("0")
            assert poll(http, f"/executions/{second}", {"succeeded"})["status"] == "succeeded"

            # An admin pauses the key from the page: what is released meanwhile waits.
            row.get_by_label(f"pause {GPU_KEY} for").select_option(label="1 hour")
            row.locator("[data-pause]").click()
            expect(row.locator("[data-resume]")).to_be_visible()
            expect(row).to_have_class(re.compile("paused"))
            third = _start(http)
            page.goto(f"/ui/executions/{third}")
            held = page.locator('#waits [data-wait="render"]')
            expect(held.locator(".held")).to_contain_text("paused until")
            expect(held.locator(".held")).to_contain_text(re.compile(r"in (59m|1h)"))

            page.goto("/ui/limits")
            row = page.locator(f'#limits tr[data-key="{GPU_KEY}"]')
            expect(row.locator('[data-field="waiting"]')).to_have_text("1")
            row.locator("[data-resume]").click()
            expect(row.locator("[data-pause]")).to_be_visible()
            assert poll(http, f"/executions/{third}", {"succeeded"})["status"] == "succeeded"
    finally:
        GATE.set()
