"""Map steps through a real worker, database and broker (both backends)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from core.database import get_db_session
from core.errors import NothingToRetry
from core.models import MapItem, WorkflowExecution
from core.registry import WorkflowRegistry, configure_registry
from tests.conftest import TestDatabase
from tests.e2e import map_workflows
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
from tests.e2e.map_workflows import (
    limited,
    nested,
    per_tenant,
    repairable,
    summaries,
    tenant_sync,
    tolerant,
)
from tests.helpers.state import database_reachable_for, step_row
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue


@pytest.fixture
def app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    registry = WorkflowRegistry([summaries, tolerant, nested, repairable, limited, per_tenant])
    configure_registry(registry)
    map_workflows.FLAKY.clear()
    map_workflows.HOLD_FIRST_ATTEMPT.clear()
    map_workflows.HOLDING.clear()
    map_workflows.RELEASE.clear()
    return create_app(clean_app_settings(database, redis_url), registry)


def _items(execution_id: str, step: str) -> list[MapItem]:
    with get_db_session() as session:
        return list(
            session.scalars(
                select(MapItem)
                .where(MapItem.execution_id == execution_id, MapItem.step_name == step)
                .order_by(MapItem.item_index)
            )
        )


def _item_rows(execution_id: str) -> int:
    with get_db_session() as session:
        count = session.scalar(
            select(func.count()).select_from(MapItem).where(MapItem.execution_id == execution_id)
        )
    return int(count or 0)


def test_a_map_runs_each_item_and_its_dependent_gets_the_outputs_in_order(
    app: ConveyorCelery,
) -> None:
    files = [f"f{i}.txt" for i in range(25)]
    with running_worker(app):
        execution_id = enqueue(summaries, {"files": files, "prefix": "s"}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded", finished.error
    out = finished.output_data["publish"]
    assert out["count"] == 25
    assert out["summaries"] == [
        {"file": f, "summary": f"s:{f}", "index": i} for i, f in enumerate(files)
    ]
    items = _items(execution_id, "summarise")
    assert [i.item_index for i in items] == list(range(25))
    assert {i.status for i in items} == {"succeeded"}
    assert all(i.attempt == 1 for i in items)
    row = step_row(execution_id, "summarise")
    assert (row["status"], row["map_total"], row["map_left"]) == ("succeeded", 25, 0)


def test_an_empty_list_completes_the_map_with_an_empty_list(app: ConveyorCelery) -> None:
    with running_worker(app):
        execution_id = enqueue(summaries, {"files": []}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded", finished.error
    assert finished.output_data["publish"] == {"count": 0, "summaries": []}
    assert _item_rows(execution_id) == 0


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a": 1}, "map summarise needs a list from extract, got an object"),
        ("abc", "map summarise needs a list from extract, got text"),
    ],
)
def test_an_upstream_output_that_is_not_a_list_fails_the_map_naming_what_it_got(
    app: ConveyorCelery, files: Any, message: str
) -> None:
    with running_worker(app):
        execution_id = enqueue(summaries, {"files": files}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "failed"
    row = step_row(execution_id, "summarise")
    assert row["status"] == "failed"
    assert row["error"]["type"] == "MapInputError"
    assert row["error"]["message"] == message
    assert step_row(execution_id, "publish")["status"] == "skipped"
    assert _item_rows(execution_id) == 0


def test_a_list_longer_than_max_items_fails_the_map_naming_the_length_and_limit(
    app: ConveyorCelery,
) -> None:
    limit = summaries.steps["summarise"].wait.max_items  # type: ignore[union-attr]
    with running_worker(app):
        execution_id = enqueue(summaries, {"files": list(range(limit + 1))}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "failed"
    error = step_row(execution_id, "summarise")["error"]
    assert error["type"] == "MapInputError"
    assert error["message"] == (
        f"extract returned {limit + 1:,} items; map summarise allows at most max_items={limit:,}"
    )
    assert _item_rows(execution_id) == 0


def test_a_failed_item_fails_the_map_and_cancels_the_items_not_finished(
    app: ConveyorCelery,
) -> None:
    files = [f"f{i}" for i in range(40)]
    with running_worker(app):
        execution_id = enqueue(summaries, {"files": files, "poison": ["f5"]}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "failed"
    row = step_row(execution_id, "summarise")
    assert row["status"] == "failed"
    assert row["error"]["type"] == "MapItemsFailed"
    assert row["error"]["item"] == 5
    statuses = {i.item_index: i.status for i in _items(execution_id, "summarise")}
    assert statuses[5] == "failed"
    # Nothing left to run: every item that had not ended is cancelled.
    assert set(statuses.values()) <= {"succeeded", "failed", "cancelled"}
    assert "cancelled" in statuses.values()
    assert step_row(execution_id, "publish")["status"] == "skipped"


def test_tolerated_failures_give_none_at_their_index(app: ConveyorCelery) -> None:
    with running_worker(app):
        execution_id = enqueue(tolerant, {"n": 30, "poison": [3, 17, 29]}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded", finished.error
    squares = step_row(execution_id, "square")["output_data"]
    assert squares == [None if i in (3, 17, 29) else i * i for i in range(30)]
    assert finished.output_data["total"]["missing"] == 3
    items = {i.item_index: i for i in _items(execution_id, "square")}
    # Each poisoned item was retried once (Retry(max_attempts=2)) before it failed.
    assert [items[i].attempt for i in (3, 17, 29)] == [2, 2, 2]
    assert {items[i].status for i in (3, 17, 29)} == {"failed"}


def test_failures_over_the_tolerance_fail_the_map_and_leave_nothing_queued(
    app: ConveyorCelery,
) -> None:
    with running_worker(app):
        execution_id = enqueue(tolerant, {"n": 60, "poison": [1, 2, 3, 4]}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "failed"
    error = step_row(execution_id, "square")["error"]
    assert error["type"] == "MapItemsFailed"
    assert "4 item(s) failed (at most 3 may)" in error["message"]
    statuses = [i.status for i in _items(execution_id, "square")]
    assert not {"pending", "queued", "running"} & set(statuses)


def test_a_map_consumes_a_map(app: ConveyorCelery) -> None:
    with running_worker(app):
        execution_id = enqueue(nested, {}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded", finished.error
    assert step_row(execution_id, "widths")["output_data"] == [[2, 2], [1], [0]]
    assert finished.output_data == {"flat": [4, 1, 0]}


def test_retrying_failed_items_reruns_exactly_those_and_keeps_the_others(
    app: ConveyorCelery,
) -> None:
    map_workflows.FLAKY.update({4})
    with running_worker(app):
        execution_id = enqueue(repairable, {"n": 12}, app=app)
        assert wait_for(execution_id).status == "failed"
        before = {i.item_index: i for i in _items(execution_id, "process")}
        assert before[4].status == "failed"
        again = {i for i, item in before.items() if item.status in ("failed", "cancelled")}
        kept = {i: (item.attempt, item.finished_at) for i, item in before.items() if i not in again}
        assert again  # some items had not run, or failed
        assert kept  # some had succeeded
        map_workflows.FLAKY.clear()  # the bug is fixed
        assert app.engine.retry(execution_id, failed_items=True)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded", finished.error
    assert finished.output_data == {"report": sum(range(100, 112))}
    after = {i.item_index: i for i in _items(execution_id, "process")}
    # Succeeded items were not run again: same attempt, same finish time.
    assert {i: (after[i].attempt, after[i].finished_at) for i in kept} == kept
    # The others ran once more, at their next attempt, their policy whole again.
    for index in again:
        assert after[index].status == "succeeded"
        assert after[index].attempt == before[index].attempt + 1
        assert after[index].attempt - after[index].recoveries == 1
    assert step_row(execution_id, "process")["output_data"] == list(range(100, 112))


def test_retrying_failed_items_without_any_is_refused(app: ConveyorCelery) -> None:
    with running_worker(app):
        execution_id = enqueue(summaries, {"files": {"not": "a list"}}, app=app)
        assert wait_for(execution_id).status == "failed"
    with pytest.raises(NothingToRetry, match="no map step failed with items to run again"):
        app.engine.retry(execution_id, failed_items=True)
    assert app.engine.manager.get_execution(execution_id).status == "failed"


def test_a_plain_retry_runs_the_whole_map_again(app: ConveyorCelery) -> None:
    map_workflows.FLAKY.update({1})
    with running_worker(app):
        execution_id = enqueue(repairable, {"n": 5}, app=app)
        assert wait_for(execution_id).status == "failed"
        map_workflows.FLAKY.clear()
        assert app.engine.retry(execution_id)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded", finished.error
    items = _items(execution_id, "process")
    assert [i.status for i in items] == ["succeeded"] * 5
    step_attempt = step_row(execution_id, "process")["attempt"]
    assert {i.attempt for i in items} == {step_attempt}  # every item of the new run


def test_cancelling_an_execution_mid_map_cancels_every_open_item(app: ConveyorCelery) -> None:
    map_workflows.HOLD_FIRST_ATTEMPT.update({0})
    with running_worker(app):
        execution_id = enqueue(repairable, {"n": 30}, app=app)
        assert map_workflows.HOLDING.wait(timeout=20)
        assert app.engine.cancel(execution_id)
        statuses = {i.status for i in _items(execution_id, "process")}
        map_workflows.RELEASE.set()
        assert wait_for(execution_id).status == "cancelled"
    assert statuses <= {"succeeded", "cancelled"}
    assert "cancelled" in statuses
    assert step_row(execution_id, "process")["status"] == "cancelled"
    # The held item's late end changed nothing.
    assert _items(execution_id, "process")[0].status == "cancelled"


def test_a_stalled_item_is_recovered_at_its_next_attempt_and_ends_once(
    app: ConveyorCelery,
) -> None:
    map_workflows.HOLD_FIRST_ATTEMPT.update({2})
    with running_worker(app):
        execution_id = enqueue(repairable, {"n": 6}, app=app)
        assert map_workflows.HOLDING.wait(timeout=20)
        # Its worker "dies": nobody beats for the item any more (another worker id).
        with get_db_session(commit=True) as session:
            session.execute(
                update(MapItem)
                .where(MapItem.execution_id == execution_id, MapItem.item_index == 2)
                .values(worker="gone:1", heartbeat_at=datetime.now(UTC) - timedelta(minutes=5))
            )
        database_reachable_for(60)
        report = app.engine.reconcile()
        assert report.items_recovered == 1
        assert (execution_id, "process", 2) in report.items
        finished = wait_for(execution_id)
        map_workflows.RELEASE.set()  # the lost attempt returns late: refused
    assert finished.status == "succeeded", finished.error
    item = _items(execution_id, "process")[2]
    assert (item.status, item.attempt, item.recoveries) == ("succeeded", 2, 1)
    assert finished.output_data == {"report": sum(range(100, 106))}


def test_queued_plus_running_items_never_exceed_max_parallel(app: ConveyorCelery) -> None:
    seen: list[int] = []
    with running_worker(app, concurrency=6):
        execution_id = enqueue(repairable, {"n": 60}, app=app)
        while app.engine.manager.get_execution(execution_id).status in ("pending", "running"):
            with get_db_session() as session:
                seen.append(
                    int(
                        session.scalar(
                            select(func.count())
                            .select_from(MapItem)
                            .where(
                                MapItem.execution_id == execution_id,
                                MapItem.status.in_(["queued", "running"]),
                            )
                        )
                        or 0
                    )
                )
        finished = wait_for(execution_id)
    assert finished.status == "succeeded", finished.error
    # (a map that ends before the first sample leaves none: the rows below still judge)
    assert max(seen, default=0) <= 3  # max_parallel of "process", as sampled
    # Exactly, from the rows: each item was queued (or passed a slot straight to running)
    # until it ended; the peak of those half-open intervals (an end and the admission it
    # made share one moment) is what was in flight at once. A sampler alone may miss a
    # map that runs between two of its samples.
    with get_db_session() as session:
        rows = session.execute(
            select(MapItem.queued_at, MapItem.started_at, MapItem.finished_at).where(
                MapItem.execution_id == execution_id
            )
        ).all()
    assert len(rows) == 60
    moments = sorted(
        [(r.finished_at, -1) for r in rows] + [(r.queued_at or r.started_at, 1) for r in rows]
    )
    in_flight = peak = 0
    for _, change in moments:
        in_flight += change
        peak = max(peak, in_flight)
    assert 1 <= peak <= 3


def test_a_running_map_keeps_its_executions_concurrency_slot(app: ConveyorCelery) -> None:
    with running_worker(app):
        first = enqueue(limited, {"hold": True}, app=app)
        assert map_workflows.HOLDING.wait(timeout=20)
        second = enqueue(limited, {}, app=app)
        # The map's execution is not parked: the second waits for the slot.
        assert app.engine.manager.get_execution(second).status == "pending"
        assert app.engine.manager.get_execution(first).parked_at is None
        map_workflows.RELEASE.set()
        assert wait_for(first).status == "succeeded"
        assert wait_for(second).status == "succeeded"


def _children_of(execution_id: str) -> list[WorkflowExecution]:
    with get_db_session() as session:
        return list(
            session.scalars(
                select(WorkflowExecution)
                .where(WorkflowExecution.parent_execution_id == execution_id)
                .order_by(WorkflowExecution.parent_item_index)
            )
        )


def test_a_child_map_runs_one_child_execution_per_item(app: ConveyorCelery) -> None:
    names = ["acme", "globex", "initech", "umbrella", "hooli"]
    with running_worker(app):
        execution_id = enqueue(per_tenant, {"tenants": names}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded", finished.error
    assert finished.output_data == {"rows_total": sum(len(n) for n in names)}
    synced = step_row(execution_id, "synced")["output_data"]
    assert [s["sync"]["tenant"] for s in synced] == names  # in item order
    children = _children_of(execution_id)
    assert [c.parent_item_index for c in children] == list(range(5))
    assert {(c.workflow_id, c.status) for c in children} == {(tenant_sync.name, "succeeded")}
    assert [c.input_data["tenant"] for c in children] == names
    assert {c.root_execution_id for c in children} == {execution_id}


def test_a_failed_child_fails_its_child_map_and_cancels_the_others(app: ConveyorCelery) -> None:
    names = [f"t{i}" for i in range(12)]
    with running_worker(app):
        execution_id = enqueue(per_tenant, {"tenants": names, "broken": ["t1"]}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "failed"
    error = step_row(execution_id, "synced")["error"]
    assert error["type"] == "MapItemsFailed"
    assert error["item"] == 1
    assert "ChildFailed" in error["message"]
    statuses = {i.status for i in _items(execution_id, "synced")}
    assert not {"pending", "queued", "running"} & statuses
    # No child is left running.
    assert not {"pending", "running"} & {c.status for c in _children_of(execution_id)}
