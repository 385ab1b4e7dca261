"""Rolling deploys (core.shapes): workers with different releases of the code on one
database and broker. An execution runs only on code whose shape may finish it; a worker
that may not hands its step back (never failing it) to a live worker that may, or
leaves it waiting, visibly, until one comes up or an operator migrates it.

The old release runs in worker processes (``celery worker``, the workflow module
tests/e2e/deploy_workflows.py picking its release from CONVEYOR_TEST_DEPLOY); the new
one in this process or in processes too. Each step's output names the release that ran
it and its upstream steps ("old>old>old")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.config import Settings
from core.database import get_db_session
from core.errors import InputValidationError, InvalidTransition
from core.models import WorkerShape
from core.registry import WorkflowRegistry
from core.shapes import incompatibility, shape_of, stranded
from core.workflows import Workflow
from tests.conftest import TestDatabase
from tests.e2e import deploy_workflows
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
from tests.helpers.processes import REPO, worker_process
from tests.helpers.state import events, execution_row, step_row
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue

MODULE = deploy_workflows.__name__
ALL_OLD = {"third": "old>old>old"}
FINAL = ("succeeded", "failed", "cancelled", "timed_out")


def _app(settings: Settings, code: str, change: str = "") -> ConveyorCelery:
    registry = WorkflowRegistry()
    registry.register(deploy_workflows.build(code, change))
    registry.register(deploy_workflows.build_map(code, change))
    app = create_app(settings, registry)
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "polling_interval": 0.1,
    }
    return app


@pytest.fixture
def settings(database: TestDatabase, redis_url: str) -> Settings:
    """The test database and a broker emptied once for the test."""
    return clean_app_settings(database, redis_url)


@pytest.fixture
def releases(settings: Settings) -> Callable[[str], tuple[ConveyorCelery, ConveyorCelery]]:
    """Apps (producers, in-process workers) of the old release and of the new one with
    a change (deploy_workflows.CHANGES), on one database and broker."""

    def build(change: str) -> tuple[ConveyorCelery, ConveyorCelery]:
        return _app(settings, "old"), _app(settings, "new", change)

    return build


@contextmanager
def old_workers(
    database: TestDatabase, redis_url: str, log: Path, release: str = "old"
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker process of ``release``, said to be up (its shape row written)."""
    env = {"CONVEYOR_WORKFLOW_MODULES": MODULE, "CONVEYOR_TEST_DEPLOY": release}
    with worker_process(database, redis_url, log, env=env) as process:
        code, _, change = release.partition(":")
        wanted = shape_of(deploy_workflows.build(code, change)).hash
        deadline = time.monotonic() + 30
        while wanted not in _live_shapes():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield process


