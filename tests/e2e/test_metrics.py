"""Metrics of real runs: an in-process worker's counters and histograms, the reconciler's,
and a prefork `celery worker` serving its pool's metrics on CONVEYOR_METRICS_PORT."""

from __future__ import annotations

import socket
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from core import steps
from tests.conftest import TestDatabase
from tests.e2e.conftest import wait_for
from tests.helpers.processes import worker_process
from tests.helpers.state import database_reachable_for, force_step_status, step_row
from worker.app import ConveyorCelery
from worker.metrics import get_metrics
from worker.producer import enqueue

Key = tuple[str, tuple[tuple[str, str], ...]]


def _samples() -> dict[Key, float]:
    """Every sample of this process's metrics, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in get_metrics().registry.collect()
        for sample in family.samples
    }


def _delta(before: dict[Key, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return _samples().get(key, 0.0) - before.get(key, 0.0)


def test_a_run_is_counted_where_its_outcomes_are_recorded(worker: ConveyorCelery) -> None:
    before = _samples()
    linear = enqueue("linear", {"start": 2}, app=worker)
    flaky = enqueue("flaky", app=worker)
    broken = enqueue("broken", app=worker)
    assert wait_for(linear).status == "succeeded"
    assert wait_for(flaky).status == "succeeded"
    assert wait_for(broken).status == "failed"

    for workflow in ("linear", "flaky", "broken"):
        assert _delta(before, "conveyor_executions_started_total", workflow=workflow) == 1
    finished = "conveyor_executions_finished_total"
    assert _delta(before, finished, workflow="linear", status="succeeded") == 1
    assert _delta(before, finished, workflow="flaky", status="succeeded") == 1
    assert _delta(before, finished, workflow="broken", status="failed") == 1
    assert _delta(before, finished, workflow="broken", status="succeeded") == 0

    ran = "conveyor_step_duration_seconds_count"
    waited = "conveyor_step_queue_wait_seconds_count"
    retries = "conveyor_step_retries_total"
    for step in ("double", "add_one", "describe"):
        assert _delta(before, ran, workflow="linear", step=step) == 1
        assert _delta(before, waited, workflow="linear", step=step) == 1
    # Two glitches retried, the third attempt succeeded: three runs, each claimed once.
    assert _delta(before, ran, workflow="flaky", step="sometimes") == 3
    assert _delta(before, waited, workflow="flaky", step="sometimes") == 3
    assert _delta(before, retries, workflow="flaky", step="sometimes") == 2
    # A ValueError is not retried (retry_on=KeyError): one run, no retry; never skipped.
    assert _delta(before, ran, workflow="broken", step="explode") == 1
    assert _delta(before, retries, workflow="broken", step="explode") == 0
    assert _delta(before, ran, workflow="broken", step="never") == 0
    # Every run's time is inside its histogram: the +Inf bucket counts them all.
    bucket = "conveyor_step_duration_seconds_bucket"
    assert _delta(before, bucket, workflow="flaky", step="sometimes", le="+Inf") == 3


def test_a_reconciler_pass_counts_its_crash_recoveries(
    database: TestDatabase, conveyor_app: ConveyorCelery
) -> None:
    """A step claimed by a worker that died (its heartbeat an hour old) is requeued by
    the pass, and counted as its workflow's crash recovery."""
    engine = conveyor_app.engine
    execution_id = enqueue("linear", {"start": 1}, app=conveyor_app)
    before = _samples()
    admission = engine.admit("linear", [execution_id])
    assert admission.started == [execution_id]
    claim = engine.manager.run(
        steps.claim, execution_id, "double", "dead-host:1", None, [], lambda _: ()
    )
    assert claim is not None
    force_step_status(
        execution_id, "double", "running", heartbeat_at=datetime.now(UTC) - timedelta(hours=1)
    )
    database_reachable_for(engine.settings.stall_timeout)

    report = engine.reconcile()

    assert report.requeued == [(execution_id, "double")]
    assert _delta(before, "conveyor_executions_started_total", workflow="linear") == 1
    assert _delta(before, "conveyor_crash_recoveries_total", workflow="linear") == 1
    assert _delta(before, "conveyor_reconciled_total", kind="stalled_requeued") == 1
    assert _delta(before, "conveyor_reconciled_total", kind="republished") == 0
    assert _delta(before, "conveyor_reconcile_duration_seconds_count") == 1
    assert step_row(execution_id, "double")["status"] == "queued"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _scrape(port: int) -> dict[Key, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_prefork_worker_serves_the_sum_of_its_pool_processes(
    database: TestDatabase,
    redis_url: str,
    conveyor_app: ConveyorCelery,
    tmp_path: Path,
) -> None:
    """Two executions of `slow` hold both pool processes (each step waits for its
    cancellation): the worker's main process serves what both children recorded."""
    port = _free_port()
    parent = tmp_path / "prometheus"
    parent.mkdir()
    env = {"CONVEYOR_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(parent)}
    labels = (("step", "wait_for_cancel"), ("workflow", "slow"))
    with worker_process(database, redis_url, tmp_path / "worker.log", concurrency=2, env=env):
        first = enqueue("slow", app=conveyor_app)
        second = enqueue("slow", app=conveyor_app)

        def running(execution_id: str) -> bool:
            return bool(step_row(execution_id, "wait_for_cancel")["status"] == "running")

        wait_for(first, lambda _: running(first) and running(second))
        workers = {step_row(e, "wait_for_cancel")["worker"] for e in (first, second)}
        assert len(workers) == 2  # one step in each pool process
        # The worker made its own directory of metric files in the one it was given.
        assert len(list(parent.iterdir())) == 1
        assert conveyor_app.engine.cancel(first)
        assert conveyor_app.engine.cancel(second)

        deadline = time.monotonic() + 30
        while True:
            samples = _scrape(port)
            if samples.get(("conveyor_step_duration_seconds_count", labels)) == 2:
                break
            assert time.monotonic() < deadline, samples
            time.sleep(0.1)
        workflow = (("workflow", "slow"),)
        assert samples[("conveyor_executions_started_total", workflow)] == 2
        assert samples[("conveyor_step_queue_wait_seconds_count", labels)] == 2
    # Stopped warm: its directory is gone.
    assert list(parent.iterdir()) == []
