"""What every benchmark needs: servers, databases, output, and in-process conveyor apps.

``services()`` starts PostgreSQL 15 with production durability (``fsync``,
``synchronous_commit`` and ``full_page_writes`` on, unlike the test server) and
``pg_stat_statements`` loaded, and Redis, on free ports, with ``tests/servers.py``'s
helpers; it always stops them. Conveyor's databases are migrated with Alembic, as
production does.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from alembic import command
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.pool import NullPool

from core import database as core_database
from core.config import Settings
from core.registry import WorkflowRegistry
from migrations import alembic_config
from tests.servers import (
    PostgresServer,
    RedisServer,
    _as_postgres,
    _postgres_bin_dir,
    _run,
    free_port,
    start_redis,
)
from worker.app import ConveyorCelery, create_app

# The role the benchmarks poll and read results as: its statements are left out of
# the counts (pg_stat_statements keeps them by role), and it writes nothing.
OBSERVER = "bench_observer"
DURABILITY = ("fsync=on", "synchronous_commit=on", "full_page_writes=on")


class BenchError(RuntimeError):
    """A benchmark could not produce its figure (a workload that did not finish)."""


def note(message: str) -> None:
    """Print a comment line (progress, context): not a figure."""
    print(f"# {message}", flush=True)


def emit(name: str, value: float, **labels: object) -> None:
    """Print one figure of the extras: ``name key=value ... value=<number>``."""
    parts = [name, *(f"{key}={label}" for key, label in labels.items())]
    print(" ".join([*parts, f"value={number(value)}"]), flush=True)


def number(value: float) -> str:
    """A figure with about three significant digits."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of a non-empty sequence (linear interpolation)."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --- servers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Services:
    """The servers one benchmark run started."""

    postgres: PostgresServer
    redis: RedisServer

    @property
    def broker_url(self) -> str:
        """The broker URL (Redis database 0)."""
        return self.redis.url

    @property
    def result_url(self) -> str:
        """Plain Celery's result backend (Redis database 1)."""
        return self.redis.url.rsplit("/", 1)[0] + "/1"

    def admin_url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL for ``database`` as the superuser."""
        return self.postgres.url(database)

    def dsn(self, database: str, user: str = "postgres") -> str:
        """A libpq connection string (psycopg, DBOS) for ``database`` as ``user``."""
        return f"postgresql://{user}@127.0.0.1:{self.postgres.port}/{database}"

    @property
    def postmaster_pid(self) -> int:
        """The PostgreSQL server's main process."""
        data = self.postgres.root / "data" / "postmaster.pid"
        return int(data.read_text().split()[0])


def start_durable_postgres() -> PostgresServer:
    """initdb and start a cluster with production durability and pg_stat_statements.

    The same steps as ``tests.servers.start_postgres``, which turns fsync off.
    """
    bin_dir = _postgres_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="conveyor-bench-pg-"))
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    port = free_port()
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
    _run(_as_postgres([*initdb, "-E", "UTF8", "--no-instructions"]), "initdb")
    options = " ".join(
        [
            "-c listen_addresses=127.0.0.1",
            f"-p {port}",
            f"-k {root}",
            *(f"-c {setting}" for setting in DURABILITY),
            "-c shared_preload_libraries=pg_stat_statements",
            "-c max_connections=300",
        ]
    )
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options]
    _run(
        _as_postgres([*pg_ctl, "-l", str(root / "postgres.log"), "-w", "-t", "60", "start"]),
        "pg_ctl start",
    )
    return PostgresServer(port=port, root=root, bin_dir=bin_dir)


