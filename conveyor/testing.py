"""conveyor's pytest plugin: run your workflows in a test, with time travel.

Installed with conveyor (the ``pytest11`` entry point ``conveyor``), it gives a test the
fixture ``conveyor_test``: a throwaway SQLite database (or, when
``CONVEYOR_DATABASE_URL`` is set, that database, emptied for each test), an in-memory
broker and a real Celery worker in a thread of the test's process::

    from datetime import timedelta
    from myapp.workflows import onboarding

    def test_onboarding_reminds_after_three_days(conveyor_test):
        run = conveyor_test.run(onboarding, {"user": "ada"})
        assert run.status == "running"                  # waiting for the approval
        conveyor_test.advance(timedelta(days=3))        # the reminder's sleep fires
        conveyor_test.send_event("approved", key="ada")
        run = conveyor_test.wait(run.execution_id)
        assert run.status == "succeeded"
        assert run.steps["remind"].status == "succeeded"

Time travel moves conveyor's timers, not the clock: ``advance(delta)`` brings every
timer due within ``delta`` (sleeps, event-wait timeouts, deadlines, retries' backoff,
debounce windows, rate limits and pauses, schedules' next ticks) to now, and runs the
waker, the reconciler and the schedules' pass as beat would. ``run`` and ``wait`` do it
by themselves while an execution only waits for time (``advance_timers=True``), so a
three-day sleep costs nothing; they return as soon as the execution ends or waits for
something only the test can give (an event, a signal). Code in your steps that reads the
clock itself (``datetime.now()``) sees the real time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import (
    Column,
    Connection,
    create_engine,
    exists,
    func,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.pool import NullPool

from core import database as core_database
from core.config import Settings
from core.dispatch import using_dispatcher
from core.errors import DefinitionError
from core.models import (
    Base,
    ExecutionEvent,
    FlowKey,
    InboxEvent,
    MapItem,
    StepExecution,
    WorkflowExecution,
    WorkflowSchedule,
)
from core.registry import WorkflowRegistry, using_registry
from core.shapes import shape_of
from core.states import EXECUTIONS, StepStatus
from core.workflows import Step, StepFunction, Workflow, _check_signature

if TYPE_CHECKING:
    from worker.app import ConveyorCelery
    from worker.replay import Replayed

FINAL = frozenset(s.value for s in EXECUTIONS.final)
POLL = 0.01
# celery.contrib.testing's ping task: a message the worker can take and drop.
PING = "celery.ping"
# What a worker has (or will have) in hand: a step or item that is due and queued, or
# running.
BUSY = (StepStatus.QUEUED.value, StepStatus.RUNNING.value)

WE = WorkflowExecution.__table__.c
SE = StepExecution.__table__.c
MI = MapItem.__table__.c

# Every timer conveyor keeps, as (table, column, which rows): what ``advance`` moves.
_TIMERS: tuple[tuple[Any, str], ...] = (
    (StepExecution.__table__, "wake_at"),
    (StepExecution.__table__, "next_attempt_at"),
    (MapItem.__table__, "next_attempt_at"),
    (WorkflowExecution.__table__, "deadline_at"),
    (WorkflowExecution.__table__, "start_at"),
    (WorkflowExecution.__table__, "latest_start_at"),
    (WorkflowSchedule.__table__, "next_tick_at"),
    (FlowKey.__table__, "rate_tat"),
    (FlowKey.__table__, "paused_until"),
    (InboxEvent.__table__, "expires_at"),
)


@dataclass(frozen=True)
class Transition:
    """One entry of a history: a status change and why."""

    step: str | None
    source: str | None
    target: str
    attempt: int | None
    reason: str | None


@dataclass(frozen=True)
class StepRun:
    """A step as the run left it."""

    name: str
    status: str
    output: Any
    error: Any
    # Tries of its Retry policy (crash recoveries not counted); ``attempt`` counts all.
    attempts: int
    attempt: int
    history: tuple[Transition, ...]


@dataclass(frozen=True)
class Run:
    """An execution as the test sees it: status, output or error, each step."""

    execution_id: str
    workflow: str
    status: str
    output: Any
    error: Any
    steps: dict[str, StepRun]
    history: tuple[Transition, ...]

    @property
    def finished(self) -> bool:
        """Whether it ended (succeeded, failed, cancelled, timed out)."""
        return self.status in FINAL


class ConveyorTest:
    """What the ``conveyor_test`` fixture gives a test (see the module's docstring)."""

    def __init__(self, app: ConveyorCelery, registry: WorkflowRegistry) -> None:
        self.app = app
        self.registry = registry
        self._overrides: list[tuple[Workflow, str, Step]] = []

    # --- workflows ------------------------------------------------------------------

    def register(self, *workflows: Workflow) -> None:
        """Make workflows known (those of ``CONVEYOR_WORKFLOW_MODULES`` already are, and
        a Workflow given to ``start`` or ``run`` is registered then)."""
        for workflow in workflows:
            if workflow not in self.registry:
                self.registry.register(workflow)

    def override_step(self, step: str, fake: StepFunction) -> None:
        """Run ``fake`` instead of a step's code until the test ends. ``step`` is its
        name, or ``workflow.step`` when several workflows have one of that name. The fake
        takes what the step takes (the context, then its upstream outputs)."""
        workflow, name = self._step_named(step)
        original = workflow.steps[name]
        replaced = dataclasses.replace(original, fn=fake)
        _check_signature(f"override of {workflow.name}.{name}", replaced)
        shape_of(workflow)  # the shape stays the code's: a fake is not a deploy
        workflow.steps[name] = replaced
        self._overrides.append((workflow, name, original))

    def _step_named(self, step: str) -> tuple[Workflow, str]:
        workflow_name, _, name = step.rpartition(".")
        found = [
            w
            for w in self.registry
            if name in w.steps and (not workflow_name or w.name == workflow_name)
        ]
        if not found:
            raise DefinitionError(f"no registered workflow has a step {step!r}")
        if len({w.name for w in found}) > 1:
            names = ", ".join(sorted(f"{w.name}.{name}" for w in found))
            raise DefinitionError(f"several workflows have a step {name!r}: name one of {names}")
        return max(found, key=lambda w: w.version), name

    def restore(self) -> None:
        """Put back every step ``override_step`` replaced (done when the test ends)."""
        while self._overrides:
            workflow, name, original = self._overrides.pop()
            workflow.steps[name] = original

    # --- running --------------------------------------------------------------------

    def start(self, workflow: Workflow | str, input: Any = None, **options: Any) -> str:
        """Enqueue an execution (``options`` as ``enqueue``'s); its id."""
        from worker.producer import enqueue

        if isinstance(workflow, Workflow):
            self.register(workflow)
        return enqueue(workflow, input, app=self.app, **options)

    def run(
        self,
        workflow: Workflow | str,
        input: Any = None,
        *,
        timeout: float = 30.0,
        advance_timers: bool = True,
        **options: Any,
    ) -> Run:
        """Start an execution and ``wait`` for it."""
        execution_id = self.start(workflow, input, **options)
        return self.wait(execution_id, timeout=timeout, advance_timers=advance_timers)

    def wait(self, execution_id: str, *, timeout: float = 30.0, advance_timers: bool = True) -> Run:
        """The execution once it ended, or once nothing can move it on but the test (it
        waits for an event or a signal). Meanwhile, with ``advance_timers``, time jumps
        to each timer its waits hold (sleeps, timeouts, retries' backoff, deadlines)
        whenever nothing else runs. ``TimeoutError`` after ``timeout`` seconds of real
        time with work still running."""
        deadline = time.monotonic() + timeout
        while True:
            self._settle(deadline)
            found = self.result(execution_id)
            if found.finished:
                return found
            due = self._next_timer() if advance_timers else None
            if due is None:
                if self.app.engine.manager.run(_busy):
                    continue  # something woke since it settled (a wake message due)
                return found
            self._advance_to(due)

    def result(self, execution_id: str) -> Run:
        """The execution as it is now."""
        return self.app.engine.manager.run(_read_run, execution_id)

    # --- time travel and input from outside -----------------------------------------

    def advance(self, delta: timedelta) -> None:
        """Move time forward by ``delta`` for conveyor's timers, fire what fell due, and
        return once nothing runs any more."""
        if delta < timedelta(0):
            raise ValueError(f"time travels forward only, got {delta}")
        self._advance_to(datetime.now(UTC) + delta)
        self._settle(time.monotonic() + 30.0)

    def send_event(self, name: str, payload: Any = None, *, key: str = "") -> None:
        """Send an event (``conveyor.send_event``) and let what it wakes run."""
        from worker.producer import send_event

        send_event(name, key=key, payload=payload, app=self.app)
        self._settle(time.monotonic() + 30.0)

    def signal(self, execution_id: str, step: str, payload: Any = None) -> None:
        """Signal one execution's wait (``conveyor.signal``) and let what it wakes run."""
        from worker.producer import signal

        signal(execution_id, step, payload, app=self.app)
        self._settle(time.monotonic() + 30.0)

    def replay(self, execution_id: str, step: str, *, item: int | None = None) -> Replayed:
        """Run a step's current code with what the execution recorded for it, changing
        nothing (``conveyor replay``): its output or error, and its traceback."""
        from worker.replay import replay

        return replay(self.app.engine.manager.run, self.registry, execution_id, step, item=item)

    def _advance_to(self, moment: datetime) -> None:
        engine = self.app.engine
        engine.manager.run(_move_timers, moment)
        engine.wake()
        engine.reconcile()
        from worker.schedules import fire_schedules

        fire_schedules(self.app)

    def _next_timer(self) -> datetime | None:
        return self.app.engine.manager.run(_next_timer)

    def _settle(self, deadline: float) -> None:
        """Return once no step or item is due or running (the worker is idle)."""
        while self.app.engine.manager.run(_busy):
            if time.monotonic() > deadline:
                raise TimeoutError("steps still queued or running: see conveyor_test.result()")
            time.sleep(POLL)


# --- units of work ------------------------------------------------------------------


def _transition(row: Any) -> Transition:
    return Transition(row.step_name, row.from_status, row.to_status, row.attempt, row.reason)


def _read_run(conn: Connection, execution_id: str) -> Run:
    execution = conn.execute(
        select(WorkflowExecution.__table__).where(WE.execution_id == execution_id)
    ).one()
    events = [
        _transition(row)
        for row in conn.execute(
            select(ExecutionEvent.__table__)
            .where(ExecutionEvent.__table__.c.execution_id == execution_id)
            .order_by(ExecutionEvent.__table__.c.id)
        )
    ]
    steps = {
        row.step_name: StepRun(
            name=row.step_name,
            status=row.status,
            output=row.output_data,
            error=row.error,
            attempts=row.attempt - row.recoveries,
            attempt=row.attempt,
            history=tuple(e for e in events if e.step == row.step_name),
        )
        for row in conn.execute(
            select(StepExecution.__table__).where(SE.execution_id == execution_id)
        )
    }
    return Run(
        execution_id=execution_id,
        workflow=execution.workflow_id,
        status=execution.status,
        output=execution.output_data,
        error=execution.error,
        steps=steps,
        history=tuple(events),
    )


def _busy(conn: Connection) -> bool:
    """Whether a worker has something in hand or due: a step or item queued and due, or
    running, or an execution pending outside a debounce window. One statement, so one
    snapshot: asked in turns, a start committed between two questions would hide."""
    now = datetime.now(UTC)
    due = (SE.next_attempt_at.is_(None)) | (SE.next_attempt_at <= now)
    item_due = (MI.next_attempt_at.is_(None)) | (MI.next_attempt_at <= now)
    pending = (WE.status == "pending") & WE.debounce_key.is_(None)
    query = select(
        or_(
            exists().where(SE.status.in_(BUSY), due),
            exists().where(MI.status.in_(BUSY), item_due),
            exists().where(pending),
        )
    )
    return bool(conn.execute(query).scalar_one())


def _next_timer(conn: Connection) -> datetime | None:
    """The earliest timer of open work: a waiting step's wake time, a queued step's or
    item's retry, an open execution's deadline or a debounce window's start (schedules'
    ticks are not: a schedule always has a next one). One statement, as ``_busy``."""
    is_open = WE.status.in_(("pending", "running"))
    timers = union_all(
        select(SE.wake_at.label("at")).where(SE.status == StepStatus.WAITING.value),
        select(SE.next_attempt_at).where(SE.status == StepStatus.QUEUED.value),
        select(MI.next_attempt_at).where(MI.status == StepStatus.QUEUED.value),
        select(WE.deadline_at).where(is_open),
        select(WE.start_at).where(WE.debounce_key.is_not(None)),
    ).subquery()
    found: datetime | None = conn.execute(select(func.min(timers.c.at))).scalar_one_or_none()
    return found


def _move_timers(conn: Connection, moment: datetime) -> None:
    """Bring every timer due by ``moment`` to now, keeping later ones as far after it
    as they were (as if the clock had moved to ``moment``)."""
    now = datetime.now(UTC)
    shift = moment - now
    for table, name in _TIMERS:
        column: Column[Any] = table.c[name]
        keys = list(table.primary_key.columns)
        rows = conn.execute(select(*keys, column).where(column > now)).all()
        for row in rows:
            moved = max(now, row[-1] - shift)
            where = [key == row[i] for i, key in enumerate(keys)]
            conn.execute(update(table).where(*where).values({name: moved}))


# --- the fixture ------------------------------------------------------------------------


def _migrated_sqlite(folder: Path) -> Path:
    from alembic import command

    from migrations import alembic_config

    path = folder / "template.db"
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")
    finally:
        engine.dispose()
    return path


def _migrated_url(url: str) -> None:
    from alembic import command

    from migrations import alembic_config

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")
    finally:
        engine.dispose()


def _emptied(url: str) -> None:
    """Delete every row of conveyor's tables (a test's PostgreSQL database)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
            connection.execute(text(f"TRUNCATE {names} CASCADE"))
    finally:
        engine.dispose()


def _stop_soon(app: ConveyorCelery) -> None:
    """Ask the test worker to stop, and wake its consumer with messages: on an
    in-memory broker each turn of its loop polls for 2 seconds, and it looks at the stop
    request only after one more turn (Celery's synloop), so two messages end both."""
    from celery.worker import state

    state.should_terminate = 0  # type: ignore[assignment]  # Celery types it None
    for _ in range(2):
        app.send_task(PING, queue=app.engine.settings.default_queue)


def _shut_pools(workers: Sequence[Any]) -> None:
    """Shut the executors of stopped test workers' thread pools down, their threads too."""
    for worker in workers:
        executor = getattr(worker.pool, "executor", None)
        if executor is not None:
            executor.shutdown(wait=True)


def _no_dispatch(_starts: Sequence[tuple[str, str, int]]) -> None:
    """A placeholder, replaced by the test app's dispatcher at once."""


@pytest.fixture(scope="session")
def _conveyor_test_database(tmp_path_factory: pytest.TempPathFactory) -> str | Path:
    """A migrated SQLite file to copy for each test, or the migrated database that
    ``CONVEYOR_DATABASE_URL`` names."""
    url = os.environ.get("CONVEYOR_DATABASE_URL")
    if url:
        _migrated_url(url)
        return url
    return _migrated_sqlite(tmp_path_factory.mktemp("conveyor-template"))


@pytest.fixture
def conveyor_test(_conveyor_test_database: str | Path, tmp_path: Path) -> Iterator[ConveyorTest]:
    """Run workflows in this test: see ``conveyor.testing``."""
    import celery.contrib.testing.tasks  # noqa: F401  (registers PING on every app)
    from celery.contrib.testing.worker import start_worker

    from worker.app import create_app
    from worker.startup import StartupReport

    if isinstance(_conveyor_test_database, Path):
        path = tmp_path / "conveyor.db"
        shutil.copyfile(_conveyor_test_database, path)
        url = f"sqlite:///{path}"
    else:
        url = _conveyor_test_database
        _emptied(url)
    settings = Settings(
        database_url=url,
        broker_url="memory://",
        heartbeat_interval=0.5,
        db_retry_initial_wait=0.01,
        db_retry_max_wait=0.2,
        dispatcher="",
    )
    registry = WorkflowRegistry()
    for module in settings.workflow_modules:
        registry.load_module(module)
    with ExitStack() as stack:
        stack.enter_context(core_database.using(settings))
        stack.enter_context(using_registry(registry))
        # Entered before the app registers its own dispatcher: the process's comes back.
        dispatching = stack.enter_context(using_dispatcher(_no_dispatch))
        app = create_app(settings, registry)
        # A test registers its workflows as it runs them: the worker's start-up report
        # would warn that none are registered.
        app.steps["worker"].discard(StartupReport)
        app.conf.broker_transport_options = {"polling_interval": POLL}
        assert dispatching is _no_dispatch
        kit = ConveyorTest(app, registry)
        stack.callback(kit.restore)
        stack.callback(app.engine.heartbeats.stop)
        # Celery's test worker ends by terminate, which leaves the thread pool's
        # executor threads idle for ever: shut down once the worker thread has ended.
        workers: list[Any] = []
        stack.callback(_shut_pools, workers)
        workers.append(
            stack.enter_context(
                start_worker(
                    app,
                    pool="threads",
                    concurrency=2,
                    perform_ping_check=False,
                    shutdown_timeout=30,
                    loglevel="WARNING",
                )
            )
        )
        stack.callback(_stop_soon, app)
        yield kit
