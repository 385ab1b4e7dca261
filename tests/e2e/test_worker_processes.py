"""Real `celery worker` processes: soft timeouts (prefork) and a worker killed mid-step."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.conftest import TestDatabase
from tests.e2e.conftest import wait_for
from tests.helpers.processes import worker_process
from tests.helpers.state import events, step_row
from worker.app import ConveyorCelery
from worker.producer import enqueue


def recover_stalled(app: ConveyorCelery, timeout: float = 60) -> list[tuple[str, str]]:
    """Reconciler passes, as beat runs them, until one requeues a stalled step; those."""
    deadline = time.monotonic() + timeout
    while True:
        requeued = app.engine.reconcile().requeued
        if requeued:
            return requeued
        assert time.monotonic() < deadline, f"no stalled step was recovered in {timeout}s"
        time.sleep(0.5)


def test_soft_timeout_fails_the_attempt_and_follows_the_retry_policy(
    database: TestDatabase, redis_url: str, conveyor_app: ConveyorCelery, tmp_path: Path
) -> None:
    with worker_process(database, redis_url, tmp_path / "worker.log"):
        execution_id = enqueue("sleepy", app=conveyor_app)
        execution = wait_for(execution_id, timeout=60)
    assert execution.status == "failed"
    step = step_row(execution_id, "overrun")
    assert step["attempt"] == 2
    assert step["error"]["type"] == "StepTimedOut"
    assert "soft timeout of 0.5s" in step["error"]["message"]
    assert events(execution_id).count(("overrun", "running", "queued")) == 1


def test_worker_killed_mid_step_is_recovered_and_the_execution_finishes(
    database: TestDatabase, redis_url: str, conveyor_app: ConveyorCelery, tmp_path: Path
) -> None:
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"stall_timeout": 2.0})
    with worker_process(database, redis_url, tmp_path / "first.log") as first:
        execution_id = enqueue("crashy", app=conveyor_app)
        wait_for(
            execution_id, lambda _: step_row(execution_id, "hang_first_time")["status"] == "running"
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    with worker_process(database, redis_url, tmp_path / "second.log"):
        # What beat would do every few seconds: a reconciler pass.
        recover_stalled(conveyor_app)
        execution = wait_for(execution_id, timeout=60)
    assert execution.status == "succeeded"
    assert execution.output_data == {"after_crash": "recovered on attempt 2"}
    assert step_row(execution_id, "hang_first_time")["attempt"] == 2
    history = events(execution_id)
    assert history.count(("hang_first_time", "running", "queued")) == 1
    assert history.count(("hang_first_time", "running", "succeeded")) == 1


def test_one_killed_pool_process_is_recovered_while_its_siblings_live(
    database: TestDatabase, redis_url: str, conveyor_app: ConveyorCelery, tmp_path: Path
) -> None:
    """Each prefork child beats for its own steps only: a SIGKILLed child's step goes
    stale (the heartbeats of a sibling still running keep only its own step alive)."""
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"stall_timeout": 2.0})

    def running(execution_id: str) -> bool:
        return step_row(execution_id, "hang_first_time")["status"] == "running"

    with worker_process(database, redis_url, tmp_path / "worker.log", concurrency=3) as worker:
        victim = enqueue("crashy", app=conveyor_app)
        survivor = enqueue("crashy", app=conveyor_app)
        wait_for(victim, lambda _: running(victim) and running(survivor))
        victim_worker = step_row(victim, "hang_first_time")["worker"]
        # Two pool processes, two identities: each heartbeat covers its own step only.
        assert step_row(survivor, "hang_first_time")["worker"] != victim_worker
        child_pid = int(victim_worker.rsplit(":", 1)[1])
        assert child_pid not in (0, worker.pid, os.getpid())
        os.kill(child_pid, signal.SIGKILL)
        recovered = recover_stalled(conveyor_app)
        assert recovered == [(victim, "hang_first_time")]
        execution = wait_for(victim, timeout=60)
        # The survivor is still in its first attempt, beating: never taken for stalled.
        assert running(survivor)
        assert step_row(survivor, "hang_first_time")["attempt"] == 1
        os.killpg(worker.pid, signal.SIGKILL)  # its hanging step would delay a warm stop
    assert execution.status == "succeeded"
    assert step_row(victim, "hang_first_time")["attempt"] == 2


def test_a_hard_time_limit_is_recorded_when_celery_kills_the_step(
    database: TestDatabase, redis_url: str, conveyor_app: ConveyorCelery, tmp_path: Path
) -> None:
    # The stall timeout stays at its default (60 s): the step must be recorded at once,
    # when Celery kills the pool process, not found later as a stalled step.
    with worker_process(database, redis_url, tmp_path / "worker.log"):
        execution_id = enqueue("stuck", app=conveyor_app)
        execution = wait_for(execution_id, timeout=20)
    assert execution.status == "failed"
    step = step_row(execution_id, "past_hard_limit")
    assert step["error"]["type"] == "StepTimedOut"
    assert "hard timeout of 1.0s" in step["error"]["message"]
    assert step["attempt"] == 1


def test_a_continued_step_whose_worker_is_killed_is_recovered_and_completes_once(
    database: TestDatabase, redis_url: str, conveyor_app: ConveyorCelery, tmp_path: Path
) -> None:
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"stall_timeout": 2.0})
    with worker_process(database, redis_url, tmp_path / "first.log") as first:
        execution_id = enqueue("relay", {"hang": True}, app=conveyor_app)
        wait_for(execution_id, lambda _: step_row(execution_id, "carry")["status"] == "running")
        # carry was claimed by the transaction that completed hand_over, in the worker.
        assert ("carry", "queued", "running") in events(execution_id)
        assert step_row(execution_id, "carry")["celery_task_id"] is None
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    with worker_process(database, redis_url, tmp_path / "second.log"):
        recover_stalled(conveyor_app)
        execution = wait_for(execution_id, timeout=60)
    assert execution.status == "succeeded"
    assert execution.output_data == {"carry": "handed over, carried"}
    carry = step_row(execution_id, "carry")
    assert (carry["attempt"], carry["recoveries"]) == (2, 1)
    history = events(execution_id)
    assert history.count(("carry", "running", "queued")) == 1
    assert history.count(("carry", "running", "succeeded")) == 1
    assert history.count(("hand_over", "running", "succeeded")) == 1
