"""Schedules end to end: two real ``celery beat`` processes and a worker run a schedule.

Two beats send ``conveyor.fire_schedules`` five times a second each; an in-process
worker runs those passes (overlapping, on four threads) and the executions they
enqueue. Each tick of a one-second schedule becomes one execution, which succeeds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel
from sqlalchemy import select

from core.database import get_db_session
from core.models import WorkflowExecution, WorkflowSchedule
from core.registry import WorkflowRegistry
from core.schedules import Schedule
from core.workflows import StepContext, Workflow
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
from worker.app import ConveyorCelery, create_app

REPO = Path(__file__).resolve().parents[2]
KEY_PREFIX = "schedule:ticking:each-second:"
BEATS = 2


class Start(BaseModel):
    start: int


ticking = Workflow(
    "ticking",
    input_model=Start,
    schedules=[Schedule(every=timedelta(seconds=1), input={"start": 20}, name="each-second")],
)


@ticking.step()
def double(ctx: StepContext) -> int:
    return int(ctx.input.start) * 2


@ticking.step(depends_on=["double"])
def add_one(ctx: StepContext, double: int) -> int:
    return double + 1


@pytest.fixture
def app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    """An app on the test database and a clean Redis, with ``ticking`` registered."""
    return create_app(clean_app_settings(database, redis_url), WorkflowRegistry([ticking]))


@contextlib.contextmanager
def beats(database: TestDatabase, redis_url: str, folder: Path) -> Iterator[None]:
    """``celery -A worker.app beat`` processes on the test's database and broker."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")},
        "PYTHONPATH": str(REPO),
        "CONVEYOR_DATABASE_URL": database.url,
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_SCHEDULE_INTERVAL": "0.2",
        "CONVEYOR_RECONCILE_INTERVAL": "3600",
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for number in range(BEATS):
            with (folder / f"beat{number}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "celery",
                            "-A",
                            "worker.app",
                            "beat",
                            "--schedule",
                            str(folder / f"beat{number}-schedule"),
                            # Each pass's "Sending due task" line is DEBUG (the idle
                            # housekeeping is quiet at INFO); the test counts them.
                            "--loglevel",
                            "debug",
                        ],
                        cwd=REPO,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        yield
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def scheduled() -> list[WorkflowExecution]:
    """The executions the schedule created, by tick."""
    with get_db_session() as db:
        return list(
            db.scalars(
                select(WorkflowExecution)
                .where(WorkflowExecution.idempotency_key.startswith(KEY_PREFIX))
                .order_by(WorkflowExecution.idempotency_key)
            )
        )


def tick_of(execution: WorkflowExecution) -> datetime:
    assert execution.idempotency_key is not None
    stamp = execution.idempotency_key.removeprefix(KEY_PREFIX)
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def test_two_beats_and_a_worker_run_each_tick_once_to_success(
    app: ConveyorCelery, database: TestDatabase, redis_url: str, tmp_path: Path
) -> None:
    with running_worker(app):
        with beats(database, redis_url, tmp_path):
            deadline = time.monotonic() + 60
            while len(scheduled()) < 3:
                assert time.monotonic() < deadline, [
                    (p.name, p.read_text()[-2000:]) for p in tmp_path.glob("*.log")
                ]
                time.sleep(0.1)
        # The beats are stopped; passes they sent may still enqueue a tick or two.
        finished = [wait_for(execution.execution_id) for execution in scheduled()]
        while len(scheduled()) > len(finished):
            finished = [wait_for(execution.execution_id) for execution in scheduled()]

    assert {execution.status for execution in finished} == {"succeeded"}
    assert all(execution.output_data == {"add_one": 41} for execution in finished), finished[0]
    ticks = [tick_of(execution) for execution in scheduled()]
    # One execution per tick, each on a whole second; and the row saw them all.
    assert len(ticks) == len(set(ticks)) >= 3
    assert all(tick.microsecond == 0 for tick in ticks)
    with get_db_session() as db:
        row = db.get(WorkflowSchedule, ("ticking", "each-second"))
    assert row is not None
    assert row.last_tick_at == max(ticks)
    assert row.next_tick_at == max(ticks) + timedelta(seconds=1)
    passes = sum(
        log.read_text().count("Sending due task conveyor-schedules")
        for log in tmp_path.glob("beat*.log")
    )
    # Both beats sent passes, many more than there were ticks: they overlapped.
    assert passes > 2 * len(ticks)
