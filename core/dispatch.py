"""How work committed by ``core`` reaches the workers, without ``core`` importing Celery.

A producer that uses ``core`` alone (the seed guide's ``ExecutionStateManager``, or the
ORM's ``db.add(WorkflowExecution(...))``) commits an execution and then asks the
dispatcher to start it. The worker package registers its own dispatcher when its app
is created; a process that never imported it loads the one named by
``CONVEYOR_DISPATCHER`` (``worker.app:dispatch_starts``) on first use. Dispatching
happens after the commit and may fail: the execution stays pending and the
reconciler starts it after ``CONVEYOR_START_AFTER``, so nothing is lost.

Loading is done once, under a lock, by whichever caller comes first (the others wait
for it); an import that fails is logged as an ERROR and tried again by the next call.
A caller on an event loop's thread (the ORM's commit hook under ``AsyncSession``) never
publishes there: the dispatch runs on the loop's default executor.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from core.database import get_database

log = logging.getLogger(__name__)

# (execution_id, workflow, priority) of each execution to start.
Start = tuple[str, str, int]
Dispatcher = Callable[[Sequence[Start]], None]

_lock = threading.Lock()  # guards _dispatcher
# One import at a time: importing the worker's app registers its dispatcher (taking
# _lock), so the import is made holding this lock only; reentrant, so that an import
# that itself dispatches cannot deadlock its thread.
_loading = threading.RLock()
_dispatcher: Dispatcher | None = None


def register_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Make ``dispatcher`` the one this process uses (None: back to the setting)."""
    global _dispatcher
    with _lock:
        _dispatcher = dispatcher


@contextmanager
def using_dispatcher(dispatcher: Dispatcher) -> Iterator[Dispatcher]:
    """Register ``dispatcher`` for the block, then put the previous one back."""
    global _dispatcher
    with _lock:
        previous, _dispatcher = _dispatcher, dispatcher
    try:
        yield dispatcher
    finally:
        with _lock:
            _dispatcher = previous


def _registered() -> Dispatcher | None:
    with _lock:
        return _dispatcher


def get_dispatcher() -> Dispatcher | None:
    """The registered dispatcher, else the one ``CONVEYOR_DISPATCHER`` names, loaded
    (None: the setting is empty, or what it names cannot be loaded now)."""
    global _dispatcher
    found = _registered()
    if found is not None:
        return found
    target = get_database().settings.dispatcher
    if not target:
        return None
    with _loading:
        found = _registered()  # loaded by the caller this one waited for
        if found is not None:
            return found
        loaded = _load(target)
        if loaded is None:
            return None
        with _lock:
            if _dispatcher is None:
                _dispatcher = loaded
            return _dispatcher


def _load(target: str) -> Dispatcher | None:
    """What ``target`` (module:attribute) names; None, logged as an ERROR, when it
    cannot be had (the next call tries again: the module may be fixed or installed)."""
    module_name, _, attribute = target.partition(":")
    try:
        # Importing the worker package registers its app's dispatcher as a side effect.
        found: Dispatcher = getattr(importlib.import_module(module_name), attribute)
    except Exception:
        log.error(
            "CONVEYOR_DISPATCHER=%s cannot be loaded: executions created through core "
            "start when the reconciler finds them (CONVEYOR_START_AFTER) until it can; "
            "tried again at the next start",
            target,
            exc_info=True,
        )
        return None
    return found


def dispatch_starts(starts: Sequence[Start]) -> None:
    """Ask the workers to start these committed executions; never raises.

    On an event loop's thread the work (loading the dispatcher, publishing: blocking
    I/O) is handed to the loop's default executor and this returns at once.
    """
    if not starts:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop runs on this thread
        _dispatch(list(starts))
        return
    loop.run_in_executor(None, _dispatch, list(starts))


def _dispatch(starts: Sequence[Start]) -> None:
    try:
        dispatcher = get_dispatcher()
        if dispatcher is not None:
            dispatcher(starts)
    except Exception:  # committed: the reconciler starts what was not dispatched
        log.warning(
            "dispatching %d start(s) failed; the reconciler will start them",
            len(starts),
            exc_info=True,
        )
