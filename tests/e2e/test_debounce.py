"""Debounce: enqueues with one key collapse into one pending execution that runs with the
last input, started by the waker when its window closes; a real worker, database and
broker.

Beat does not run here: a test calls ``Engine.wake()`` (what ``conveyor.wake`` runs
every tick) itself, or runs ``_beat`` (a thread ticking as beat would) for the block.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import httpx2 as httpx
import pytest
from pydantic import BaseModel
from sqlalchemy import select, text, update
from typer.testing import CliRunner, Result

from conveyor.api.app import create_app as create_api
from conveyor.cli.main import CliState
from conveyor.cli.main import app as cli_app
from core import debounce, executions
from core.database import get_database, get_db_session
from core.errors import InputValidationError
from core.execution_state_manager import SyncExecutionStateManager
from core.models import WorkflowExecution
from core.registry import WorkflowRegistry, configure_registry
from core.sql import utcnow
from core.workflows import Concurrency, Debounce, StepContext, Workflow
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
from tests.helpers.api import client, serve, user_with_token
from tests.helpers.state import execution_row
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue, enqueue_many

PERIOD = timedelta(seconds=2)
# beat's tick in ``_beat``: the waker's latency a start may add to its window's close.
TICK = 0.2


class Change(BaseModel):
    user_id: str
    n: int


def _echo(ctx: StepContext) -> dict[str, Any]:
    # The input the run saw, to compare with what the row holds.
    return {"user_id": ctx.input.user_id, "n": ctx.input.n}


reindex = Workflow(
    "debounce-reindex",
    input_model=Change,
    debounce=Debounce(key=lambda change: change.user_id, period=PERIOD),
)
reindex.step(name="echo")(_echo)

# A steady stream outlasts max_wait: the window closes at max_wait after the first.
stream = Workflow(
    "debounce-stream",
    input_model=Change,
    debounce=Debounce(
        key=lambda change: change.user_id,
        period=timedelta(seconds=1),
        max_wait=timedelta(seconds=3),
    ),
)
stream.step(name="echo")(_echo)


# A debounced workflow whose executions take turns under a key of their input.
regional = Workflow(
    "debounce-regional",
    debounce=Debounce(key=lambda change: change["user_id"], period=PERIOD),
    concurrency=Concurrency(key=lambda change: change["region"], limit=1),
)


@regional.step()
def sync(ctx: StepContext) -> str:
    return str(ctx.input["region"])


@pytest.fixture
def app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    registry = WorkflowRegistry([reindex, stream, regional])
    configure_registry(registry)
    return create_app(clean_app_settings(database, redis_url), registry)


def _database_now() -> datetime:
    with get_db_session() as db:
        now: datetime = db.scalar(select(utcnow()))
        return now


def _executions(workflow: Workflow) -> list[dict[str, Any]]:
    with get_db_session() as db:
        rows = db.scalars(
            select(WorkflowExecution.execution_id).where(
                WorkflowExecution.workflow_id == workflow.name
            )
        ).all()
    return [execution_row(execution_id) for execution_id in rows]


def _collapsed(app: ConveyorCelery) -> float:
    """conveyor_debounced_total of ``reindex`` in this process (its registry is the
    process's: counted on from earlier tests)."""
    found = app.engine.metrics.registry.get_sample_value(
        "conveyor_debounced_total", {"workflow": reindex.name}
    )
    return found or 0.0


def _started(app: ConveyorCelery, execution_id: str, timeout: float = 30) -> dict[str, Any]:
    """Tick the waker (as beat would) until the execution has run; its row."""
    deadline = time.monotonic() + timeout
    while execution_row(execution_id)["status"] == "pending":
        if time.monotonic() > deadline:
            pytest.fail(f"execution {execution_id} still pending after {timeout} s")
        app.engine.wake()
        time.sleep(TICK)
    wait_for(execution_id)
    return execution_row(execution_id)


@contextmanager
def _beat(app: ConveyorCelery) -> Iterator[None]:
    """The waker ticking every TICK seconds in a thread for the block, as beat would."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(TICK):
            app.engine.wake()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join(10)


def test_a_burst_with_one_key_runs_once_with_the_last_input_after_the_period(
    app: ConveyorCelery,
) -> None:
    collapsed_before = _collapsed(app)
    with running_worker(app):
        ids = [enqueue(reindex, {"user_id": "u1", "n": n}, app=app) for n in range(50)]
        last_enqueue = execution_row(ids[0])["updated_at"]  # the database's clock
        assert set(ids) == {ids[0]}
        pending = execution_row(ids[0])
        assert pending["status"] == "pending"
        assert pending["input_data"] == {"user_id": "u1", "n": 49}
        assert pending["start_at"] >= last_enqueue + PERIOD
        if _database_now() < pending["start_at"]:
            # Not due: the waker leaves it (and no reconciler pass starts it either).
            assert app.engine.wake() == 0
            app.engine.reconcile()
            assert execution_row(ids[0])["status"] == "pending"
        row = _started(app, ids[0])
    assert row["status"] == "succeeded"
    assert row["output_data"] == {"echo": {"user_id": "u1", "n": 49}}
    assert row["started_at"] >= last_enqueue + PERIOD
    assert len(_executions(reindex)) == 1
    assert _collapsed(app) - collapsed_before == 49


def test_a_collapsed_enqueue_moves_the_window_to_its_inputs_limit_key(
    app: ConveyorCelery,
) -> None:
    # The window runs with the last input, so it takes turns under that input's key.
    first = enqueue(regional, {"user_id": "u1", "region": "eu-west"}, app=app)
    again = enqueue(regional, {"user_id": "u1", "region": "us-east"}, app=app)
    assert again == first
    row = execution_row(first)
    assert row["input_data"]["region"] == "us-east"
    assert "us-east" in row["limit_key"]
    assert "eu-west" not in row["limit_key"]


def test_different_keys_do_not_collapse(app: ConveyorCelery) -> None:
    with running_worker(app):
        ids = enqueue_many(
            reindex,
            [
                {"user_id": "a", "n": 1},
                {"user_id": "b", "n": 2},
                {"user_id": "a", "n": 3},
            ],
            app=app,
        )
        assert ids[0] == ids[2] != ids[1]
        rows = {eid: _started(app, eid) for eid in {ids[0], ids[1]}}
    assert rows[ids[0]]["output_data"] == {"echo": {"user_id": "a", "n": 3}}
    assert rows[ids[1]]["output_data"] == {"echo": {"user_id": "b", "n": 2}}


def test_a_steady_stream_starts_at_max_wait_and_later_enqueues_open_a_new_window(
    app: ConveyorCelery,
) -> None:
    told: dict[str, list[int]] = {}
    with running_worker(app), _beat(app):
        began = time.monotonic()
        n = 0
        while time.monotonic() - began < 5:
            execution_id = enqueue(stream, {"user_id": "u1", "n": n}, app=app)
            told.setdefault(execution_id, []).append(n)
            n += 1
            time.sleep(0.3)  # the stream's pace, what the test is about
        rows = {eid: _started(app, eid) for eid in told}
    assert len(told) >= 2
    first = min(rows.values(), key=lambda r: r["created_at"])
    # Closed at the first enqueue + max_wait, though every enqueue pushed it a period on.
    assert first["start_at"] == first["latest_start_at"]
    assert first["latest_start_at"] == first["created_at"] + timedelta(seconds=3)
    assert first["started_at"] >= first["latest_start_at"]
    assert first["started_at"] <= first["latest_start_at"] + timedelta(seconds=TICK + 2)
    for execution_id, numbers in told.items():
        # Each execution ran with the last input of the enqueues told its id.
        assert rows[execution_id]["output_data"] == {"echo": {"user_id": "u1", "n": numbers[-1]}}
    assert len(_executions(stream)) == len(told)


def _make_due(execution_id: str) -> None:
    """Move the window's start (and latest start) into the past: due at the next tick."""
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == execution_id)
            .values(start_at=utcnow(-1), latest_start_at=utcnow(-1))
        )


