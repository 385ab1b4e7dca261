"""The dashboard in a real browser (Debian's chromium driven by Playwright) against the
real API (uvicorn), a real worker, PostgreSQL and Redis.

Screenshots go to the test's tmp_path; with CONVEYOR_UPDATE_SCREENSHOT=1 the execution
page's is also copied to docs/dashboard.png (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conveyor.api.app import create_app
from core.accounts import Role
from core.workflows import Workflow
from tests.conftest import TestDatabase
from tests.e2e import map_workflows
from tests.e2e.wait_workflows import nap
from tests.helpers.api import client, serve, user_with_token
from worker.app import ConveyorCelery

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
WAIT_MS = 20_000
expect.set_options(timeout=WAIT_MS)

pytestmark = pytest.mark.postgresql_only

# A parent whose child node runs "nap" (an hour's sleep) as its child execution.
family = Workflow("dashboard-family")
family.child("doze", workflow=nap)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless chromium for the module (Debian's: no `playwright install`)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/bootstrap.sh)")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def api_url(worker: ConveyorCelery) -> Iterator[str]:
    """The API and dashboard of the running worker's app, served over HTTP."""
    with serve(create_app(worker)) as url:
        yield url


@pytest.fixture
def page(browser: Browser, api_url: str) -> Iterator[Page]:
    """A fresh browser context (no cookies) on the dashboard; console errors fail it."""
    context = browser.new_context(base_url=api_url, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.on(
        "console",
        lambda message: errors.append(message.text) if message.type == "error" else None,
    )
    yield tab
    context.close()
    # The only console errors allowed: the API's refusals the page shows the user.
    unexpected = [e for e in errors if "status of 4" not in e]
    assert not unexpected, unexpected


def log_in(page: Page, token: str) -> None:
    """Log in through the form, as a person would."""
    page.goto("/ui/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui$"))


