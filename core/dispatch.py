"""How work committed by ``core`` reaches the workers, without ``core`` importing Celery.

A producer that uses ``core`` alone (the seed guide's ``ExecutionStateManager``, or the
ORM's ``db.add(WorkflowExecution(...))``) commits an execution and then asks the
dispatcher to start it. The worker package registers its own dispatcher when its app
is created; a process that never imported it loads the one named by
``CONVEYOR_DISPATCHER`` (``worker.app:dispatch_starts``) on first use. Dispatching
happens after the commit and may fail: the execution stays pending and the
reconciler starts it after ``CONVEYOR_START_AFTER``, so nothing is lost.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence

from core.database import get_database

log = logging.getLogger(__name__)

# (execution_id, workflow, priority) of each execution to start.
Start = tuple[str, str, int]
Dispatcher = Callable[[Sequence[Start]], None]

_lock = threading.Lock()
_dispatcher: Dispatcher | None = None
_loaded_from: str | None = None


def register_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Make ``dispatcher`` the one this process uses (None: back to the setting)."""
    global _dispatcher, _loaded_from
    with _lock:
        _dispatcher = dispatcher
        _loaded_from = None


def get_dispatcher() -> Dispatcher | None:
    """The registered dispatcher, else the one ``CONVEYOR_DISPATCHER`` names (None: off)."""
    global _dispatcher, _loaded_from
    with _lock:
        if _dispatcher is not None:
            return _dispatcher
        target = get_database().settings.dispatcher
        if not target or target == _loaded_from:
            return None
        _loaded_from = target
    module_name, _, attribute = target.partition(":")
    try:
        # Importing the worker package registers its app's dispatcher as a side effect.
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        log.warning(
            "CONVEYOR_DISPATCHER=%s cannot be loaded: new executions start when the "
            "reconciler finds them (CONVEYOR_START_AFTER)",
            target,
            exc_info=True,
        )
        return None
    with _lock:
        if _dispatcher is None:
            _dispatcher = found
        return _dispatcher


def dispatch_starts(starts: Sequence[Start]) -> None:
    """Ask the workers to start these committed executions; never raises."""
    if not starts:
        return
    dispatcher = get_dispatcher()
    if dispatcher is None:
        return
    try:
        dispatcher(starts)
    except Exception:  # committed: the reconciler starts what was not dispatched
        log.warning(
            "dispatching %d start(s) failed; the reconciler will start them",
            len(starts),
            exc_info=True,
        )