@contextmanager
def beat(app: ConveyorCelery, every: float = 0.5) -> Iterator[None]:
    """Reconciler passes of ``app`` every ``every`` seconds, as beat sends them."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            app.engine.reconcile()

    thread = threading.Thread(target=run, name="test-beat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def _live_shapes() -> list[str]:
    with get_db_session() as db:
        return list(db.execute(select(WorkerShape.shape_hash)).scalars())


def _held(execution_id: str, step: str = "first") -> Callable[[Any], bool]:
    def held(_execution: Any) -> bool:
        row = step_row(execution_id, step)
        return bool(row["status"] == "waiting" and row["wait_kind"] == "version")

    return held


def _settled(execution_id: str) -> Callable[[Any], bool]:
    """Finished, or a step held for a compatible worker."""

    def settled(execution: Any) -> bool:
        if execution.status in FINAL:
            return True
        with get_db_session() as db:
            from core.models import StepExecution

            return bool(
                db.execute(
                    select(StepExecution.step_name).where(
                        StepExecution.execution_id == execution_id,
                        StepExecution.wait_kind == "version",
                        StepExecution.status == "waiting",
                    )
                ).first()
            )

    return settled


def _stranded(app: ConveyorCelery) -> list[str]:
    shapes = {(w.name, w.version): shape_of(w) for w in app.engine.registry}
    found = app.engine.manager.run(stranded, shapes, {w.name for w in app.engine.registry})
    return sorted(s.execution_id for s in found)


def _versions(database: TestDatabase, redis_url: str, release: str, *args: str) -> Any:
    """`conveyor versions ARGS` with the workflows of ``release``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CONVEYOR_DATABASE_URL": database.url,
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_WORKFLOW_MODULES": MODULE,
        "CONVEYOR_TEST_DEPLOY": release,
        "COLUMNS": "250",
    }
    command = [str(Path(sys.executable).parent / "conveyor"), "versions", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_compatibility_compares_the_remaining_steps_only() -> None:
    build = deploy_workflows.build
    old = shape_of(build("old"))
    assert shape_of(build("new", "body")).hash == old.hash  # a body is not a contract
    renamed = shape_of(build("new", "renamed"))
    assert incompatibility(old, renamed, {"first", "second", "third"}) == (
        "step 'third' is not in this code"
    )
    assert incompatibility(old, renamed, set()) == "step 'third_renamed' is new in this code"
    bumped = shape_of(build("new", "version"))
    assert incompatibility(old, bumped, {"second", "third"}) == "step 'second' changed (version)"
    assert incompatibility(old, bumped, {"third"}) is None  # second is done
    extra = shape_of(build("new", "extra"))
    assert incompatibility(old, extra, {"third"}) == "step 'fourth' is new in this code"
    assert incompatibility(old, None, {"third"}) == "this code has no workflow 'deploy' version 1"


def test_a_changed_body_with_the_same_contract_runs_old_executions(
    releases: Callable[[str], tuple[ConveyorCelery, ConveyorCelery]],
) -> None:
    old, new = releases("body")
    execution_id = enqueue("deploy", {}, app=old)
    with running_worker(new):
        execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert execution.output_data == {"third": "new>new>new*"}


@pytest.mark.parametrize("change", ["renamed", "extra", "version"])
def test_an_incompatible_worker_hands_the_step_back_until_a_compatible_one_is_up(
    releases: Callable[[str], tuple[ConveyorCelery, ConveyorCelery]],
    database: TestDatabase,
    redis_url: str,
    tmp_path: Path,
    change: str,
) -> None:
    old, new = releases(change)
    metrics = new.engine.metrics.registry
    labels = {"workflow": "deploy", "how": "waiting"}
    before = metrics.get_sample_value("conveyor_steps_handed_back_total", labels) or 0.0
    execution_id = enqueue("deploy", {}, app=old)
    with running_worker(new):
        # Only the new release is up: the step waits, visibly; the execution runs on.
        wait_for(execution_id, _held(execution_id))
        assert execution_row(execution_id)["status"] == "running"
        history = events(execution_id)
        assert ("first", "running", "waiting") in history
        assert not [e for e in history if e[2] == "failed"]
        assert _stranded(new) == [execution_id]
        after = metrics.get_sample_value("conveyor_steps_handed_back_total", labels)
        assert after == before + 1
        # A worker of the old release comes up: the next reconciler pass sends it there.
        with old_workers(database, redis_url, tmp_path / "old.log"):
            new.engine.reconcile()
            execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert execution.output_data == ALL_OLD
    assert _stranded(new) == []


def test_a_step_handed_back_goes_straight_to_a_live_compatible_worker(
    releases: Callable[[str], tuple[ConveyorCelery, ConveyorCelery]],
    database: TestDatabase,
    redis_url: str,
    tmp_path: Path,
) -> None:
    old, new = releases("renamed")
    with old_workers(database, redis_url, tmp_path / "old.log"), running_worker(new):
        ids = [enqueue("deploy", {}, app=old) for _ in range(8)]
        executions = [wait_for(execution_id) for execution_id in ids]
    assert [e.output_data for e in executions] == [ALL_OLD] * len(ids)
    for execution_id in ids:
        # Whatever the new release claimed went to the old one at once, not to wait.
        assert ("first", "running", "waiting") not in events(execution_id)


def test_map_items_handed_back_run_on_the_compatible_worker(
    releases: Callable[[str], tuple[ConveyorCelery, ConveyorCelery]],
    database: TestDatabase,
    redis_url: str,
    tmp_path: Path,
) -> None:
    old, new = releases("renamed")
    with old_workers(database, redis_url, tmp_path / "old.log"), running_worker(new):
        ids = [enqueue("deploy_map", app=old) for _ in range(4)]
        executions = [wait_for(execution_id) for execution_id in ids]
    expected = {"total": [f"old:{i}" for i in range(20)]}
    assert [e.output_data for e in executions] == [expected] * len(ids)


def test_migrate_moves_an_execution_to_the_code_at_hand(
    releases: Callable[[str], tuple[ConveyorCelery, ConveyorCelery]],
) -> None:
    old, new = releases("extra")
    workflow = new.engine.registry.get("deploy")
    other = Workflow("other")

    @other.step()
    def only(ctx: Any) -> int:
        return 1

    held_id = enqueue("deploy", {}, app=old)
    with running_worker(new):
        wait_for(held_id, _held(held_id))
        with pytest.raises(InputValidationError, match="runs workflow 'deploy'"):
            new.engine.migrate(held_id, other, actor="ops@example.com")
        moved = new.engine.migrate(held_id, workflow, actor="ops@example.com")
        assert (moved.removed, moved.added, moved.queued) == ((), ("fourth",), ("first",))
        execution = wait_for(held_id)
        with pytest.raises(InvalidTransition):  # a finished execution is not moved
            new.engine.migrate(held_id, workflow, actor="ops@example.com")
    assert execution.status == "succeeded"
    assert execution.output_data == {"fourth": "new>new>new>new"}
    assert execution_row(held_id)["shape_hash"] == shape_of(workflow).hash
    assert ("first", "waiting", "queued") in events(held_id)


def test_a_rolling_deploy_with_real_processes_strands_nothing(
    database: TestDatabase, redis_url: str, settings: Settings, tmp_path: Path
) -> None:
    """Old workers up; new workers start; old workers stop: executions in flight across
    the switch finish on a compatible worker or wait visibly, none fails, and `versions
    check` with the new release names exactly those that wait; an old worker started
    again drains them."""
    producer = _app(settings, "old")  # producers still on the old release
    # Beat's reconciler, with a short republish delay: a message a stopped worker left
    # unconsumed is sent again soon.
    reconciler = _app(settings.model_copy(update={"republish_after": 2.0}), "new", "renamed")
    new_release = "new:renamed"
    pause = {"pause": 0.3}
    with beat(reconciler), old_workers(database, redis_url, tmp_path / "old1.log") as old:
        in_flight = [enqueue("deploy", pause, app=producer) for _ in range(6)]
        with worker_process(
            database,
            redis_url,
            tmp_path / "new.log",
            env={"CONVEYOR_WORKFLOW_MODULES": MODULE, "CONVEYOR_TEST_DEPLOY": new_release},
        ):
            across = [enqueue("deploy", pause, app=producer) for _ in range(6)]
            os.killpg(old.pid, signal.SIGTERM)  # the old release stops (warm shutdown)
            old.wait(timeout=60)
            after = [enqueue("deploy", {}, app=producer) for _ in range(3)]
            settled = [wait_for(e, _settled(e), timeout=60) for e in in_flight + across + after]
            assert {e.status for e in settled} <= {"running", "succeeded"}
            waiting = sorted(e.execution_id for e in settled if e.status == "running")
            # What the new release could not finish waits: those created after the switch
            # at least, and nothing failed for the deploy.
            assert set(after) <= set(waiting)
            for execution in settled:
                assert not [ev for ev in events(execution.execution_id) if ev[2] == "failed"]
                if execution.status == "succeeded":
                    assert execution.output_data == ALL_OLD
            check = _versions(database, redis_url, new_release, "check", "--json")
            assert check.returncode == 1, check.stderr
            assert sorted(row["execution_id"] for row in json.loads(check.stdout)) == waiting
            # An old worker again (a rollback, or one kept to drain): the held ones finish.
            with old_workers(database, redis_url, tmp_path / "old2.log"):
                drained = [wait_for(e) for e in waiting]
    assert [e.output_data for e in drained] == [ALL_OLD] * len(waiting)
    check = _versions(database, redis_url, new_release, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    listing = _versions(database, redis_url, new_release, "--json")
    assert listing.returncode == 0, listing.stderr
