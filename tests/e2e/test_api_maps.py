"""Map steps over HTTP: the detail's map counts, the paged item listing, and a retry of
failed items, through the API (uvicorn), a real in-process worker, database and broker.
The workflow is tests/e2e/map_workflows.py's ``maps-repairable`` (batch -> process, a
map 3 at a time -> report)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest

from tests.e2e import map_workflows
from tests.e2e.conftest import running_worker, wait_for
from tests.helpers.api import client, user_with_token
from worker.app import ConveyorCelery


@pytest.fixture
def member(api_url: str, conveyor_app: ConveyorCelery) -> Iterator[httpx.Client]:
    """A member's client, with a worker running and no item broken."""
    map_workflows.FLAKY.clear()
    _, token = user_with_token("ann@example.com")
    with running_worker(conveyor_app), client(api_url, token) as http:
        yield http
    map_workflows.FLAKY.clear()


def _failed(http: httpx.Client, n: int, broken: set[int]) -> str:
    map_workflows.FLAKY.update(broken)
    response = http.post("/executions", json={"workflow": "maps-repairable", "input": {"n": n}})
    assert response.status_code == 201, response.text
    execution_id: str = response.json()["execution_id"]
    assert wait_for(execution_id).status == "failed"
    return execution_id


def _step(body: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in body["steps"] if s["name"] == name)
    return found


def test_the_detail_counts_a_maps_items_and_the_listing_pages_them(
    member: httpx.Client,
) -> None:
    execution_id = _failed(member, 10, {3})
    body = member.get(f"/executions/{execution_id}").json()
    process = _step(body, "process")
    assert process["kind"] == "map"
    assert process["status"] == "failed"
    mapped = process["map"]
    assert (mapped["total"], mapped["failed"], mapped["max_failed"]) == (10, 1, 0)
    assert mapped["counts"]["failed"] == 1
    assert sum(mapped["counts"].values()) == 10
    assert _step(body, "batch")["map"] is None

    seen: list[int] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 4} | ({"after": after} if after is not None else {})
        page = member.get(f"/executions/{execution_id}/steps/process/items", params=params)
        assert page.status_code == 200, page.text
        seen += [item["index"] for item in page.json()["items"]]
        after = page.json()["next"]
        if after is None:
            break
    assert seen == list(range(10))
    failed = member.get(
        f"/executions/{execution_id}/steps/process/items", params={"status": "failed"}
    ).json()
    assert [item["index"] for item in failed["items"]] == [3]
    item = failed["items"][0]
    assert item["error"]["type"] == "RuntimeError"
    assert item["duration_seconds"] is not None
    assert item["policy_attempt"] == 1


def test_the_item_listing_refuses_what_is_no_map(member: httpx.Client) -> None:
    execution_id = _failed(member, 3, {0})
    task = member.get(f"/executions/{execution_id}/steps/batch/items")
    assert task.status_code == 404
    assert "step batch is a task, not a map" in task.text
    missing = member.get(f"/executions/{execution_id}/steps/nowhere/items")
    assert missing.status_code == 404
    bad = member.get(f"/executions/{execution_id}/steps/process/items", params={"status": "x"})
    assert bad.status_code == 422


def test_retrying_failed_items_over_http_runs_only_those(member: httpx.Client) -> None:
    execution_id = _failed(member, 8, {5})
    before = member.get(f"/executions/{execution_id}/steps/process/items").json()["items"]
    map_workflows.FLAKY.clear()
    retried = member.post(f"/executions/{execution_id}/retry", json={"failed_items": True})
    assert retried.status_code == 200, retried.text
    assert wait_for(execution_id).status == "succeeded"
    after = member.get(f"/executions/{execution_id}/steps/process/items").json()["items"]
    for old, new in zip(before, after, strict=True):
        if old["status"] == "succeeded":
            assert (new["attempt"], new["finished_at"]) == (old["attempt"], old["finished_at"])
        else:
            assert new["attempt"] == old["attempt"] + 1
            assert new["status"] == "succeeded"
    again = member.post(f"/executions/{execution_id}/retry", json={"failed_items": True})
    assert again.status_code == 409
    assert "no map step failed with items to run again" in again.text
