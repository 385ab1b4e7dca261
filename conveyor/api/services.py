"""What the routes run against: the Celery app (its engine holds the state manager,
the workflow registry and the settings), looked up per request from the FastAPI app."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from worker.app import ConveyorCelery
    from worker.engine import Engine


class Services:
    """The API's Celery app: the one given, else ``worker.app.app`` on first use."""

    def __init__(self, celery_app: ConveyorCelery | None = None) -> None:
        self._celery_app = celery_app
        self._metrics: CollectorRegistry | None = None
        self._lock = threading.Lock()

    @property
    def celery_app(self) -> ConveyorCelery:
        """The Celery app the API publishes with."""
        with self._lock:
            if self._celery_app is None:
                from worker.app import app as default_app  # built on first use

                self._celery_app = default_app
            return self._celery_app

    @property
    def engine(self) -> Engine:
        """The worker engine: state manager, registry, settings, publishing."""
        return self.celery_app.engine

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """What ``/metrics`` serves (built on first scrape, on the engine's database)."""
        from worker.metrics import api_registry

        engine = self.engine  # outside the lock, which celery_app takes
        with self._lock:
            if self._metrics is None:
                self._metrics = api_registry(engine.manager.database, engine.queue_of)
            return self._metrics


def services(request: Request) -> Services:
    """The Services of the app serving ``request``."""
    found: Services = request.app.state.services
    return found


Conveyor = Annotated[Services, Depends(services)]
