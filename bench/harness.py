"""What every benchmark needs: servers, migrated databases, apps, workers, counters, output.

``services()`` starts PostgreSQL 15 and Redis on free ports (``tests/servers.py``) and
always stops them. Databases are migrated with Alembic, as production does. Figures are
printed one a line: ``name key=value ... value=<number>``.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import redis
from alembic import command
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.pool import NullPool

from core import database as core_database
from core.config import Settings
from core.registry import WorkflowRegistry
from migrations import alembic_config
from tests.servers import PostgresServer, RedisServer, start_postgres, start_redis
from worker.app import ConveyorCelery, create_app

WORKER_CONCURRENCY = 4


class BenchError(RuntimeError):
    """A benchmark could not produce its figure (a workload that did not finish)."""


def emit(name: str, value: float, **labels: object) -> None:
    """Print one figure: ``name key=value ... value=<number>``."""
    parts = [name, *(f"{key}={label}" for key, label in labels.items())]
    print(" ".join([*parts, f"value={_number(value)}"]), flush=True)


def note(message: str) -> None:
    """Print a comment line (progress, context): not a figure."""
    print(f"# {message}", flush=True)


def _number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


# --- servers and databases ----------------------------------------------------------


@dataclass(frozen=True)
class Services:
    """The servers one benchmark run started."""

    postgres: PostgresServer
    redis: RedisServer

    @property
    def redis_url(self) -> str:
        """The broker URL (database 0)."""
        return self.redis.url


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def services() -> Iterator[Services]:
    """Start PostgreSQL and Redis for the block; stop them however the block ends."""
    # SIGTERM becomes SystemExit so that the servers are stopped by the finally blocks.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with ExitStack() as stack:
            postgres = start_postgres()
            stack.callback(postgres.stop)
            redis_server = start_redis()
            stack.callback(redis_server.stop)
            yield Services(postgres=postgres, redis=redis_server)
    finally:
        signal.signal(signal.SIGTERM, previous)


def migrate(url: str) -> None:
    """Build conveyor's schema in the empty database at ``url`` (Alembic upgrade head)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")
    finally:
        engine.dispose()


def postgres_database(server: PostgresServer, name: str) -> str:
    """Create and migrate database ``name`` on ``server``; its URL."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"not a plain database name: {name!r}")
    admin = create_engine(server.url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    url = server.url(name)
    migrate(url)
    return url


def sqlite_database(folder: Path, name: str) -> str:
    """Create and migrate a SQLite file ``name``.db in ``folder``; its URL."""
    path = folder / f"{name}.db"
    path.unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    migrate(url)
    return url


@dataclass(frozen=True)
class Backend:
    """A migrated state database to benchmark: ``postgresql`` or ``sqlite``."""

    name: str
    url: str


def bench_settings(database_url: str, broker_url: str, **overrides: Any) -> Settings:
    """Production defaults on the given database and broker (nothing from ``.env``)."""
    return Settings(
        _env_file=None,
        database_url=database_url,
        broker_url=broker_url,
        **overrides,
    )


def flush_broker(broker_url: str) -> None:
    """Drop every message and key in the Redis database of ``broker_url``."""
    client = redis.Redis.from_url(broker_url)
    try:
        client.flushdb()
    finally:
        client.close()


@contextmanager
def conveyor_app(settings: Settings, registry: WorkflowRegistry) -> Iterator[ConveyorCelery]:
    """A conveyor app on ``settings``, with every ``core.database`` helper pointed there."""
    flush_broker(settings.broker_url.get_secret_value())
    database = core_database.configure(settings)
    app = create_app(settings, registry)
    try:
        yield app
    finally:
        app.engine.heartbeats.stop()
        app.close()
        database.dispose()


def state_engine() -> Engine:
    """The sync engine the worker's state manager runs on (what the SQL counters watch)."""
    return core_database.get_database().engine


# --- CPU -------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # the process has exited
        return None
    # Fields after the command name, which is in parentheses and may hold spaces.
    return raw.rsplit(")", 1)[1].split()


