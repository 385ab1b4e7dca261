"""A worker's shapes (core.shapes): it consumes the queue of each shape its code has,
and says it is up with them (``worker_shapes``) while it lives, so that steps handed
back by workers with other code are sent to it.

A worker bootstep (``ShapesStep``, added to each conveyor app) does it for every worker:
``celery worker`` and in-process ones.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from celery import bootsteps

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
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
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


class ShapesStep(bootsteps.StartStopStep):
    """The worker bootstep that gives a worker its shape queues (before its consumer
    subscribes) and keeps its ``worker_shapes`` rows while it runs. A bootstep, not the
    ``worker_shutdown`` signal: a cold shutdown (an embedded or test worker's) sends no
    signal, and the rows' thread must stop with the worker whatever the way."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        engine: Engine | None = getattr(parent.app, "engine", None)
        self.advert = None if engine is None else ShapeAdvert(engine, parent.hostname)
        if self.advert is not None:
            for queue in self.advert.queues:
                parent.app.amqp.queues.select_add(queue)

    def start(self, parent: Any) -> None:
        if self.advert is not None:
            self.advert.start()

    def stop(self, parent: Any) -> None:
        if self.advert is not None:
            self.advert.stop()

    def terminate(self, parent: Any) -> None:
        self.stop(parent)