def test_log_in_enqueue_from_the_form_and_watch_the_dag_turn_green(
    database: TestDatabase, api_url: str, page: Page, tmp_path: Path
) -> None:
    _, token = user_with_token("ada@example.com", Role.ADMIN)

    # Nothing is visible without logging in: every page sends the browser to the form.
    for path in ("/ui", "/ui/workflows/linear", "/ui/executions/anything"):
        page.goto(path)
        expect(page).to_have_url(re.compile(r"/ui/login\?next="))
        expect(page.locator("table")).to_have_count(0)
    page.fill("#token", "cvy_not-a-token")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("not valid")
    log_in(page, token)
    expect(page.locator("h1")).to_have_text("Executions")

    # The form: a per-field error from the API's 422 first, then a good input.
    page.goto("/ui/workflows/fan")
    expect(page.locator("#dag g.node")).to_have_count(52)
    page.fill("#input-json", '{"unexpected": true}')
    page.fill("#priority", "12")
    page.click("#enqueue button[type=submit]")
    priority_error = page.locator('[data-error-for="priority"]')
    expect(priority_error).to_be_visible()
    expect(priority_error).to_contain_text("less than or equal to 9")
    expect(page.locator("#priority")).to_have_attribute("aria-invalid", "true")
    page.screenshot(path=str(tmp_path / "workflow-form-error.png"))

    page.fill("#input-json", "")
    page.fill("#priority", "5")
    page.fill("#idempotency-key", "from-the-browser")
    page.click("#enqueue button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/executions/[0-9a-f-]+$"))

    # The DAG colours itself as the worker runs it, without a reload.
    green = page.locator("#dag g.node.status-succeeded")
    expect(green).to_have_count(52)
    # The fill eases in over 0.3 s (a CSS transition): expect() waits for the end of it.
    shape = page.locator("#dag g#step-0 path, #dag g#step-0 polygon").first
    expect(shape).to_have_css("fill", "rgb(134, 239, 172)")  # --succeeded
    expect(page.locator("#execution-status")).to_have_text("succeeded")
    expect(page.locator("#steps tbody tr")).to_have_count(52)
    expect(page.locator("#timeline .lane")).to_have_count(52)
    expect(page.locator("#events tbody tr").last).to_contain_text("succeeded")
    expect(page.locator("#cancel")).to_be_hidden()
    expect(page.locator("#retry")).to_be_hidden()
    # 52 steps open at full size on the first ones; "Fit" shows all, wheel zooms in.
    view_box = page.locator("#dag svg").get_attribute("viewBox")
    page.click('[data-dag="fit"]')
    assert page.locator("#dag svg").get_attribute("viewBox") != view_box
    fitted = page.locator("#dag svg").get_attribute("viewBox")
    page.locator("#dag svg").hover(position={"x": 640, "y": 120})
    for _ in range(4):
        page.mouse.wheel(0, -200)
    expect(page.locator("#dag svg")).not_to_have_attribute("viewBox", fitted or "")
    shot = tmp_path / "execution.png"
    page.screenshot(path=str(shot))
    if os.environ.get("CONVEYOR_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)

    # The list shows it, with its count, and refreshes by itself.
    page.goto("/ui")
    expect(page.locator('[data-count="succeeded"]')).to_have_text("1")
    expect(page.locator("#executions tbody tr")).to_have_count(1)
    expect(page.locator("#live-state")).to_contain_text("updated")
    page.screenshot(path=str(tmp_path / "executions.png"))


def test_read_a_failed_steps_error_and_cancel_a_running_execution(
    database: TestDatabase, api_url: str, page: Page, tmp_path: Path
) -> None:
    _, token = user_with_token("bo@example.com")
    with client(api_url, token) as http:
        broken = http.post("/executions", json={"workflow": "broken"}).json()["execution_id"]
        slow = http.post("/executions", json={"workflow": "slow"}).json()["execution_id"]
    log_in(page, token)

    page.goto(f"/ui/executions/{broken}")
    expect(page.locator("#execution-status")).to_have_text("failed")
    expect(page.locator("#dag g.node.status-failed")).to_have_count(1)
    page.locator("#dag g.node.status-failed").click()
    detail = page.locator("#step-detail")
    expect(detail).to_be_visible()
    expect(detail.locator('[data-detail="name"]')).to_have_text("explode")
    expect(detail.locator(".step-error")).to_have_text("ValueError: the data is bad")
    expect(detail.locator(".traceback")).to_contain_text("raise ValueError")
    expect(page.locator("#retry")).to_be_visible()
    expect(page.locator("#cancel")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "failed-step.png"))

    page.goto(f"/ui/executions/{slow}")
    expect(page.locator("#dag g.node.status-running")).to_have_count(1)
    cancel = page.locator("#cancel")
    expect(cancel).to_be_visible()
    page.once("dialog", lambda dialog: dialog.accept())
    cancel.click()
    expect(page.locator("#execution-status")).to_have_text("cancelled")
    # The running step saw the cancellation and stopped; the one after it never ran.
    expect(page.locator("#dag g.node.status-cancelled")).to_have_count(2)
    expect(page.locator("#dag g.node.status-running")).to_have_count(0)
    expect(cancel).to_be_hidden()
    expect(page.locator("#retry")).to_be_visible()
    expect(page.locator("#events")).to_contain_text(
        "cancelled from the dashboard (by bo@example.com)"
    )
    page.screenshot(path=str(tmp_path / "cancelled.png"))

    # Logging out hides everything again.
    page.click("text=Log out")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.goto("/ui")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))


