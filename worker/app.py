"""The Celery app: ``celery -A worker.app worker`` and ``celery -A worker.app beat``.

``app`` is built from the environment's settings; ``create_app()`` builds one for
other settings or another workflow registry (tests, embedding).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init

from core.config import Settings, get_settings
from core.database import get_database
from core.errors import TransientDatabaseError
from core.registry import WorkflowRegistry, get_registry
from worker.config import FIRE_SCHEDULES, celery_config
from worker.engine import RUN_STEP, START_EXECUTION, Engine
from worker.schedules import fire_schedules as fire_due

log = logging.getLogger(__name__)
TRANSIENT_RETRY_COUNTDOWN = 5


class ConveyorCelery(Celery):
    """A Celery app that carries conveyor's engine (settings, registry, state manager)."""

    engine: Engine


def create_app(
    settings: Settings | None = None, registry: WorkflowRegistry | None = None
) -> ConveyorCelery:
    """A configured app with conveyor's tasks registered on it."""
    settings = settings or get_settings()
    registry = registry if registry is not None else get_registry()
    app = ConveyorCelery("conveyor", set_as_current=False)
    app.conf.update(celery_config(settings, registry))
    app.engine = Engine(app, settings, registry)
    _register_tasks(app)
    return app


def _register_tasks(app: ConveyorCelery) -> None:
    # Not shared: each app (the default one, test apps) carries its own engine.
    options: dict[str, Any] = {"bind": True, "ignore_result": True, "shared": False}

    @app.task(name=START_EXECUTION, **options)
    def start_execution(task: Task[Any, Any], execution_id: str, workflow: str) -> None:
        """Admit a pending execution (within its workflow's concurrency limit)."""
        with _retry_when_transient(task):
            app.engine.admit(workflow, [execution_id])

    @app.task(name=RUN_STEP, **options)
    def run_step(task: Task[Any, Any], execution_id: str, step_name: str) -> None:
        """Claim, run and record one step."""
        with _retry_when_transient(task):
            app.engine.run_step(execution_id, step_name, task.request.id)

    @app.task(name=FIRE_SCHEDULES, **options)
    def fire_schedules(task: Task[Any, Any]) -> None:
        """Enqueue the due ticks of the workflows' schedules (sent by beat)."""
        try:
            fire_due(app)
        except TransientDatabaseError:  # the next pass, a second from now, tries again
            log.warning("database unavailable; schedules fired by a later pass")

    @app.task(name="conveyor.reconcile", **options)
    def reconcile(task: Task[Any, Any]) -> None:
        """Recover stalled and lost work (scheduled by beat)."""
        app.engine.reconcile()


@contextmanager
def _retry_when_transient(task: Task[Any, Any]) -> Iterator[None]:
    """Turn a database that stays unavailable into a Celery retry of the whole task."""
    try:
        yield
    except TransientDatabaseError as error:
        log.warning("database unavailable; task %s retried later", task.name)
        raise task.retry(
            exc=error, countdown=TRANSIENT_RETRY_COUNTDOWN, max_retries=None
        ) from error


@worker_process_init.connect
def _fresh_connections_in_child(**_: Any) -> None:
    # A forked pool process must not share the parent's pooled database sockets.
    get_database().engine.dispose(close=False)


app = create_app()
