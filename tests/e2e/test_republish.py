"""The reconciler's re-sends on the real broker: one message (a step's or a start) that
fails to publish does not keep the others of its pass from being sent, and is sent again
at the next pass; backed-off starts never hold back a slot that freed."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from core.database import get_db_session
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.executions import StepSpec
from core.models import WorkflowExecution
from core.sql import utcnow
from tests.e2e.workflows import serial
from tests.faults.inject import LOG_ENV, faulty, injected_lines
from tests.helpers.state import execution_row, force_step_status, insert_execution, step_row
from worker.app import ConveyorCelery
from worker.engine import BROKER_DOWN_AFTER, RUN_STEP, START_EXECUTION
from worker.metrics import get_metrics
from worker.producer import enqueue

STEPS = [f"s{i}" for i in range(5)]
FAILING = "s2"


def _sent_steps(redis_url: str, queue: str) -> list[str]:
    """Step names of the run-step messages waiting in the broker (every priority), and
    empty it."""
    client = redis.Redis.from_url(redis_url)
    try:
        names = []
        for key in client.scan_iter(f"{queue}*"):
            for raw in client.lrange(key, 0, -1):
                message = json.loads(raw)
                if message["headers"]["task"] != RUN_STEP:
                    continue
                _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
                names.append(kwargs["step_name"])
            client.delete(key)
        return sorted(names)
    finally:
        client.close()


def _queued_long_ago(app: ConveyorCelery, names: list[str]) -> str:
    """A running execution whose steps were queued longer ago than the republish delay,
    and no worker took them: its id."""
    manager = SyncEnhancedExecutionStateManager()
    execution_id = insert_execution("w", {}, steps=[StepSpec(name) for name in names])
    manager.transition_execution(execution_id, "running")
    manager.transition_steps(execution_id, None, "queued")
    for name in names:
        long_ago = utcnow(-app.engine.settings.republish_after - 1)
        force_step_status(execution_id, name, "queued", queued_at=long_ago)
    return execution_id


def test_a_failed_publish_does_not_drop_the_rest_of_its_pass(
    conveyor_app: ConveyorCelery, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = conveyor_app.engine
    execution_id = _queued_long_ago(conveyor_app, STEPS)
    queue = engine.settings.default_queue
    failures = get_metrics().reconciled.labels("publish_failed")
    counted = failures._value.get()
    with monkeypatch.context() as patched:
        patched.setattr(
            ConveyorCelery, "send_task", faulty(ConveyorCelery.send_task, f"fail:{FAILING}")
        )
        first = engine.reconcile()
    assert failures._value.get() - counted == 1  # conveyor_reconciled{kind="publish_failed"}

    assert sorted(name for _, name in first.republish) == STEPS
    assert _sent_steps(redis_url, queue) == [n for n in STEPS if n != FAILING]
    # Nothing was sent for it: it is as the pass found it, due at once (no backoff).
    failed = step_row(execution_id, FAILING)
    assert (failed["status"], failed["republishes"], failed["republished_at"]) == (
        "queued",
        0,
        None,
    )
    assert step_row(execution_id, "s0")["republishes"] == 1

    second = engine.reconcile()

    assert second.republish == [(execution_id, FAILING)]
    assert _sent_steps(redis_url, queue) == [FAILING]
    assert step_row(execution_id, FAILING)["republishes"] == 1
    assert {step_row(execution_id, n)["republishes"] for n in STEPS} == {1}


def test_a_pass_stops_publishing_once_the_broker_looks_down(
    conveyor_app: ConveyorCelery,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Every publish fails: after a few in a row the pass stops trying (each attempt would
    # wait out kombu's retries), and leaves every step due at the next pass.
    engine = conveyor_app.engine
    execution_id = _queued_long_ago(conveyor_app, STEPS)
    log = tmp_path / "injected.log"
    with monkeypatch.context() as patched:
        patched.setenv(LOG_ENV, str(log))
        patched.setattr(ConveyorCelery, "send_task", faulty(ConveyorCelery.send_task, "lost:1"))
        report = engine.reconcile()

    assert len(report.republish) == len(STEPS)
    assert len(injected_lines(log)) == BROKER_DOWN_AFTER
    assert _sent_steps(redis_url, engine.settings.default_queue) == []
    assert {step_row(execution_id, n)["republishes"] for n in STEPS} == {0}
    assert sorted(name for _, name in engine.reconcile().republish) == STEPS


# --- start messages -----------------------------------------------------------------------


def _sent_starts(redis_url: str, queue: str) -> list[str]:
    """Execution ids of the start messages waiting in the broker (every priority), and
    empty it."""
    client = redis.Redis.from_url(redis_url)
    try:
        ids = []
        for key in client.scan_iter(f"{queue}*"):
            for raw in client.lrange(key, 0, -1):
                message = json.loads(raw)
                if message["headers"]["task"] != START_EXECUTION:
                    continue
                _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
                ids.append(kwargs["execution_id"])
            client.delete(key)
        return sorted(ids)
    finally:
        client.close()


def _pending_long_ago(app: ConveyorCelery, count: int) -> list[str]:
    """Pending executions older than the start delay, their start messages gone (a
    flushed broker, say): their ids."""
    ids = [insert_execution("w", {}, steps=[StepSpec("s")]) for _ in range(count)]
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id.in_(ids))
            .values(updated_at=utcnow(-app.engine.settings.start_after - 1))
        )
    return ids


def test_a_failed_start_publish_does_not_drop_the_rest_of_its_pass(
    conveyor_app: ConveyorCelery, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = conveyor_app.engine
    ids = _pending_long_ago(conveyor_app, 5)
    failing = ids[2]
    queue = engine.settings.default_queue
    _sent_starts(redis_url, queue)  # the first start messages: lost, as far as this goes
    failures = get_metrics().reconciled.labels("publish_failed")
    counted = failures._value.get()
    with monkeypatch.context() as patched:
        patched.setattr(
            ConveyorCelery, "send_task", faulty(ConveyorCelery.send_task, f"fail-start:{failing}")
        )
        first = engine.reconcile()
    assert failures._value.get() - counted == 1  # conveyor_reconciled{kind="publish_failed"}

    assert sorted(execution_id for execution_id, _, _ in first.start) == sorted(ids)
    assert _sent_starts(redis_url, queue) == sorted(i for i in ids if i != failing)
    # Nothing was sent for it: it is as the pass found it, due at once (no backoff).
    row = execution_row(failing)
    assert (row["status"], row["starts_resent"], row["start_resent_at"]) == ("pending", 0, None)
    assert execution_row(ids[0])["starts_resent"] == 1

    second = engine.reconcile()

    assert [execution_id for execution_id, _, _ in second.start] == [failing]
    assert _sent_starts(redis_url, queue) == [failing]
    assert {execution_row(i)["starts_resent"] for i in ids} == {1}


def test_a_slot_freed_unseen_goes_to_a_waiting_execution_at_the_next_pass(
    conveyor_app: ConveyorCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # max_concurrency=1: the second execution waits, and its start was re-sent 3 times
    # already, the last just now (the next is 8 delays away). The first finishes in a
    # worker that dies before admitting the next (after_finish never runs): the next
    # pass admits the second, without waiting for its start to come due.
    engine = conveyor_app.engine
    first = enqueue(serial, app=conveyor_app)
    second = enqueue(serial, app=conveyor_app)
    engine.admit(serial.name, [first])
    engine.admit(serial.name, [second])
    assert (execution_row(first)["status"], execution_row(second)["status"]) == (
        "running",
        "pending",
    )
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == second)
            .values(
                updated_at=utcnow(-engine.settings.start_after * 100),
                start_resent_at=utcnow(),
                starts_resent=3,
            )
        )
    with monkeypatch.context() as patched:
        patched.setattr(engine, "after_finish", lambda _workflow: None)
        engine.run_step(first, "record_start", None)
    assert execution_row(first)["status"] == "succeeded"
    assert execution_row(second)["status"] == "pending"

    report = engine.reconcile()

    assert report.start == []  # its start is not due: the pass admitted it all the same
    assert execution_row(second)["status"] == "running"
    assert step_row(second, "record_start")["status"] == "queued"
