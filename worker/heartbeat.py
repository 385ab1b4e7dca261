"""One heartbeat thread per worker process: a single UPDATE for the steps it holds."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager

log = logging.getLogger(__name__)


class Heartbeat:
    """Refreshes ``heartbeat_at`` of every step this process runs, every ``interval`` s."""

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

    def stop(self) -> None:
        """Stop the thread (tests, worker shutdown)."""
        self._stop.set()
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
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except Exception:  # the database may be restarting: keep beating
                log.warning("heartbeat failed; will try again", exc_info=True)
