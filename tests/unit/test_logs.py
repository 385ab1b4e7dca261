"""worker.logs: the step's fields on records, the text and JSON formats, and housekeeping
lines demoted to DEBUG."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from worker.config import HOUSEKEEPING_TASKS, RECONCILE
from worker.logs import HousekeepingFilter, install, step_context


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own, at DEBUG, writing to a string through one handler."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("tests.unit.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_text_lines_logged_in_a_step_name_it_and_others_do_not(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = logger
    install(log, "text")
    install(log, "text")  # idempotent: one filter, one suffix
    with step_context("e-1", "etl", "load", 2):
        log.warning("disk slow")
        try:
            raise ValueError("bad row")
        except ValueError:
            log.exception("load failed")
    log.info("idle")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING disk slow [execution_id=e-1 workflow=etl step=load attempt=2]"
    # The fields go on the first line of a record, not after its traceback.
    assert lines[1] == "ERROR load failed [execution_id=e-1 workflow=etl step=load attempt=2]"
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "INFO idle"


def test_json_lines_carry_the_steps_fields(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    install(log, "json")
    with step_context("e-2", "etl", "extract", 1):
        log.warning("step %s failed", "extract")
    log.info("outside", extra={"batch": 3})
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["message"] == "step extract failed"
    assert inside["level"] == "WARNING"
    assert inside["logger"] == "tests.unit.test_logs"
    assert "time" in inside
    assert (inside["execution_id"], inside["workflow"], inside["step"], inside["attempt"]) == (
        "e-2",
        "etl",
        "extract",
        1,
    )
    assert "execution_id" not in outside
    assert outside["batch"] == 3


def _record(level: int, message: str, args: object) -> logging.LogRecord:
    return logging.LogRecord("celery.app.trace", level, __file__, 1, message, args, None)  # type: ignore[arg-type]


def test_celerys_lines_about_housekeeping_tasks_are_demoted_to_debug() -> None:
    housekeeping = HousekeepingFilter(HOUSEKEEPING_TASKS)
    celery_logger = logging.getLogger("celery.app.trace")
    level = celery_logger.level
    celery_logger.setLevel(logging.INFO)
    try:
        received = _record(
            logging.INFO, "Task %(name)s[%(id)s] received", ({"name": RECONCILE, "id": "1"},)
        )
        assert not housekeeping.filter(received)
        assert received.levelname == "DEBUG"
        beat = _record(
            logging.INFO, "Scheduler: Sending due task %s (%s)", ("conveyor-reconcile", RECONCILE)
        )
        assert not housekeeping.filter(beat)
        step = _record(
            logging.INFO,
            "Task %(name)s[%(id)s] received",
            ({"name": "conveyor.run_step:etl.load", "id": "2"},),
        )
        assert housekeeping.filter(step)
        assert step.levelname == "INFO"
        failed = _record(
            logging.ERROR,
            "Task %(name)s[%(id)s] raised unexpected",
            ({"name": RECONCILE, "id": "3"},),
        )
        assert housekeeping.filter(failed)
        celery_logger.setLevel(logging.DEBUG)
        shown = _record(
            logging.INFO, "Task %(name)s[%(id)s] received", ({"name": RECONCILE, "id": "4"},)
        )
        assert housekeeping.filter(shown)
        assert shown.levelno == logging.DEBUG
    finally:
        celery_logger.setLevel(level)
