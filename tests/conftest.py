"""Test harness: real PostgreSQL and Redis, and one database fixture over both backends.

``database`` is parametrized over the backends in ``CONVEYOR_TEST_BACKENDS``
(default ``postgresql,sqlite``); tests marked ``postgresql_only`` are deselected on
SQLite, never skipped. Each test gets a fresh database copied from a template built
once per session, and every ``core.database`` helper is pointed at it.
Servers are started here (see ``tests/servers.py``) unless
``CONVEYOR_TEST_POSTGRES_URL`` / ``CONVEYOR_TEST_REDIS_URL`` name running ones.
A server that cannot start fails the run; nothing is skipped for a missing service.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from alembic import command
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from core import database as core_database
from core.config import Settings
from core.dispatch import register_dispatcher
from core.registry import configure_registry
from migrations import alembic_config
from tests.helpers.workflows import state_registry
from tests.servers import PostgresServer, start_postgres, start_redis

BACKENDS = [
    b.strip()
    for b in os.environ.get("CONVEYOR_TEST_BACKENDS", "postgresql,sqlite").split(",")
    if b.strip()
]
_counter = itertools.count()
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist's workers inherit COLUMNS=80 and LINES=24 from its launcher: the CLI
    # would cut its tables to 80 columns, as in a terminal, where the tests read them
    # as a pipe does (one row a line, conveyor.cli.render.PIPE_WIDTH).
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        backends = BACKENDS
        for only in ("postgresql", "sqlite"):
            if metafunc.definition.get_closest_marker(f"{only}_only"):
                backends = [b for b in BACKENDS if b == only]
        metafunc.parametrize("backend", backends, scope="session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Async tests close the async engine's pooled connections on their own loop,
    # before the loop is closed (see _close_async_connections).
    for item in items:
        if item.get_closest_marker("asyncio") and "database" in getattr(item, "fixturenames", ()):
            item.fixturenames.append("_close_async_connections")  # type: ignore[attr-defined]


@pytest_asyncio.fixture
async def _close_async_connections(database: TestDatabase) -> AsyncIterator[None]:
    yield
    await core_database.get_database().dispose_async()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | None]:
    """The PostgreSQL server this session started (None when given one to use)."""
    if os.environ.get("CONVEYOR_TEST_POSTGRES_URL"):
        yield None
        return
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_admin_url(postgres_server: PostgresServer | None) -> URL:
    """URL of the postgres database on a server this session may create databases on."""
    if postgres_server is None:
        given = os.environ["CONVEYOR_TEST_POSTGRES_URL"]
        return make_url(given).set(drivername="postgresql+psycopg")
    return make_url(postgres_server.url())


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server for this session."""
    given = os.environ.get("CONVEYOR_TEST_REDIS_URL")
    if given:
        yield given
        return
    server = start_redis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _postgres_template(postgres_admin_url: URL) -> str:
    """A database with conveyor's schema that each test's database is copied from."""
    name = f"conveyor_template_{os.getpid()}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    engine = create_engine(postgres_admin_url.set(database=name))
    _migrate(engine)
    engine.dispose()
    return name


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    engine = create_engine(f"sqlite:///{path}")
    _migrate(engine)
    engine.dispose()
    return path


def _migrate(engine: Engine) -> None:
    """Build the schema in ``engine``'s empty database as production does: Alembic's upgrade."""
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")


@dataclass
class TestDatabase:
    """The database one test runs against."""

    __test__ = False  # not a test class, for pytest's collector

    backend: str
    url: str
    settings: Settings

    @property
    def is_postgres(self) -> bool:
        return self.backend == "postgresql"


def _settings_for(url: str) -> Settings:
    # Short waits keep retry tests quick; pool sizes stay at the production defaults.
    # No dispatcher: tests that start executions run a worker whose app registers one.
    return Settings(
        database_url=url, db_retry_initial_wait=0.01, db_retry_max_wait=0.2, dispatcher=""
    )


@pytest.fixture
def database(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[TestDatabase]:
    """A fresh, migrated database on ``backend``; every core.database helper points at it."""
    if backend == "postgresql":
        admin_url: URL = request.getfixturevalue("postgres_admin_url")
        template: str = request.getfixturevalue("_postgres_template")
        name = f"test_{os.getpid()}_{next(_counter)}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY'))
        url = admin_url.set(database=name).render_as_string(hide_password=False)
    elif backend == "sqlite":
        path = tmp_path / "conveyor.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        url = f"sqlite:///{path}"
    else:
        raise pytest.UsageError(f"unknown backend {backend!r} in CONVEYOR_TEST_BACKENDS")
    db = TestDatabase(backend=backend, url=url, settings=_settings_for(url))
    core_database.configure(db.settings)
    configure_registry(state_registry())
    register_dispatcher(None)
    try:
        yield db
    finally:
        current = core_database.get_database()
        # A connection lent out now belongs to a thread that outlived the test. Disposing
        # would orphan it in the discarded pool, to be garbage-collected open in some later
        # test (a ResourceWarning far from its cause): name the culprit here instead.
        in_use = current.checked_out()
        current.dispose()
        if backend == "postgresql":
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            admin.dispose()
        if in_use:
            pytest.fail(f"{in_use} database connection(s) still checked out when the test ended")
