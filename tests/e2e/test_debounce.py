"""Debounce: enqueues with one key collapse into one pending execution that runs with the
last input, started by the waker when its window closes; a real worker, database and
broker.

Beat does not run here: a test calls ``Engine.wake()`` (what ``conveyor.wake`` runs
every tick) itself, or runs ``_beat`` (a thread ticking as beat would) for the block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import select, update

from core.database import get_db_session
from core.models import WorkflowExecution
from core.registry import WorkflowRegistry, configure_registry
from core.sql import utcnow
from core.workflows import Debounce, StepContext, Workflow
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
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


@pytest.fixture
def app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    registry = WorkflowRegistry([reindex, stream])
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


def test_an_enqueue_racing_the_start_is_never_lost(app: ConveyorCelery) -> None:
    told: list[tuple[str, int]] = []
    with running_worker(app):
        for round_ in range(5):
            first = enqueue(reindex, {"user_id": f"r{round_}", "n": 0}, app=app)
            told.append((first, 0))
            # The window is due now: the waker and the enqueues below race to it.
            with get_db_session(commit=True) as db:
                db.execute(
                    update(WorkflowExecution)
                    .where(WorkflowExecution.execution_id == first)
                    .values(start_at=utcnow(-1))
                )
            barrier = threading.Barrier(5)

            def racer(n: int, key: str = f"r{round_}") -> tuple[str, int]:
                barrier.wait(10)
                return enqueue(reindex, {"user_id": key, "n": n}, app=app), n

            def waker() -> None:
                barrier.wait(10)
                app.engine.wake()

            with ThreadPoolExecutor(5) as pool:
                woken = pool.submit(waker)
                told += [f.result() for f in [pool.submit(racer, n) for n in range(1, 5)]]
                woken.result()
        rows = {eid: _started(app, eid) for eid, _ in told}
    for execution_id, row in rows.items():
        numbers = [n for eid, n in told if eid == execution_id]
        # It ran with the input the row holds, one of the enqueues told its id: an input
        # written after the start would differ from the output.
        assert row["status"] == "succeeded"
        assert row["output_data"] == {"echo": row["input_data"]}
        assert row["input_data"]["n"] in numbers
