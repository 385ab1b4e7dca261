"""Held siblings: the worker that completes a fan-out's root continues one branch and
holds the others (queued, no message), running them one after another itself; what it
has not started within CONVEYOR_HOLD_SECONDS goes to the broker, and a worker that dies
holding them loses none."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TestDatabase
from tests.e2e import held_workflows
from tests.e2e.conftest import running_worker, wait_for
from tests.e2e.test_continuation import CONTINUED, reasons
from tests.e2e.test_worker_processes import recover_stalled
from tests.e2e.workflows import CALLS
from tests.helpers.processes import worker_process
from tests.helpers.state import events, step_row
from worker.app import ConveyorCelery
from worker.producer import enqueue

BRANCHES = held_workflows.BRANCHES
HELD = ["upstream steps done", CONTINUED, "step succeeded"]
MODULES = "tests.e2e.workflows,tests.e2e.held_workflows"


@pytest.fixture
def app(conveyor_app: ConveyorCelery) -> ConveyorCelery:
    """conveyor_app with the fan-outs of held_workflows registered."""
    conveyor_app.engine.registry.load_module(held_workflows.__name__)
    return conveyor_app


@pytest.fixture(autouse=True)
def _fresh_events() -> Iterator[None]:
    for event in (*held_workflows.BRANCH_RAN.values(), held_workflows.GATE):
        event.clear()
    yield
    held_workflows.GATE.set()  # a test that failed midway leaves no step waiting on it


def _settings(app: ConveyorCelery, **values: object) -> None:
    app.engine.settings = app.engine.settings.model_copy(update=values)


def _ran_once(execution_id: str, *names: str) -> None:
    history = events(execution_id)
    for name in names:
        assert CALLS[(execution_id, name)] == 1, name
        assert history.count((name, "queued", "running")) == 1, name
        assert history.count((name, "running", "succeeded")) == 1, name


def _held_count(app: ConveyorCelery, workflow: str) -> tuple[float, float]:
    """conveyor_steps_held_total of ``workflow`` in this process: (held, handed off)."""
    registry = app.engine.metrics.registry
    found = [
        registry.get_sample_value("conveyor_steps_held_total", {"workflow": workflow, "how": how})
        for how in ("held", "handed_off")
    ]
    return (found[0] or 0.0, found[1] or 0.0)


def test_a_fan_out_runs_its_held_siblings_in_the_worker_that_held_them(
    app: ConveyorCelery,
) -> None:
    # A hold long enough for any machine: every sibling is run by the holder.
    _settings(app, hold_seconds=30.0)
    before = _held_count(app, "held_fan")
    with running_worker(app):
        execution_id = enqueue("held_fan", app=app)
        execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    # conveyor_steps_held_total counts them; none was handed off.
    assert _held_count(app, "held_fan") == (before[0] + len(BRANCHES), before[1])
    outputs = execution.output_data["sink"]
    assert outputs["a_first"]["value"] == 10
    assert {name: outputs[name]["value"] for name in BRANCHES} == dict.fromkeys(BRANCHES, 11)
    # One chain in one thread: the continued branch, then each held one, then the sink.
    assert len({outputs[name]["thread"] for name in ("a_first", *BRANCHES)}) == 1
    assert reasons(execution_id, "a_first") == HELD
    for name in BRANCHES:
        assert reasons(execution_id, name) == HELD, name
        row = step_row(execution_id, name)
        assert row["celery_task_id"] is None  # no message ever named it
        assert row["next_attempt_at"] is None  # the claim cleared the hold
        assert row["republishes"] == 0
    assert reasons(execution_id, "sink") == HELD
    _ran_once(execution_id, "root", "a_first", *BRANCHES, "sink")


def test_held_siblings_are_handed_off_while_a_slow_branch_still_runs(
    app: ConveyorCelery,
) -> None:
    """a_slow, the continued branch, returns only once its held siblings ran: they can
    only have run elsewhere, handed off by the heartbeat thread when the hold ran out."""
    _settings(app, hold_seconds=0.2)
    handed_before = _held_count(app, "held_slow")[1]
    with running_worker(app, concurrency=4):
        execution_id = enqueue("held_slow", app=app)
        execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert _held_count(app, "held_slow")[1] == handed_before + len(BRANCHES)
    outputs = execution.output_data["sink"]
    assert outputs["a_slow"] is True
    for name in BRANCHES:
        assert reasons(execution_id, name) == [
            "upstream steps done",
            "handed off",
            "claimed",
            "step succeeded",
        ], name
        assert step_row(execution_id, name)["celery_task_id"] is not None
    _ran_once(execution_id, "a_slow", *BRANCHES, "sink")


def test_the_chain_hands_off_what_it_holds_when_it_ends(app: ConveyorCelery) -> None:
    """One continued step per chain: the branch continued after root ends the chain, and
    the siblings still held are sent to the broker then, not when the hold runs out."""
    _settings(app, hold_seconds=30.0, continue_max_steps=1)
    with running_worker(app):
        execution_id = enqueue("held_fan", app=app)
        execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert reasons(execution_id, "a_first") == HELD
    for name in BRANCHES:
        assert reasons(execution_id, name)[:2] == ["upstream steps done", "handed off"], name
    _ran_once(execution_id, "root", "a_first", *BRANCHES, "sink")


def test_a_message_for_a_held_sibling_is_a_no_op(app: ConveyorCelery) -> None:
    _settings(app, hold_seconds=30.0)
    with running_worker(app):
        execution_id = enqueue("held_gate", app=app)
        wait_for(execution_id, lambda _: step_row(execution_id, "a_gate")["status"] == "running")
        for name in BRANCHES:
            held = step_row(execution_id, name)
            assert held["status"] == "queued"
            assert held["next_attempt_at"] is not None
            # What a stray duplicate delivery does: its claim is refused, nothing runs.
            app.engine.run_step(execution_id, name, task_id=f"stray-{name}")
            assert step_row(execution_id, name)["status"] == "queued"
            assert CALLS[(execution_id, name)] == 0
        held_workflows.GATE.set()
        execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert execution.output_data["sink"]["a_gate"] == "opened"
    for name in BRANCHES:
        assert reasons(execution_id, name) == HELD, name
    _ran_once(execution_id, "a_gate", *BRANCHES, "sink")


def test_held_siblings_of_a_cancelled_execution_never_run(app: ConveyorCelery) -> None:
    _settings(app, hold_seconds=30.0)
    with running_worker(app):
        execution_id = enqueue("held_gate", app=app)
        wait_for(execution_id, lambda _: step_row(execution_id, "a_gate")["status"] == "running")
        assert app.engine.cancel(execution_id)
        held_workflows.GATE.set()  # a_gate returns; its completion finds it cancelled
        wait_for(execution_id, lambda _: step_row(execution_id, "a_gate")["output_data"])
    execution = wait_for(execution_id)
    assert execution.status == "cancelled"
    for name in BRANCHES:
        assert step_row(execution_id, name)["status"] == "cancelled", name
        assert CALLS[(execution_id, name)] == 0, name
        assert "handed off" not in reasons(execution_id, name), name


def test_siblings_with_time_limits_run_under_their_own_task_limits(
    database: TestDatabase, redis_url: str, app: ConveyorCelery, tmp_path: Path
) -> None:
    """b has a soft time limit of its own: nothing of this fan-out is held or continued,
    each branch is delivered as its own task, and b is interrupted at its limit."""
    env = {"CONVEYOR_WORKFLOW_MODULES": MODULES, "CONVEYOR_HOLD_SECONDS": "30"}
    with worker_process(database, redis_url, tmp_path / "worker.log", env=env):
        execution_id = enqueue("held_limited", app=app)
        execution = wait_for(execution_id, timeout=60)
    assert execution.status == "failed"
    b = step_row(execution_id, "b")
    assert b["error"]["type"] == "StepTimedOut"
    assert "soft timeout of 0.5s" in b["error"]["message"]
    for name in ("a_first", "c", "d"):
        assert reasons(execution_id, name) == [
            "upstream steps done",
            "claimed",
            "step succeeded",
        ], name
        assert step_row(execution_id, name)["celery_task_id"] is not None


def test_a_worker_killed_while_holding_siblings_loses_none(
    database: TestDatabase, redis_url: str, app: ConveyorCelery, tmp_path: Path
) -> None:
    """SIGKILL while a_hang runs and b, c, d are held: the held rows fall due after the
    hold and its grace, the reconciler sends them, a_hang is recovered, and the execution
    finishes once with every branch run once."""
    _settings(app, stall_timeout=2.0)
    hang = tmp_path / "hang"
    hang.touch()
    env = {
        "CONVEYOR_WORKFLOW_MODULES": MODULES,
        "CONVEYOR_HOLD_SECONDS": "5",
        held_workflows.HANG_ENV: str(hang),
    }
    with worker_process(database, redis_url, tmp_path / "first.log", env=env) as first:
        execution_id = enqueue("held_hang", app=app)
        wait_for(execution_id, lambda _: step_row(execution_id, "a_hang")["status"] == "running")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # Killed while it held them: never handed off, no message sent.
    for name in BRANCHES:
        row = step_row(execution_id, name)
        assert (row["status"], row["republished_at"]) == ("queued", None), name
        assert row["next_attempt_at"] is not None, name
    hang.unlink()
    with worker_process(database, redis_url, tmp_path / "second.log", env=env):
        recover_stalled(app)  # a_hang
        execution = _reconciled(app, execution_id)  # and the held steps, once due
    assert execution.status == "succeeded"
    outputs = execution.output_data["sink"]
    assert outputs["a_hang"] == "attempt 2"
    assert {name: outputs[name]["value"] for name in BRANCHES} == dict.fromkeys(BRANCHES, 11)
    history = events(execution_id)
    assert history.count(("a_hang", "running", "queued")) == 1
    for name in (*BRANCHES, "sink"):
        assert history.count((name, "running", "succeeded")) == 1, name
        assert history.count((name, "queued", "running")) == 1, name
        assert step_row(execution_id, name)["attempt"] == 1, name
    for name in BRANCHES:
        assert "republished" in reasons(execution_id, name), name
    assert history.count((None, "running", "succeeded")) == 1


def _reconciled(app: ConveyorCelery, execution_id: str, timeout: float = 60) -> Any:
    """Reconciler passes, as beat runs them, until the execution is final; it."""
    deadline = time.monotonic() + timeout
    while True:
        app.engine.reconcile()
        execution = wait_for(execution_id, lambda _: True)
        if execution.status != "running":
            return execution
        assert time.monotonic() < deadline, f"{execution_id} still running after {timeout}s"
        time.sleep(0.5)