def _prepare_cluster(server: PostgresServer) -> None:
    admin = create_engine(server.url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
            connection.execute(text(f"CREATE ROLE {OBSERVER} LOGIN"))
            connection.execute(text(f"GRANT pg_read_all_data TO {OBSERVER}"))
            settings = connection.execute(
                text("SELECT name, setting FROM pg_settings WHERE name = ANY(:names)"),
                {"names": [s.split("=")[0] for s in DURABILITY]},
            ).all()
    finally:
        admin.dispose()
    found = {str(name): str(value) for name, value in settings}
    if any(found.get(s.split("=")[0]) != "on" for s in DURABILITY):
        raise BenchError(f"PostgreSQL is not durable: {found}")


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def services() -> Iterator[Services]:
    """Start PostgreSQL and Redis for the block; stop them however the block ends."""
    # SIGTERM becomes SystemExit so that the servers are stopped by the finally blocks.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with ExitStack() as stack:
            postgres = start_durable_postgres()
            stack.callback(postgres.stop)
            _prepare_cluster(postgres)
            redis_server = start_redis()
            stack.callback(redis_server.stop)
            yield Services(postgres=postgres, redis=redis_server)
    finally:
        signal.signal(signal.SIGTERM, previous)


def create_database(running: Services, name: str) -> str:
    """Create (afresh) the empty database ``name``; its SQLAlchemy URL."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"not a plain database name: {name!r}")
    admin = create_engine(running.admin_url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return running.admin_url(name)


def migrate(url: str) -> None:
    """Build conveyor's schema in the empty database at ``url`` (Alembic upgrade head)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")
    finally:
        engine.dispose()


def conveyor_database(running: Services, name: str) -> str:
    """Create and migrate conveyor's database ``name``; its URL."""
    url = create_database(running, name)
    migrate(url)
    return url


def flush_redis(url: str) -> None:
    """Drop every message and key in the Redis database of ``url``, but kombu's bindings.

    A producer declares its queue once per connection; without the binding kept here,
    what it sends before a new worker declares the queue again would be dropped.
    """
    client = redis.Redis.from_url(url)
    try:
        doomed = [k for k in client.scan_iter(count=1000) if not k.startswith(b"_kombu.binding.")]
        for start in range(0, len(doomed), 1000):
            client.delete(*doomed[start : start + 1000])
    finally:
        client.close()


# --- in-process conveyor apps (producers, extras) ----------------------------------------


def bench_settings(database_url: str, broker_url: str, **overrides: Any) -> Settings:
    """Production defaults on the given database and broker (nothing from ``.env``)."""
    return Settings(
        _env_file=None,
        database_url=database_url,
        broker_url=broker_url,
        **overrides,
    )


@contextmanager
def conveyor_app(settings: Settings, registry: WorkflowRegistry) -> Iterator[ConveyorCelery]:
    """A conveyor app on ``settings``, with every ``core.database`` helper pointed there."""
    database = core_database.configure(settings)
    app = create_app(settings, registry)
    try:
        yield app
    finally:
        app.engine.heartbeats.stop()
        app.close()
        database.dispose()


def state_engine() -> Engine:
    """The sync engine the state manager runs its units of work on (what ``SqlCounter``
    watches): ``work_engine``, not the sessions' ``engine``."""
    return core_database.get_database().work_engine


class SqlCounter:
    """Counts statements and commits that an in-process engine sends (the extras).

    Statements are what SQLAlchemy sends (``before_cursor_execute``; an executemany is
    one). Counts add up over every ``counting()`` block.
    """

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.commits = 0
        self._lock = threading.Lock()

    @property
    def statements(self) -> int:
        """Statements sent, BEGIN excluded."""
        with self._lock:
            return sum(n for kind, n in self.kinds.items() if kind != "begin")

    def _on_statement(self, *args: Any) -> None:
        statement = str(args[2])
        kind = statement.lstrip().split(None, 1)[0].lower() if statement.strip() else "?"
        with self._lock:
            self.kinds[kind] += 1

    def _on_commit(self, _conn: Any) -> None:
        with self._lock:
            self.commits += 1

    @contextmanager
    def counting(self, engine: Engine) -> Iterator[SqlCounter]:
        """Count what ``engine`` sends during the block."""
        listeners: list[tuple[str, Any]] = [
            ("before_cursor_execute", self._on_statement),
            ("commit", self._on_commit),
        ]
        for name, listener in listeners:
            event.listen(engine, name, listener)
        try:
            yield self
        finally:
            for name, listener in listeners:
                event.remove(engine, name, listener)
