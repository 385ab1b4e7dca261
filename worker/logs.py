"""Logs of worker and beat processes: which step a line is about, JSON lines when asked,
and housekeeping kept out of INFO.

- ``step_context`` wraps a step's run (the engine's recording of it and the user's code
  alike); ``StepContextFilter``, on the process's handlers, copies its execution id,
  workflow, step and attempt onto every record logged meanwhile, through any logger.
- ``CONVEYOR_LOG_FORMAT=json`` formats each record as one JSON object
  (python-json-logger) with those four as fields; ``text`` keeps Celery's lines and
  appends ``[execution_id=... workflow=... step=... attempt=...]`` to a step's lines.
- Celery logs "received" and "succeeded" at INFO for every task, and beat "Sending due
  task" for every message it sends: for conveyor's periodic tasks (the reconciler every
  few seconds, schedules every second) ``HousekeepingFilter`` demotes these to DEBUG, so
  an idle worker is quiet at INFO. Their errors and warnings stay as they are.

Celery sends ``after_setup_logger`` and ``after_setup_task_logger`` (worker and beat)
once its handlers exist; ``worker.app`` connects ``on_setup_logger`` to both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from celery.utils.log import get_multiprocessing_logger

from core.config import get_settings
from worker.config import HOUSEKEEPING_TASKS

# Fields a record carries while a step runs (also the JSON keys).
STEP_FIELDS = ("execution_id", "workflow", "step", "attempt")
# Where Celery logs a task's "received" and "succeeded" lines, and beat its sends.
CELERY_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.beat")
JSON_FORMAT = "%(levelname)s %(name)s %(processName)s %(message)s"
JSON_RENAMED = {"levelname": "level", "name": "logger", "processName": "process"}


@dataclass(frozen=True)
class StepContext:
    """The step the current code runs for."""

    execution_id: str
    workflow: str
    step: str
    attempt: int


_current: ContextVar[StepContext | None] = ContextVar("conveyor_step", default=None)


@contextmanager
def step_context(execution_id: str, workflow: str, step: str, attempt: int) -> Iterator[None]:
    """Mark every record logged in the block (this thread or task) as about this step."""
    token = _current.set(StepContext(execution_id, workflow, step, attempt))
    try:
        yield
    finally:
        _current.reset(token)


def current_step() -> StepContext | None:
    """The step the current code runs for, if any."""
    return _current.get()


class StepContextFilter(logging.Filter):
    """Copies the current step's execution id, workflow, step and attempt onto records."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current.get()
        if current is not None:
            record.execution_id = current.execution_id
            record.workflow = current.workflow
            record.step = current.step
            record.attempt = current.attempt
        return True


class StepContextFormatter(logging.Formatter):
    """Another formatter's text, with the step's fields after its first line."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        if getattr(record, "execution_id", None) is None:
            return text
        fields = " ".join(f"{name}={getattr(record, name, '')}" for name in STEP_FIELDS)
        # After the first line, not after a traceback.
        first, newline, rest = text.partition("\n")
        return f"{first} [{fields}]{newline}{rest}"


def json_formatter() -> logging.Formatter:
    """One JSON object a record: time, level, logger, process, message, and the step's
    fields and any ``extra`` the record has."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(JSON_FORMAT, rename_fields=JSON_RENAMED, timestamp="time")


class HousekeepingFilter(logging.Filter):
    """Demotes Celery's INFO lines about the named tasks to DEBUG (dropped unless the
    logger is at DEBUG)."""

    def __init__(self, tasks: Iterable[str]) -> None:
        super().__init__()
        self.tasks = frozenset(tasks)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self._about_housekeeping(record.args):
            return True
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)

    def _about_housekeeping(self, args: Any) -> bool:
        # Celery's task lines take a mapping with the task's "name"; beat's send line
        # takes (entry name, task name).
        if isinstance(args, Mapping):
            return args.get("name") in self.tasks
        if isinstance(args, tuple):
            return any(isinstance(arg, str) and arg in self.tasks for arg in args)
        return False


def install(logger: logging.Logger, log_format: str, housekeeping: Iterable[str] = ()) -> None:
    """Give ``logger``'s handlers the step's fields and the format; demote Celery's lines
    about the ``housekeeping`` tasks. Idempotent."""
    for handler in logger.handlers:
        if not any(isinstance(f, StepContextFilter) for f in handler.filters):
            handler.addFilter(StepContextFilter())
        current = handler.formatter
        if log_format == "json":
            if not _is_json(current):
                handler.setFormatter(json_formatter())
        elif not isinstance(current, StepContextFormatter):
            handler.setFormatter(StepContextFormatter(current or logging.Formatter()))
    tasks = frozenset(housekeeping)
    if tasks:
        for name in CELERY_TASK_LOGGERS:
            celery_logger = logging.getLogger(name)
            for old in [f for f in celery_logger.filters if isinstance(f, HousekeepingFilter)]:
                celery_logger.removeFilter(old)
            celery_logger.addFilter(HousekeepingFilter(tasks))


def _is_json(formatter: logging.Formatter | None) -> bool:
    from pythonjsonlogger.json import JsonFormatter

    return isinstance(formatter, JsonFormatter)


def on_setup_logger(logger: logging.Logger, **_: Any) -> None:
    """Celery's ``after_setup_logger`` / ``after_setup_task_logger``: conveyor's format
    (also on the pool's own logger, which Celery sets up apart, without a signal)."""
    log_format = get_settings().log_format
    install(logger, log_format, HOUSEKEEPING_TASKS)
    pool_logger = get_multiprocessing_logger()
    if pool_logger is not None:
        install(pool_logger, log_format)