def _cpu_of_tree(root: int) -> float:
    """CPU seconds of ``root`` and its live children (PostgreSQL's backends)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        # fields[1] is the parent pid; fields[11] and [12] are user and system ticks.
        if int(entry.name) == root or int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


class CpuMeter:
    """CPU seconds used while entered: this process (worker threads and producer),
    PostgreSQL (postmaster and backends) and Redis; added up over every block."""

    def __init__(self, running: Services) -> None:
        data = running.postgres.root / "data" / "postmaster.pid"
        self._postmaster = int(data.read_text().split()[0])
        self._redis = running.redis.process.pid
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {
            "bench": time.process_time(),
            "postgres": _cpu_of_tree(self._postmaster),
            "redis": _cpu_of_tree(self._redis),
        }

    def __enter__(self) -> CpuMeter:
        self._start = self._now()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        end = self._now()
        for name, seconds in end.items():
            self.used[name] = self.used.get(name, 0.0) + seconds - self._start[name]

    def emit_per(
        self, unit: str, count: int, processes: Sequence[str] | None = None, **labels: object
    ) -> None:
        """Print CPU milliseconds per ``unit`` of each process group (or those named)."""
        for process, seconds in self.used.items():
            if processes is None or process in processes:
                emit(f"cpu_ms_per_{unit}", 1000 * seconds / count, **labels, process=process)


# --- workers and completion -----------------------------------------------------------


@contextmanager
def running_worker(app: Celery, concurrency: int = WORKER_CONCURRENCY) -> Iterator[None]:
    """An in-process worker (threads pool) consuming ``app``'s default queue for the block."""
    with start_worker(
        app,
        pool="threads",
        concurrency=concurrency,
        perform_ping_check=False,
        shutdown_timeout=30,
        loglevel="WARNING",
    ):
        yield
    if isinstance(app, ConveyorCelery):
        app.engine.heartbeats.stop()


class TaskCounter:
    """Counts finished runs of one task name (Celery's ``task_postrun``) in this process."""

    def __init__(self, task_name: str) -> None:
        self.task_name = task_name
        self._count = 0
        self._target: int | None = None
        self._condition = threading.Condition()

    def _on_postrun(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) != self.task_name:
            return
        with self._condition:
            self._count += 1
            self._condition.notify_all()

    def __enter__(self) -> TaskCounter:
        task_postrun.connect(self._on_postrun, weak=False)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        task_postrun.disconnect(self._on_postrun)

    @property
    def count(self) -> int:
        """Runs finished since the counter was entered."""
        with self._condition:
            return self._count

    def wait_for(self, total: int, timeout: float) -> None:
        """Block until ``total`` runs have finished, or raise BenchError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while self._count < total:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(
                        f"only {self._count} of {total} {self.task_name} runs after {timeout}s"
                    )
                self._condition.wait(min(left, 1.0))


# --- SQL counters ---------------------------------------------------------------------


class SqlCounter:
    """Counts statements, commits and pool checkouts on the engines it watches.

    Statements are what SQLAlchemy sends (``before_cursor_execute``; an executemany is
    one); SQLite's ``BEGIN IMMEDIATE`` is counted as ``begin``, not as a statement, so
    that both backends count the same work. On PostgreSQL every checkout also costs a
    ``pool_pre_ping`` round trip, which SQLAlchemy sends past the cursor events.
    Counts add up over every ``counting()`` block.
    """

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.commits = 0
        self.rollbacks = 0
        self.checkouts = 0
        self._lock = threading.Lock()

    @property
    def statements(self) -> int:
        """Statements sent, BEGIN excluded."""
        with self._lock:
            return sum(n for kind, n in self.kinds.items() if kind != "begin")

    def _on_statement(
        self,
        _conn: Any,
        _cursor: Any,
        statement: str,
        _parameters: Any,
        _context: Any,
        _executemany: bool,
    ) -> None:
        kind = statement.lstrip().split(None, 1)[0].lower() if statement.strip() else "?"
        with self._lock:
            self.kinds[kind] += 1

    def _on_commit(self, _conn: Any) -> None:
        with self._lock:
            self.commits += 1

    def _on_rollback(self, _conn: Any) -> None:
        with self._lock:
            self.rollbacks += 1

    def _on_checkout(self, *_: Any) -> None:
        with self._lock:
            self.checkouts += 1

    @contextmanager
    def counting(self, engine: Engine) -> Iterator[SqlCounter]:
        """Count what ``engine`` sends during the block."""
        listeners: list[tuple[str, Any]] = [
            ("before_cursor_execute", self._on_statement),
            ("commit", self._on_commit),
            ("rollback", self._on_rollback),
            ("checkout", self._on_checkout),
        ]
        for name, listener in listeners:
            event.listen(engine, name, listener)
        try:
            yield self
        finally:
            for name, listener in listeners:
                event.remove(engine, name, listener)

    def emit_per(self, unit: str, count: int, **labels: object) -> None:
        """Print statements (total and by kind), commits and checkouts per ``unit``."""
        emit(f"sql_statements_per_{unit}", self.statements / count, **labels)
        with self._lock:
            kinds = sorted((k, n) for k, n in self.kinds.items() if k != "begin")
        for kind, n in kinds:
            emit(f"sql_statements_per_{unit}", n / count, **labels, kind=kind)
        emit(f"sql_commits_per_{unit}", self.commits / count, **labels)
        emit(f"sql_checkouts_per_{unit}", self.checkouts / count, **labels)
        if self.rollbacks:
            emit(f"sql_rollbacks_per_{unit}", self.rollbacks / count, **labels)


def median(values: list[float]) -> float:
    """The median of a non-empty list."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2
