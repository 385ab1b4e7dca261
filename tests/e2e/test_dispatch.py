"""Loading the dispatcher that ``CONVEYOR_DISPATCHER`` names (core.dispatch): once, under
a lock, again after a failure; and never publishing on an event loop's thread."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import Any

import pytest
from celery.signals import before_task_publish

from core.database import get_async_db_session, get_database
from core.dispatch import dispatch_starts
from core.models import WorkflowExecution
from tests.conftest import TestDatabase
from tests.helpers import dispatch_targets
from worker.app import ConveyorCelery
from worker.engine import START_EXECUTION

SLOW = "tests.helpers.slow_dispatcher"


@pytest.fixture
def targets(database: TestDatabase, monkeypatch: pytest.MonkeyPatch) -> Any:
    """dispatch_targets, reset; slow_dispatcher not imported yet."""
    dispatch_targets.reset()
    monkeypatch.delitem(sys.modules, SLOW, raising=False)
    yield dispatch_targets
    dispatch_targets.RELEASE.set()  # never leave an import waiting


def name_dispatcher(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """CONVEYOR_DISPATCHER=target for this process's database."""
    monkeypatch.setattr(get_database().settings, "dispatcher", target)


def test_callers_arriving_while_the_dispatcher_loads_all_dispatch(
    targets: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name_dispatcher(monkeypatch, f"{SLOW}:dispatch")
    callers = 8
    gate = threading.Barrier(callers)
    returned: list[int] = []

    def start(n: int) -> None:
        gate.wait()
        dispatch_starts([(f"execution-{n}", "w", 0)])
        returned.append(n)

    threads = [threading.Thread(target=start, args=(n,)) for n in range(callers)]
    for thread in threads:
        thread.start()
    assert targets.IMPORTING.wait(10)
    # The other callers have arrived while the import is under way. A caller that is
    # given no dispatcher returns at once; one that waits for the import does not return
    # before it ends: give the first kind a second to show itself.
    deadline = time.monotonic() + 1.0
    while len(returned) < callers - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    returned_during_import = len(returned)
    targets.RELEASE.set()
    for thread in threads:
        thread.join(10)
    assert returned_during_import == 0
    assert sorted(targets.DISPATCHED) == sorted((f"execution-{n}", "w", 0) for n in range(callers))


def test_a_dispatcher_that_fails_to_load_is_logged_as_an_error_and_tried_again(
    targets: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing_module = "tests.helpers.no_such_dispatcher:dispatch"
    not_yet = "tests.helpers.dispatch_targets:late"  # the module has no ``late`` yet
    name_dispatcher(monkeypatch, missing_module)
    with caplog.at_level(logging.ERROR, logger="core.dispatch"):
        dispatch_starts([("e1", "w", 0)])
        name_dispatcher(monkeypatch, not_yet)
        dispatch_starts([("e2", "w", 0)])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"CONVEYOR_DISPATCHER={missing_module} cannot be loaded")
    assert errors[1].startswith(f"CONVEYOR_DISPATCHER={not_yet} cannot be loaded")
    assert targets.DISPATCHED == []

    # Fixed (the setting is the same): the next start is dispatched.
    monkeypatch.setattr(dispatch_targets, "late", dispatch_targets.record, raising=False)
    dispatch_starts([("e3", "w", 0)])
    assert targets.DISPATCHED == [("e3", "w", 0)]


@pytest.mark.asyncio
async def test_an_async_orm_create_publishes_its_start_off_the_event_loop_thread(
    conveyor_app: ConveyorCelery,
) -> None:
    """The seed guide's async create (``get_async_db_session``, ``db.add``, ``await
    db.commit()``): its start message is published, and not on the loop's thread."""
    publishing_threads: list[int] = []
    published = threading.Event()

    def on_publish(sender: str | None = None, **_: Any) -> None:
        if sender == START_EXECUTION:
            publishing_threads.append(threading.get_ident())
            published.set()

    before_task_publish.connect(on_publish, weak=False)
    try:
        async with get_async_db_session() as db:
            execution = WorkflowExecution(workflow_id="quick", input_data=None, status="pending")
            db.add(execution)
            await db.commit()
        loop_thread = threading.get_ident()
        assert await asyncio.to_thread(published.wait, 10)
    finally:
        before_task_publish.disconnect(on_publish)
    assert len(publishing_threads) == 1
    assert publishing_threads[0] != loop_thread