def _wait_until_blocked_on_a_lock(timeout: float = 10) -> None:
    """Until a PostgreSQL backend waits for a row lock (the racing enqueue)."""
    deadline = time.monotonic() + timeout
    blocked = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO workflow_executions%'"
    )
    while True:
        with get_db_session() as db:
            if db.scalar(blocked):
                return
        if time.monotonic() > deadline:
            pytest.fail("the racing enqueue never waited for the window's row lock")
        time.sleep(0.01)


def test_an_enqueue_racing_the_close_opens_a_new_window(
    app: ConveyorCelery, database: TestDatabase
) -> None:
    with running_worker(app), ThreadPoolExecutor(1) as pool:
        first = enqueue(reindex, {"user_id": "r", "n": 0}, app=app)
        _make_due(first)
        # The waker's transaction has closed the window and not committed yet when the
        # enqueue comes: the enqueue waits for the row, then finds no open window.
        with get_database().engine.begin() as conn:
            released = debounce.release_due(conn, 10)
            assert [start[0] for start in released.starts] == [first]
            late = pool.submit(enqueue, reindex, {"user_id": "r", "n": 1}, app=app)
            if database.is_postgres:  # SQLite's writers queue for the database instead
                _wait_until_blocked_on_a_lock()
        app.engine.publish_starts(released.starts)
        second = late.result(timeout=30)
        assert second != first
        rows = {eid: _started(app, eid) for eid in (first, second)}
    assert rows[first]["output_data"] == {"echo": {"user_id": "r", "n": 0}}
    assert rows[second]["output_data"] == {"echo": {"user_id": "r", "n": 1}}