def test_an_approval_form_shows_a_422_beside_its_field_then_approves_the_invoice(
    database: TestDatabase, api_url: str, page: Page, tmp_path: Path
) -> None:
    _, token = user_with_token("cy@example.com")
    with client(api_url, token) as http:
        made = http.post(
            "/executions", json={"workflow": "invoice-approval", "input": {"invoice_id": "inv-42"}}
        )
        execution_id = made.json()["execution_id"]
    log_in(page, token)
    page.goto(f"/ui/executions/{execution_id}")

    # The page follows the execution until its approval waits: the node turns the
    # waiting colour, and the Waiting card says for what, with a form built from the
    # schema (approved: bool required, note: str = "").
    approval = page.locator('#waits [data-wait="approval"]')
    expect(approval).to_be_visible()
    expect(page.locator("#dag g.node.kind-event.status-waiting")).to_have_count(1)
    expect(page.locator("#execution-status")).to_contain_text("waiting")
    expect(approval.locator(".wait-event")).to_have_text("invoice.approved")
    expect(approval.locator(".wait-key")).to_have_text("inv-42")
    expect(approval.locator(".times-out")).to_contain_text(re.compile(r"\(in (6d 23h|7d)\)"))
    form = approval.locator('form[data-signal="approval"]')
    approved = form.locator('fieldset[data-name="approved"]')
    expect(approved).to_have_attribute("aria-required", "true")
    expect(approved.locator(".required")).to_be_visible()
    note = form.locator('input[data-name="note"]')
    expect(note).to_have_attribute("type", "text")
    expect(form.locator('[data-field="note"] .required')).to_have_count(0)
    # The step panel says what it waits for too.
    page.locator("#dag g.node.kind-event").click()
    expect(page.locator("#step-detail .waits-for")).to_contain_text("invoice.approved")

    # Sent without the required yes/no: the API's 422 is shown beside that field, and
    # what was typed stays while the page keeps refreshing.
    note.fill("checked against the PO")
    form.locator("button[type=submit]").click()
    approved_error = form.locator('[data-error-for="approved"]')
    expect(approved_error).to_be_visible()
    expect(approved_error).to_contain_text(re.compile("required", re.IGNORECASE))
    expect(approved).to_have_attribute("aria-invalid", "true")
    expect(form.locator('[data-error-for="note"]')).to_be_hidden()
    expect(page.locator("#dag g.node.status-waiting")).to_have_count(1)
    page.screenshot(path=str(tmp_path / "approval-422.png"))
    # Two more polls of the execution: the first one's refresh has rendered by the time
    # the second is asked for (the page polls again only after it rendered).
    for _ in range(2):
        with page.expect_response(lambda r: r.url.endswith(f"/executions/{execution_id}")):
            pass
    expect(note).to_have_value("checked against the PO")
    expect(approved_error).to_be_visible()

    # Approved: the signal completes the step, the worker pays, the execution succeeds.
    approved.get_by_label("yes").check()
    form.locator("button[type=submit]").click()
    expect(page.locator("#execution-status")).to_have_text("succeeded")
    expect(page.locator("#dag g.node.status-succeeded")).to_have_count(3)
    expect(page.locator("#waiting")).to_be_hidden()
    expect(page.locator("#output")).to_contain_text('"paid": true')
    expect(page.locator("#output")).to_contain_text("checked against the PO")
    expect(page.locator("#events")).to_contain_text("cy@example.com")
    page.screenshot(path=str(tmp_path / "approved.png"))


def test_a_sleeping_step_shows_its_wake_time_and_wake_now_finishes_it(
    database: TestDatabase, api_url: str, page: Page, tmp_path: Path
) -> None:
    _, token = user_with_token("di@example.com")
    with client(api_url, token) as http:
        execution_id = http.post("/executions", json={"workflow": "nap"}).json()["execution_id"]
    log_in(page, token)

    # The list counts it as waiting (parked on its sleep) and filters on it.
    expect(page.locator('[data-count="waiting"]')).to_have_text("1")
    page.locator("a.count.status-waiting").click()
    expect(page).to_have_url(re.compile(r"status=waiting"))
    row = page.locator(f'#executions tr[data-id="{execution_id}"]')
    expect(row).to_be_visible()
    expect(row.locator(".status-waiting")).to_have_text("waiting")
    row.locator("a.mono").click()

    expect(page).to_have_url(re.compile(f"/ui/executions/{execution_id}$"))
    nap = page.locator('#waits [data-wait="nap"]')
    expect(nap).to_be_visible()
    expect(page.locator("#dag g.node.kind-sleep.status-waiting")).to_have_count(1)
    # An hour's sleep: it wakes "in 59m …" (or "in 1h" within its first second).
    expect(nap.locator(".wake-at")).to_contain_text(re.compile(r"\(in (59m( \d+s)?|1h)\)"))
    expect(nap.locator(".wake-at time")).to_have_attribute("datetime", re.compile(r"^\d{4}-"))
    page.screenshot(path=str(tmp_path / "sleeping.png"))

    nap.get_by_role("button", name="Wake now").click()
    expect(page.locator("#execution-status")).to_have_text("succeeded")
    expect(page.locator("#dag g.node.status-succeeded")).to_have_count(2)
    expect(page.locator("#waiting")).to_be_hidden()
    expect(page.locator("#events")).to_contain_text("woken early by di@example.com")


