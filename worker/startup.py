"""What a worker says when it starts: the workflows it can run, the database and broker
it uses (passwords hidden), and a warning for what would make it fail executions later
(no workflows registered, a schema not at head) while it seems to start cleanly."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from kombu.utils.url import maybe_sanitize_url

from core import schema
from core.errors import ConveyorError

if TYPE_CHECKING:
    from worker.engine import Engine

log = logging.getLogger(__name__)


class StartupReport(bootsteps.StartStopStep):
    """The worker bootstep that logs the report once, as the worker starts."""

    def start(self, parent: Any) -> None:
        engine: Engine | None = getattr(parent.app, "engine", None)
        if engine is not None:
            report(engine, parent.hostname)


def report(engine: Engine, worker: str) -> None:
    """Log what ``worker`` runs and uses; warn on what would fail its executions."""
    settings = engine.settings
    names = sorted({f"{w.name} v{w.version}" for w in engine.registry})
    database = settings.sync_database_url.render_as_string(hide_password=True)
    broker = maybe_sanitize_url(settings.broker_url.get_secret_value())
    log.info(
        "conveyor worker %s: workflows %s; database %s; broker %s",
        worker,
        ", ".join(names) or "(none)",
        database,
        broker,
    )
    if not names:
        log.warning(
            "no workflows are registered: set CONVEYOR_WORKFLOW_MODULES to the modules that "
            "define them (in every process: workers, beat, the API, the command line), and "
            "make them importable (PYTHONPATH, or start from their folder)"
        )
    try:
        schema.require_migrated(settings)
    except ConveyorError as problem:
        log.warning("database %s: %s", database, problem)