@pytest.mark.postgresql_only
def test_a_window_an_enqueue_holds_is_closed_after_it_with_its_input(
    app: ConveyorCelery,
) -> None:
    with running_worker(app):
        first = enqueue(reindex, {"user_id": "h", "n": 0}, app=app)
        _make_due(first)
        new = executions.execution_of(
            app.engine.registry,
            reindex.name,
            {"user_id": "h", "n": 1},
            max_payload_bytes=app.engine.settings.max_payload_bytes,
        )
        with get_database().engine.begin() as conn:
            (created,) = executions.create_executions(conn, [new])
            assert (created.execution_id, created.created) == (first, False)
            # Its start stays due (max_wait passed), but the enqueue holds the row: the
            # waker passes over it (SKIP LOCKED) instead of closing it under the enqueue.
            assert app.engine.manager.run(debounce.release_due, 10).starts == []
        row = _started(app, first)
    assert row["output_data"] == {"echo": {"user_id": "h", "n": 1}}
    assert len(_executions(reindex)) == 1


def test_the_api_gives_every_caller_the_window_of_its_own_key(app: ConveyorCelery) -> None:
    _, token = user_with_token("ops@example.com")
    _, other_token = user_with_token("dev@example.com")
    with serve(create_api(app)) as url, client(url, token) as http:
        body = {"workflow": reindex.name, "input": {"user_id": "api", "n": 1}}
        opened = http.post("/executions", json=body)
        collapsed = http.post("/executions", json={**body, "input": {"user_id": "api", "n": 2}})
        refused = http.post("/executions", json={**body, "idempotency_key": "once"})
        with client(url, other_token) as other:
            # Windows are per caller, as idempotency keys are: never another user's execution.
            own = other.post("/executions", json=body)
        with httpx.Client(base_url=url, timeout=30) as browser:
            # The dashboard takes the login's cookie, not a bearer token.
            browser.post("/ui/login", data={"token": token, "next": "/ui"})
            page = browser.get(f"/ui/executions/{opened.json()['execution_id']}")
    assert (opened.status_code, collapsed.status_code, own.status_code) == (201, 200, 201)
    execution = collapsed.json()
    assert execution["execution_id"] == opened.json()["execution_id"] != own.json()["execution_id"]
    assert (execution["status"], execution["debounce_key"]) == ("pending", "api")
    assert execution["input"] == {"user_id": "api", "n": 2}
    assert execution["start_at"] is not None
    assert page.status_code == 200
    assert re.search(r'id="debounce-window">open for key <span class="mono">api</span>', page.text)
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "idempotency_key"


def test_conveyor_run_prints_the_windows_id_and_status_shows_its_start(
    app: ConveyorCelery,
) -> None:
    state = CliState(celery_app=app)

    def conveyor(*args: str) -> Result:
        return CliRunner().invoke(cli_app, list(args), obj=state, catch_exceptions=False)

    first = conveyor("run", reindex.name, "-i", '{"user_id": "cli", "n": 1}')
    second = conveyor("run", reindex.name, "-i", '{"user_id": "cli", "n": 2}')
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    execution_id = first.stdout.strip()
    assert second.stdout.strip() == execution_id
    assert "debounced (key 'cli'): starts " in second.stderr
    shown = conveyor("status", execution_id)
    assert shown.exit_code == 0, shown.output
    start_at = execution_row(execution_id)["start_at"]
    assert "debounce key  cli" in shown.stdout
    assert f"starts        {start_at:%Y-%m-%d %H:%M:%S}" in shown.stdout
    listed = conveyor("list", "--workflow", reindex.name)
    assert "pending (debounced)" in listed.stdout


def test_the_seeds_manager_shares_the_window_and_an_orm_add_is_refused(
    app: ConveyorCelery,
) -> None:
    manager = SyncExecutionStateManager()
    first = manager.create_execution(reindex.name, {"user_id": "seed", "n": 1})
    assert manager.create_execution(reindex.name, {"user_id": "seed", "n": 2}) == first
    assert execution_row(first)["input_data"] == {"user_id": "seed", "n": 2}
    added = WorkflowExecution(
        workflow_id=reindex.name, input_data={"user_id": "seed", "n": 3}, status="pending"
    )
    with (
        pytest.raises(InputValidationError, match="is debounced"),
        get_db_session(commit=True) as db,
    ):
        db.add(added)
    assert len(_executions(reindex)) == 1


def test_a_cancelled_window_takes_no_more_input_and_runs_when_retried(
    app: ConveyorCelery,
) -> None:
    with running_worker(app):
        cancelled = enqueue(reindex, {"user_id": "c", "n": 1}, app=app)
        assert app.engine.cancel(cancelled)
        reopened = enqueue(reindex, {"user_id": "c", "n": 2}, app=app)
        assert reopened != cancelled
        # Retried while the key has an open window again: pending, but no second window.
        assert app.engine.retry(cancelled)
        retried = wait_for(cancelled)
        assert enqueue(reindex, {"user_id": "c", "n": 3}, app=app) == reopened
        later = _started(app, reopened)
    assert retried.status == "succeeded"
    assert retried.output_data == {"echo": {"user_id": "c", "n": 1}}
    assert later["output_data"] == {"echo": {"user_id": "c", "n": 3}}
