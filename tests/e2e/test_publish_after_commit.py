"""A publish that fails after its commit never strands the step this worker claimed in
the same transaction: the worker runs it anyway (it needs no message), and what was not
sent waits, queued, for the reconciler."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import running_worker, wait_for
from tests.faults.inject import faulty
from tests.helpers.state import step_row
from worker.app import ConveyorCelery
from worker.producer import enqueue


def fail_run_step_publishes(monkeypatch: pytest.MonkeyPatch, *steps: str) -> None:
    """Every run-step message of these steps fails to publish (the broker raises)."""
    send_task = ConveyorCelery.send_task
    for step in steps:
        send_task = faulty(send_task, f"fail:{step}")
    monkeypatch.setattr(ConveyorCelery, "send_task", send_task)


def test_a_failed_publish_after_a_completion_does_not_strand_the_continued_step(
    conveyor_app: ConveyorCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diamond: source completes, releasing left and right in one transaction that also
    claims one of them for this worker; publishing the other fails. (Holding siblings
    off: held, the other would be run by this worker, with no publish to fail.)"""
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"hold_seconds": 0.0})
    fail_run_step_publishes(monkeypatch, "left", "right")
    execution_id = enqueue("diamond", {"start": 3}, app=conveyor_app)
    with running_worker(conveyor_app):

        def branches_settled(_: object) -> bool:
            statuses = {step_row(execution_id, n)["status"] for n in ("left", "right")}
            return statuses == {"succeeded", "queued"}

        # Well under the stall timeout: at once, not by stall recovery.
        wait_for(execution_id, branches_settled, timeout=4)
    rows = {name: step_row(execution_id, name) for name in ("left", "right")}
    continued = next(row for row in rows.values() if row["status"] == "succeeded")
    unsent = next(row for row in rows.values() if row["status"] == "queued")
    assert (continued["attempt"], continued["recoveries"]) == (1, 0)
    # Not sent: the reconciler's to send; no attempt or recovery spent on it either.
    assert (unsent["attempt"], unsent["recoveries"], unsent["worker"]) == (1, 0, None)


def test_a_failed_publish_of_a_start_does_not_strand_the_root_claimed_at_start(
    conveyor_app: ConveyorCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pair: the start claims one root for this worker and publishes the other, which
    fails."""
    fail_run_step_publishes(monkeypatch, "one", "two")
    execution_id = enqueue("pair", None, app=conveyor_app)
    with running_worker(conveyor_app):

        def roots_settled(_: object) -> bool:
            statuses = {step_row(execution_id, n)["status"] for n in ("one", "two")}
            return statuses == {"succeeded", "queued"}

        wait_for(execution_id, roots_settled, timeout=4)
    rows = [step_row(execution_id, name) for name in ("one", "two")]
    ran = next(row for row in rows if row["status"] == "succeeded")
    assert (ran["attempt"], ran["recoveries"]) == (1, 0)
    assert step_row(execution_id, "joined")["status"] == "pending"
