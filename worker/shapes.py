"""A worker's shapes (core.shapes): it consumes the queue of each shape its code has,
and says it is up with them (``worker_shapes``) while it lives, so that steps handed
back by workers with other code are sent to it.

Started by Celery's ``worker_init`` (every worker: ``celery worker`` and in-process
ones), before the consumer subscribes, and stopped by ``worker_shutdown``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from core import shapes
from core.shapes import Shape, shape_of, shape_queue

if TYPE_CHECKING:
    from worker.engine import Engine

log = logging.getLogger(__name__)

# How often a live worker refreshes its rows, as a fraction of the stall timeout (a row
# older than that is a worker gone).
REFRESH_FRACTION = 3.0


class ShapeAdvert:
    """One worker's shape rows, refreshed by a thread of its own."""

    def __init__(self, engine: Engine, worker: str) -> None:
        self._engine = engine
        self.worker = worker
        self.shapes: list[Shape] = [shape_of(w) for w in engine.registry]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def queues(self) -> list[str]:
        """The shape queues this worker consumes."""
        return sorted({shape_queue(s.hash) for s in self.shapes})

    def start(self) -> None:
        """Say it now (a database not up yet: the thread says it when it is), then keep
        saying it."""
        self._say()
        interval = self._engine.settings.stall_timeout / REFRESH_FRACTION
        self._thread = threading.Thread(
            target=self._loop, args=(interval,), name="conveyor-shapes", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing and withdraw the rows: nothing is sent here any more."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._engine.manager.run(shapes.withdraw, self.worker)
        except Exception:  # its rows go stale by themselves
            log.warning("could not withdraw worker %s's shapes", self.worker, exc_info=True)

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._say()

    def _say(self) -> None:
        try:
            self._engine.manager.run(shapes.advertise, self.worker, self.shapes)
        except Exception:  # the database may be restarting: the next refresh says it
            log.warning("could not record worker %s's shapes", self.worker, exc_info=True)


def on_worker_init(sender: Any, **_: Any) -> None:
    """``worker_init``: consume this code's shape queues and start saying so."""
    engine: Engine | None = getattr(sender.app, "engine", None)
    if engine is None:
        return
    advert = ShapeAdvert(engine, sender.hostname)
    for queue in advert.queues:
        sender.app.amqp.queues.select_add(queue)
    advert.start()
    sender.conveyor_shapes = advert


def on_worker_shutdown(sender: Any, **_: Any) -> None:
    """``worker_shutdown``: withdraw this worker's shapes."""
    advert: ShapeAdvert | None = getattr(sender, "conveyor_shapes", None)
    if advert is not None:
        advert.stop()
