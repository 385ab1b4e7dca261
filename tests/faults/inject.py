"""Broker faults injected from outside conveyor: no hook in production code.

Listed in CONVEYOR_WORKFLOW_MODULES, this module is imported by every worker and beat
process when the registry loads; with ``FAULTS_INJECT`` set it wraps the app class's
``send_task``, through which the engine sends every start and run-step message:

- ``duplicates``: each run-step message is sent 3 extra times: at once, late (with a
  countdown) and at another priority. (A step a worker continues to in-process, in the
  transaction that completed its upstream step, has no message to duplicate.)
- ``lost:0.2``: each start or run-step publish fails (raises, as a broker that is down
  would) with that probability. Every such publish happens after its commit.

Each injected fault appends a line to ``FAULTS_INJECT_LOG`` for the test's figures.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kombu.exceptions import OperationalError

from worker.app import ConveyorCelery
from worker.config import MAX_PRIORITY
from worker.engine import RUN_STEP, START_EXECUTION

MODE_ENV = "FAULTS_INJECT"
LOG_ENV = "FAULTS_INJECT_LOG"
LATE_SECONDS = (1.0, 3.0)

SendTask = Callable[..., Any]


def _note(line: str) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def faulty(original: SendTask, mode: str) -> SendTask:
    """``original`` (an unbound ``send_task``) with the faults of ``mode`` injected."""
    kind, _, rate = mode.partition(":")
    if kind == "duplicates":

        def send_with_duplicates(app: ConveyorCelery, name: str, *args: Any, **options: Any) -> Any:
            result = original(app, name, *args, **options)
            if name == RUN_STEP:
                _note("original")
                original(app, name, *args, **options)
                _note("duplicate early")
                late = (options.get("countdown") or 0) + random.uniform(*LATE_SECONDS)
                original(app, name, *args, **{**options, "countdown": late})
                _note("duplicate late")
                priority = options.get("priority") or 0
                other = MAX_PRIORITY - priority if priority * 2 != MAX_PRIORITY else 0
                original(app, name, *args, **{**options, "priority": other})
                _note("duplicate priority")
            return result

        return send_with_duplicates
    if kind == "lost":
        probability = float(rate or 0.2)

        def send_or_lose(app: ConveyorCelery, name: str, *args: Any, **options: Any) -> Any:
            if name in (RUN_STEP, START_EXECUTION) and random.random() < probability:
                _note(f"lost {name}")
                raise OperationalError(f"injected fault: publishing {name} failed")
            return original(app, name, *args, **options)

        return send_or_lose
    raise ValueError(f"unknown {MODE_ENV} mode {mode!r}")


def injected_lines(path: Path) -> list[str]:
    """What the injector recorded (all processes), one fault a line."""
    return path.read_text().splitlines() if path.exists() else []


_mode = os.environ.get(MODE_ENV)
if _mode:
    ConveyorCelery.send_task = faulty(ConveyorCelery.send_task, _mode)  # type: ignore[method-assign]
