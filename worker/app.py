"""The Celery app: ``celery -A worker.app worker`` and ``celery -A worker.app beat``.

``app`` is built from the environment's settings; ``create_app()`` builds one for
other settings or another workflow registry (tests, embedding).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from celery import Celery, Task
from celery.exceptions import Retry, TimeLimitExceeded
from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_init
from celery.worker.request import Request

from core.config import Settings, get_settings
from core.database import Database, get_database
from core.dispatch import register_dispatcher
from core.errors import TransientDatabaseError
from core.registry import WorkflowRegistry, get_registry
from worker import logs, shapes, startup
from worker.config import FIRE_SCHEDULES, PRUNE, RECONCILE, WAKE, celery_config
from worker.engine import RUN_STEP, START_BATCH, START_EXECUTION, Engine
from worker.failures import StepFailed
from worker.items import RUN_ITEM
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
    # Each of its workers consumes its code's shape queues and says which shapes it runs
    # (core.shapes).
    app.steps["worker"].add(shapes.ShapesStep)
    # ... and says what it runs and uses, warning on what would fail executions later.
    app.steps["worker"].add(startup.StartupReport)
    if app.engine.manager.database is not get_database():
        _app_databases.append(app.engine.manager.database)
    _register_tasks(app)
    # Executions created through core alone (the seed's ExecutionStateManager, the ORM)
    # are started by this app's engine, in this process.
    register_dispatcher(app.engine.publish_starts)
    return app


# Deliveries whose pool process had died before their hard time limit fired (filled and
# read in the worker's main process).
_lost_before_limit: set[str] = set()


def _process_gone(pid: int | None) -> bool:
    """Whether process ``pid`` has exited: gone, or a zombie not yet reaped (False when
    it cannot be told: no pid, or a zombie where there is no /proc)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