def test_a_child_links_to_its_parent_and_waking_it_finishes_both(
    database: TestDatabase, worker: ConveyorCelery, api_url: str, page: Page, tmp_path: Path
) -> None:
    worker.engine.registry.register(family)
    _, token = user_with_token("ed@example.com")
    with client(api_url, token) as http:
        made = http.post("/executions", json={"workflow": "dashboard-family"})
        parent_id = made.json()["execution_id"]
    log_in(page, token)
    page.goto(f"/ui/executions/{parent_id}")

    # The parent's child node waits on its child: a 3-D box, and a link to the child.
    expect(page.locator("#dag g.node.kind-child.status-waiting")).to_have_count(1)
    doze = page.locator('#waits [data-wait="doze"]')
    expect(doze.locator("a.child-link")).to_be_visible()
    children = page.locator("#children tbody tr")
    expect(children).to_have_count(1)
    expect(children.first).to_contain_text("nap")
    expect(children.first).to_contain_text("doze")
    page.screenshot(path=str(tmp_path / "parent.png"))
    children.first.locator("a.child-link").click()

    # The child's page links back to its parent; waking its sleep ends both.
    expect(page.locator("#parent-link")).to_have_attribute("href", f"/ui/executions/{parent_id}")
    page.get_by_role("button", name="Wake now").click()
    expect(page.locator("#execution-status")).to_have_text("succeeded")
    page.locator("#parent-link").click()
    expect(page).to_have_url(re.compile(f"/ui/executions/{parent_id}$"))
    expect(page.locator("#execution-status")).to_have_text("succeeded")
    expect(page.locator("#children tbody tr").first).to_contain_text("succeeded")
    expect(page.locator("#waiting")).to_be_hidden()


def test_a_map_is_one_node_with_its_items_paged_and_failed_items_retried(
    database: TestDatabase, api_url: str, page: Page, tmp_path: Path
) -> None:
    map_workflows.FLAKY.clear()
    map_workflows.FLAKY.update({7, 250})
    _, token = user_with_token("mo@example.com")
    try:
        with client(api_url, token) as http:
            created = http.post(
                "/executions", json={"workflow": "maps-repairable", "input": {"n": 300}}
            )
        execution_id = created.json()["execution_id"]
        log_in(page, token)
        page.goto(f"/ui/executions/{execution_id}")
        expect(page.locator("#execution-status")).to_have_text("failed")
        # 300 items, one node: batch, process (the map) and report.
        expect(page.locator("#dag g.node")).to_have_count(3)
        node = page.locator("#dag g.node.kind-map")
        expect(node).to_have_count(1)
        expect(node.locator("text")).to_have_text("process [300]")
        node.click()
        detail = page.locator("#step-detail")
        expect(detail.locator(".map-summary")).to_contain_text("failed 1")
        expect(detail.locator("#items tbody tr")).to_have_count(50)
        expect(detail.locator("#items tbody tr").first).to_contain_text("0")
        detail.locator("#items-next").click()
        expect(detail.locator("#items tbody tr").first.locator("td").first).to_have_text("50")
        detail.locator("#item-status").select_option("failed")
        failed_rows = detail.locator("#items tbody tr")
        expect(failed_rows).to_have_count(1)
        expect(failed_rows.first).to_contain_text("RuntimeError: item 7 is broken")
        page.screenshot(path=str(tmp_path / "map.png"))

        map_workflows.FLAKY.clear()
        retry_items = page.locator("#retry-items")
        expect(retry_items).to_be_visible()
        retry_items.click()
        expect(page.locator("#execution-status")).to_have_text("succeeded")
        expect(retry_items).to_be_hidden()
        expect(page.locator("#events")).to_contain_text("retry failed items")
    finally:
        map_workflows.FLAKY.clear()
