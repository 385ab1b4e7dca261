"""One heartbeat thread per worker process: a single UPDATE for the steps it holds, and
the hand-offs it is asked to make on time (``at``)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager

log = logging.getLogger(__name__)


class Deadline:
    """Something ``Heartbeat.at`` will do at a monotonic time unless cancelled first."""

    def __init__(self, when: float, action: Callable[[], None]) -> None:
        self.when = when
        self.action = action


def _run_deadline(deadline: Deadline) -> None:
    try:
        deadline.action()
    except Exception:  # its own fallback (the reconciler) takes over
        log.warning("a worker deadline failed", exc_info=True)


class Heartbeat:
    """Refreshes ``heartbeat_at`` of every step this process runs, every ``interval`` s.

    The same thread keeps the deadlines it is given (``at``): the hand-off of siblings a
    worker holds while one of them still runs (``worker.engine``), which must happen on
    time whatever the step's code does meanwhile.
    """

    def __init__(self, manager: SyncEnhancedExecutionStateManager, interval: float) -> None:
        self._manager = manager
        self._host = socket.gethostname()
        self._interval = interval
        self._running: set[tuple[str, str]] = set()
        self._items: set[tuple[str, str, int]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        # Deadlines to run, and the condition that wakes the thread for an earlier one.
        self._deadlines: set[Deadline] = set()
        self._wake = threading.Condition(self._lock)

    @property
    def worker_id(self) -> str:
        """This process's name on the steps it runs: host and pid.

        Read at use, not at construction: the app (and this object) is built in the
        parent before a prefork pool forks, and each child must beat only for itself,
        so that a killed child's steps go stale while its siblings live on.
        """
        return f"{self._host}:{os.getpid()}"

    @contextmanager
    def beating(self, key: tuple[str, str]) -> Iterator[None]:
        """Keep ``key``'s heartbeat fresh while the block runs."""
        self._ensure_thread()
        with self._lock:
            self._running.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._running.discard(key)

    @contextmanager
    def beating_item(self, key: tuple[str, str, int]) -> Iterator[None]:
        """Keep a map item's heartbeat fresh while the block runs."""
        self._ensure_thread()
        with self._lock:
            self._items.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._items.discard(key)

    def beat(self) -> int:
        """One bulk heartbeat now (one more for map items, when it runs any); how many
        steps and items it refreshed."""
        with self._lock:
            held = sorted(self._running)
            items = sorted(self._items)
        # Only the steps held right now: a row this process claimed but no longer runs
        # (an exception, a recording out of retries) must go stale and be recovered.
        beaten = self._manager.heartbeat(self.worker_id, held) if held else 0
        if items:
            from core.maps import heartbeat_items

            beaten += self._manager.run(heartbeat_items, self.worker_id, items)
        return beaten

    def at(self, when: float, action: Callable[[], None]) -> Deadline:
        """Run ``action`` at monotonic time ``when``, unless ``cancel`` comes first. It
        runs in a thread of its own, started by this one: an action that waits (on the
        database, on the broker) never delays a heartbeat. Errors it raises are logged."""
        self._ensure_thread()
        deadline = Deadline(when, action)
        with self._wake:
            self._deadlines.add(deadline)
            self._wake.notify()
        return deadline

    def cancel(self, deadline: Deadline) -> None:
        """Forget a deadline not yet run (a no-op once it ran)."""
        with self._lock:
            self._deadlines.discard(deadline)

    def stop(self) -> None:
        """Stop the thread (tests, worker shutdown)."""
        self._stop.set()
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _ensure_thread(self) -> None:
        # A forked pool child inherits the object but not the thread: start its own.
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"conveyor-heartbeat-{self._pid}", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        next_beat = time.monotonic() + self._interval
        while not self._stop.is_set():
            for deadline in self._due(next_beat):
                threading.Thread(
                    target=_run_deadline, args=(deadline,), name="conveyor-deadline", daemon=True
                ).start()
            if self._stop.is_set():
                return
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self._interval
                try:
                    self.beat()
                except Exception:  # the database may be restarting: keep beating
                    log.warning("heartbeat failed; will try again", exc_info=True)

    def _due(self, next_beat: float) -> list[Deadline]:
        """Wait until the next beat or the earliest deadline, whichever comes first (or
        a new deadline, or stop); the deadlines due then, taken off the set."""
        with self._wake:
            while not self._stop.is_set():
                now = time.monotonic()
                due = [d for d in self._deadlines if d.when <= now]
                if due:
                    self._deadlines.difference_update(due)
                    return sorted(due, key=lambda d: d.when)
                if now >= next_beat:
                    return []
                earliest = min((d.when for d in self._deadlines), default=next_beat)
                self._wake.wait(min(earliest, next_beat) - now)
            return []
