"""The embedded default under load: SQLite and the filesystem broker, no server at all.

Two real ``celery worker`` processes consume while producer processes enqueue
executions, as a user's worker, beat and scripts do (README's quickstart). kombu's own
filesystem transport let a worker take a message file still being written: the worker
died of a JSONDecodeError and the message was lost (worker.filesystem_transport).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from core.execution_state_manager import SyncExecutionStateManager
from core.models import WorkflowExecution
from tests.conftest import TestDatabase
from tests.helpers.broker_race import enqueue_from_processes
from tests.helpers.processes import worker_process
from tests.helpers.state import step_row

pytestmark = pytest.mark.sqlite_only

PRODUCERS = 4
EXECUTIONS_EACH = 40
STEPS = ("double", "add_one", "describe")
FINAL = ("succeeded", "failed", "cancelled", "timed_out")


def _wait_while_alive(
    ids: list[str], workers: dict[str, subprocess.Popen[bytes]], logs: Path, timeout: float = 60
) -> list[WorkflowExecution]:
    """Every execution once final; fails at once, with its log, if a worker exits."""
    manager = SyncExecutionStateManager()
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while True:
        for name, process in workers.items():
            log = (logs / f"{name}.log").read_text()
            assert process.poll() is None, f"the {name} worker exited:\n{log[-4000:]}"
        pending = [i for i in pending if manager.get_execution(i).status not in FINAL]
        if not pending:
            return [manager.get_execution(i) for i in ids]
        assert time.monotonic() < deadline, f"{len(pending)} executions not final in {timeout}s"
        time.sleep(0.1)


def test_two_workers_and_four_producers_run_every_execution_on_the_embedded_broker(
    database: TestDatabase, tmp_path: Path
) -> None:
    folder = tmp_path / "broker"
    env = {
        "CONVEYOR_BROKER_FOLDER": str(folder),
        # Every step through the broker (none continued in the worker), polled often:
        # as many messages, and as many looks at the folder, as the run can make.
        "CONVEYOR_CONTINUE_MAX_STEPS": "0",
        "CONVEYOR_BROKER_POLL_INTERVAL": "0.001",
    }
    broker = "filesystem://localhost/"
    with (
        worker_process(database, broker, tmp_path / "first.log", concurrency=4, env=env) as first,
        worker_process(database, broker, tmp_path / "second.log", concurrency=4, env=env) as second,
    ):
        ids = enqueue_from_processes(database.url, folder, PRODUCERS, EXECUTIONS_EACH)
        finished = _wait_while_alive(ids, {"first": first, "second": second}, tmp_path)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("first", "second")}
    for name, text in logs.items():
        assert "Unrecoverable error" not in text, f"{name} worker:\n{text}"
        assert "undecodable message" not in text, f"{name} worker:\n{text}"
    assert len(set(ids)) == PRODUCERS * EXECUTIONS_EACH
    assert {e.status for e in finished} == {"succeeded"}
    # Every step's message delivered once: each step ran in its first attempt.
    attempts = {step_row(e.execution_id, s)["attempt"] for e in finished for s in STEPS}
    assert attempts == {1}
    assert sorted(p.name for p in (folder / "queue").iterdir()) == []
    assert sorted((folder / "quarantine").iterdir()) == []