class StepRequest(Request):
    """A delivery of a step or item, which tells a hard time limit from a crash.

    When a pool process dies (SIGKILL, OOM) while the main process is busy, Celery's
    time-limit timer may fire before the pool notices the death, and the delivery is
    reported as TimeLimitExceeded. The timer runs before the pool process is killed, so
    a process already gone then was a crash: marked here, recovered as one."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        pid = self.worker_pid  # an int, whatever the stubs say
        if not soft and _process_gone(None if pid is None else int(pid)):
            _lost_before_limit.add(self.id)
        super().on_timeout(soft, timeout)


class StepTask(Task):  # type: ignore[type-arg]
    """``conveyor.run_step``: records a hard time limit as soon as Celery reports it."""

    Request = f"{__name__}:StepRequest"

    def on_failure(
        self,
        exc: Exception,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: Any,
    ) -> None:
        # With prefork, Celery calls this in the main worker process after killing the
        # pool process at the hard limit; the step would otherwise wait to look stalled.
        # Only then: a StepFailed (also reported here) is a failure recorded already.
        if isinstance(exc, TimeLimitExceeded) and "execution_id" in kwargs:
            if task_id in _lost_before_limit:
                # Its process died first: a crash, which the stall recovery re-runs
                # (apart from the step's retries), not a timeout spending an attempt.
                _lost_before_limit.discard(task_id)
                log.warning("the process running %s died before its hard time limit", task_id)
                return
            engine: Engine = cast(ConveyorCelery, self.app).engine
            limit = exc.args[0] if exc.args else None
            try:
                if "index" in kwargs:  # a map item (conveyor.run_item)
                    engine.items.record_hard_timeout(
                        kwargs["execution_id"],
                        kwargs["step_name"],
                        kwargs["index"],
                        task_id,
                        limit,
                        kwargs["workflow"],
                        kwargs["version"],
                    )
                else:
                    engine.record_hard_timeout(
                        kwargs["execution_id"], kwargs["step_name"], task_id, limit
                    )
            except Exception:  # the reconciler recovers it as a stalled step
                log.warning("could not record the hard timeout of %s", task_id, exc_info=True)


def _register_tasks(app: ConveyorCelery) -> None:
    # Not shared: each app (the default one, test apps) carries its own engine.
    options: dict[str, Any] = {"bind": True, "ignore_result": True, "shared": False}
    # A step's failure is an expected outcome: Celery logs it on one INFO line, without
    # a traceback (the engine logged the WARNING; the traceback is on the step's row).
    steps: dict[str, Any] = {**options, "throws": (StepFailed,)}

    @app.task(name=START_EXECUTION, **steps)
    def start_execution(task: Task[Any, Any], execution_id: str, workflow: str) -> None:
        """Admit a pending execution (within its workflow's concurrency limit) and run
        its first root step here."""
        with (
            _retry_when_transient(task),
            _step_failure_as_task_state(),
            app.engine.tracing.received(task.request),
            app.engine.tracing.start_span(execution_id, workflow) as span,
        ):
            try:
                admission = app.engine.admit(workflow, [execution_id], run_here=True)
            except StepFailed:  # its root step ran here: it started
                span.set("conveyor.status", "started")
                raise
            span.set("conveyor.status", "started" if admission.started else "waiting")

    @app.task(name=START_BATCH, **steps)
    def start_batch(
        task: Task[Any, Any], execution_ids: list[str], workflow: str, priority: int = 0
    ) -> None:
        """Start the first of a batch of pending executions here (``enqueue_many``'s,
        a batch a message) and send the rest on (``Engine.start_batch``)."""
        with (
            _retry_when_transient(task),
            _step_failure_as_task_state(),
            app.engine.tracing.received(task.request),
        ):
            app.engine.start_batch(execution_ids, workflow, priority)

    @app.task(name=RUN_STEP, base=StepTask, **steps)
    def run_step(
        task: Task[Any, Any],
        execution_id: str,
        step_name: str,
        workflow: str | None = None,
        version: int | None = None,
    ) -> None:
        """Claim, run and record one step (and the steps it continues with)."""
        with (
            _retry_when_transient(task),
            _step_failure_as_task_state(),
            app.engine.tracing.received(task.request),
        ):
            app.engine.run_step(execution_id, step_name, task.request.id, workflow, version)

    @app.task(name=RUN_ITEM, base=StepTask, **steps)
    def run_item(
        task: Task[Any, Any],
        execution_id: str,
        step_name: str,
        index: int,
        workflow: str,
        version: int,
    ) -> None:
        """Claim, run and record one item of a map step (and the items it continues with)."""
        with (
            _retry_when_transient(task),
            _step_failure_as_task_state(),
            app.engine.tracing.received(task.request),
        ):
            app.engine.items.run(execution_id, step_name, index, task.request.id, workflow, version)

    @app.task(name=FIRE_SCHEDULES, **options)
    def fire_schedules(task: Task[Any, Any]) -> None:
        """Enqueue the due ticks of the workflows' schedules (sent by beat)."""
        try:
            fire_due(app)
        except TransientDatabaseError:  # the next pass, a second from now, tries again
            log.warning("database unavailable; schedules fired by a later pass")

    @app.task(name=WAKE, **options)
    def wake(task: Task[Any, Any]) -> None:
        """Wake the sleeps and wait timeouts that are due (sent by beat every second)."""
        try:
            app.engine.wake()
        except TransientDatabaseError:  # the next pass, a second from now, tries again
            log.warning("database unavailable; due waits woken by a later pass")

    @app.task(name=PRUNE, **options)
    def prune(task: Task[Any, Any]) -> None:
        """Delete finished executions past their retention and clear payloads past
        theirs (scheduled by beat every CONVEYOR_PRUNE_INTERVAL)."""
        try:
            app.engine.prune()
        except TransientDatabaseError:  # the next pass goes on where this one stopped
            log.warning("database unavailable; retention left for a later pass")

    @app.task(name=RECONCILE, **options)
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


@contextmanager
def _step_failure_as_task_state() -> Iterator[None]:
    """Let Celery (its events, Flower) show a step's failure as the task's state.

    The engine raises ``StepFailed`` only after the outcome is committed and any retry
    published. A final failure propagates: the task ends FAILURE. A retry becomes
    Celery's ``Retry`` raised as is (not ``task.retry()``, which would publish a second
    message): the task ends RETRY. With acks_late, Celery acknowledges the message in
    both cases (``task_acks_on_failure_or_timeout``), so nothing is redelivered.
    """
    try:
        yield
    except StepFailed as failure:
        if failure.retrying:
            raise Retry(str(failure), exc=failure) from failure
        raise


# Every worker and beat process: the step's fields on its log lines, CONVEYOR_LOG_FORMAT
# and its housekeeping tasks' lines at DEBUG (worker.logs).
after_setup_logger.connect(logs.on_setup_logger)
after_setup_task_logger.connect(logs.on_setup_logger)


@worker_process_init.connect
def _fresh_connections_in_child(**_: Any) -> None:
    # A forked pool process must not share the parent's pooled database sockets.
    for database in {id(d): d for d in [get_database(), *_app_databases]}.values():
        database.engine.dispose(close=False)
        database.work_engine.dispose(close=False)


@worker_process_init.connect
def _own_process_group(**_: Any) -> None:
    # Runners that stop a process with its whole group (honcho, foreman, supervisord's
    # stopasgroup) would SIGTERM the pool processes as well, killing running steps and
    # hanging the warm shutdown that was to let them finish. Celery stops its pool itself,
    # a pool process dies with the main process (Celery sets its parent-death signal),
    # and at a hard time limit billiard kills a group leader's whole group.
    os.setpgid(0, 0)


# Databases of apps built for another database than the process's (see Engine).
_app_databases: list[Database] = []


def dispatch_starts(starts: Sequence[tuple[str, str, int]]) -> None:
    """Publish start messages with the default app (``CONVEYOR_DISPATCHER``'s default)."""
    app.engine.publish_starts(starts)


app = create_app()
