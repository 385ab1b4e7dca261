"""Logs of a running worker: every line logged while a step runs names it; a failed step
logs one WARNING; CONVEYOR_LOG_FORMAT=json makes JSON lines; an idle worker is quiet."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TestDatabase
from tests.e2e.conftest import wait_for
from tests.helpers.processes import worker_process
from worker.app import ConveyorCelery
from worker.config import RECONCILE
from worker.logs import StepContextFilter
from worker.producer import enqueue

TEXT_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d ")


def _about(records: list[logging.LogRecord], execution_id: str) -> list[logging.LogRecord]:
    return [r for r in records if getattr(r, "execution_id", None) == execution_id]


def test_lines_logged_while_a_step_runs_name_it(
    worker: ConveyorCelery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(StepContextFilter())
    execution_id = enqueue("chatty", None, app=worker)
    assert wait_for(execution_id).status == "succeeded"
    # The user's own logging, in the delivered step and in the one continued after it.
    user = {
        r.getMessage(): (r.workflow, r.step, r.attempt)  # type: ignore[attr-defined]
        for r in _about(caplog.records, execution_id)
        if r.name == "tests.e2e.chatty"
    }
    assert user == {
        f"speaking for {execution_id}": ("chatty", "speak", 1),
        "heard said": ("chatty", "listen", 1),
    }
    # Set and reset around each step: the line between the two carries none of it.
    between = [r for r in caplog.records if r.getMessage().startswith("continuing execution")]
    assert between
    assert not hasattr(between[0], "execution_id")


def test_a_failed_step_logs_one_warning_and_a_retried_one_says_so(
    worker: ConveyorCelery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(StepContextFilter())
    broken = enqueue("broken", None, app=worker)
    flaky = enqueue("flaky", None, app=worker)
    assert wait_for(broken).status == "failed"
    assert wait_for(flaky).status == "succeeded"

    def warnings(execution_id: str) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING and execution_id in r.getMessage()
        ]

    [failed] = warnings(broken)
    assert failed.levelno == logging.WARNING
    assert failed.getMessage() == (
        f"step explode of execution {broken} (workflow broken) failed on attempt 1/2: "
        "ValueError: the data is bad"
    )
    assert (failed.step, failed.attempt) == ("explode", 1)  # type: ignore[attr-defined]
    first, second = warnings(flaky)
    assert "Glitch: attempt 1 glitched; will retry, attempt 2/3 in" in first.getMessage()
    assert "Glitch: attempt 2 glitched; will retry, attempt 3/3 in" in second.getMessage()
    assert [r.attempt for r in (first, second)] == [1, 2]  # type: ignore[attr-defined]


def _json_lines(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text().splitlines()
    # Celery's banner is printed, not logged; every logged line is JSON.
    assert not [line for line in lines if TEXT_LINE.match(line)]
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_a_worker_process_logs_json_lines_and_is_quiet_when_idle(
    database: TestDatabase, redis_url: str, conveyor_app: ConveyorCelery, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    with worker_process(database, redis_url, log, env={"CONVEYOR_LOG_FORMAT": "json"}):
        broken = enqueue("broken", None, app=conveyor_app)
        flaky = enqueue("flaky", None, app=conveyor_app)
        assert wait_for(broken).status == "failed"
        assert wait_for(flaky).status == "succeeded"
        # An idle pass of the reconciler, as beat sends it: Celery's lines for it are
        # DEBUG, so none shows at INFO; a run step's lines do.
        conveyor_app.send_task(RECONCILE)
        probe = enqueue("quick", None, app=conveyor_app)
        assert wait_for(probe).status == "succeeded"
        deadline = time.monotonic() + 30
        # Received in order (the reconciler's message first: it has the higher priority),
        # so once the probe's start is logged, the reconciler's would have been.
        while not any(
            "conveyor.start_execution:quick[" in line["message"] and "succeeded" in line["message"]
            for line in _json_lines(log)
        ):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    lines = _json_lines(log)
    [failed] = [line for line in lines if line["level"] == "WARNING" and broken in line["message"]]
    assert (failed["execution_id"], failed["workflow"], failed["step"], failed["attempt"]) == (
        broken,
        "broken",
        "explode",
        1,
    )
    assert "ValueError: the data is bad" in failed["message"]
    # Celery's own line for the task that ran the step: INFO, without a traceback.
    [ended] = [
        line
        for line in lines
        if "conveyor.start_execution:broken[" in line["message"]
        and "raised expected: StepFailed" in line["message"]
    ]
    assert ended["level"] == "INFO"
    # A retry's report crosses from the pool process to Celery's main process intact.
    retries = [line for line in lines if line["level"] == "WARNING" and flaky in line["message"]]
    assert [line["attempt"] for line in retries] == [1, 2]
    assert [line["message"] for line in lines if " retry: step sometimes " in line["message"]]
    assert not [line for line in lines if RECONCILE in line["message"]]
