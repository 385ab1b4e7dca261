"""Engines and sessions: ``get_db``, ``get_db_session`` and ``get_async_db_session``.

Nothing connects at import time: the engines are built on first use from
``get_settings()``, or from the settings given to ``configure()`` (tests, tools).
Sessions keep loaded attributes after commit (``expire_on_commit=False``) so objects
can be returned from a ``with`` block, as the migration guide's examples do.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, QueuePool

from core.config import Settings, get_settings
from core.errors import translate_errors


def sqlite_file(url: URL) -> Path | None:
    """The file a SQLite URL names; None for an in-memory database or a ``uri=true`` URL."""
    database = url.database
    if not database or database == ":memory:" or url.query.get("uri") in ("true", "1"):
        return None  # an URI filename is SQLite's to parse: it is opened as configured
    return Path(database)


def _opened_not_created(url: URL) -> URL:
    """A SQLite file URL as a URI with ``mode=rw``: SQLite opens the file, never creates it.

    A process that reads or writes state before `conveyor migrate` (or from the wrong
    directory, with a relative path) would otherwise get a new empty file and then a
    ``no such table``; now it gets the hint to migrate and leaves nothing behind. Alembic's
    upgrade uses its own engine, so migrating still creates the file. The path is made
    absolute here, once, as SQLite would have resolved it on the first connect.
    """
    path = sqlite_file(url) if url.get_backend_name() == "sqlite" else None
    if path is None:
        return url
    return url.set(
        database=path.resolve().as_uri(), query={**url.query, "uri": "true", "mode": "rw"}
    )


def _engine_options(settings: Settings, url: URL) -> dict[str, Any]:
    options: dict[str, Any] = {"echo": settings.database_echo}
    if settings.database_null_pool:
        options["poolclass"] = NullPool
    else:
        options.update(
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            pool_timeout=settings.database_pool_timeout,
            pool_recycle=settings.database_pool_recycle,
            pool_pre_ping=settings.database_pool_pre_ping,
        )
    if url.get_backend_name() == "postgresql":
        # A dead server must fail fast and be retried, not hang a worker.
        options["connect_args"] = {"connect_timeout": 10}
    return options


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    """WAL, a busy timeout, foreign keys, and BEGIN IMMEDIATE for every transaction.

    pysqlite's own transaction handling begins lazily and upgrades read locks to write
    locks, which fails at once with SQLITE_BUSY under concurrent writers (the busy
    timeout does not cover the upgrade). Taking the write lock at BEGIN makes writers
    queue on the busy timeout instead, and a timeout becomes a retried transient error.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_sync_engine(settings: Settings, *, pre_ping: bool | None = None) -> Engine:
    """A sync engine for ``settings`` (SQLite configured for concurrent writers);
    ``pre_ping`` overrides ``CONVEYOR_DATABASE_POOL_PRE_PING``."""
    url = _opened_not_created(settings.sync_database_url)
    options = _engine_options(settings, url)
    if pre_ping is not None and "pool_pre_ping" in options:
        options["pool_pre_ping"] = pre_ping
    engine = create_engine(url, **options)
    if url.get_backend_name() == "sqlite":
        _configure_sqlite(engine, settings.sqlite_busy_timeout_ms)
    return engine


def create_async_db_engine(settings: Settings) -> AsyncEngine:
    """An async engine for ``settings``: psycopg 3 on PostgreSQL, aiosqlite on SQLite."""
    url = _opened_not_created(settings.async_database_url)
    engine = create_async_engine(url, **_engine_options(settings, url))
    if url.get_backend_name() == "sqlite":
        _configure_sqlite(engine.sync_engine, settings.sqlite_busy_timeout_ms)
    return engine


@dataclass
class Database:
    """The engines and session factories of one database, each built on first use."""

    settings: Settings
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _engine: Engine | None = field(default=None, repr=False)
    _work_engine: Engine | None = field(default=None, repr=False)
    _async_engine: AsyncEngine | None = field(default=None, repr=False)
    _sessions: sessionmaker[Session] | None = field(default=None, repr=False)
    _async_sessions: async_sessionmaker[AsyncSession] | None = field(default=None, repr=False)
    _async_loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    @property
    def engine(self) -> Engine:
        """The sync engine."""
        with self._lock:
            if self._engine is None:
                self._engine = create_sync_engine(self.settings)
            return self._engine

    @property
    def work_engine(self) -> Engine:
        """The sync engine of conveyor's own units of work (``core.transactions``): no
        pre-ping, since a dropped connection fails its transaction, which is re-run
        whole; so the hot path pays no extra round trip per transaction."""
        with self._lock:
            if self._work_engine is None:
                self._work_engine = create_sync_engine(self.settings, pre_ping=False)
            return self._work_engine

    @property
    def async_engine(self) -> AsyncEngine:
        """The async engine (its pooled connections belong to the loop that opened them)."""
        with self._lock:
            if self._async_engine is None:
                self._async_engine = create_async_db_engine(self.settings)
                try:
                    self._async_loop = asyncio.get_running_loop()
                except RuntimeError:
                    self._async_loop = None
            return self._async_engine

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Factory of sync sessions."""
        if self._sessions is None:
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        return self._sessions

    @property
    def async_sessions(self) -> async_sessionmaker[AsyncSession]:
        """Factory of async sessions."""
        if self._async_sessions is None:
            self._async_sessions = async_sessionmaker(self.async_engine, expire_on_commit=False)
        return self._async_sessions

    def checked_out(self) -> int:
        """How many connections this process's pools have lent out right now (0 when every
        unit of work has returned its connection: what must hold before disposing)."""
        pools = [e.pool for e in (self._engine, self._work_engine) if e is not None]
        if self._async_engine is not None:
            pools.append(self._async_engine.sync_engine.pool)
        return sum(pool.checkedout() for pool in pools if isinstance(pool, QueuePool))

    def dispose(self) -> None:
        """Close pooled connections (async ones on their own loop, when it is idle)."""
        if self._engine is not None:
            self._engine.dispose()
        if self._work_engine is not None:
            self._work_engine.dispose()
        if self._async_engine is not None:
            loop = self._async_loop
            if loop is not None and not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(self._async_engine.dispose())
            else:
                # Closing async connections needs their loop; without it, drop the pool
                # and let each connection be closed when it is collected.
                self._async_engine.sync_engine.dispose(close=False)
        self._engine = self._work_engine = self._async_engine = None
        self._sessions = self._async_sessions = None
        self._async_loop = None

    async def dispose_async(self) -> None:
        """Close every pooled connection from inside the running loop."""
        if self._async_engine is not None:
            await self._async_engine.dispose()
        self._async_engine = None
        self._async_sessions = None
        self.dispose()


_current: Database | None = None
_current_lock = threading.Lock()


def get_database() -> Database:
    """The process's Database, built from ``get_settings()`` on first use."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Database(get_settings())
        return _current


@contextmanager
def using(settings: Settings) -> Iterator[Database]:
    """Point every session helper at a Database of ``settings`` for the block, then
    dispose of it and put the process's previous one back as it was (a test kit's
    throwaway database beside whatever the process used)."""
    global _current
    database = Database(settings)
    with _current_lock:
        previous, _current = _current, database
    try:
        yield database
    finally:
        with _current_lock:
            _current = previous
        database.dispose()


def configure(settings: Settings | None = None) -> Database:
    """Point every session helper at ``settings`` (default: re-read the environment)."""
    global _current
    with _current_lock:
        if _current is not None:
            _current.dispose()
        if settings is None:
            get_settings.cache_clear()
            settings = get_settings()
        _current = Database(settings)
        return _current


@contextmanager
def get_db_session(commit: bool = False) -> Iterator[Session]:
    """A sync session: commits on success when ``commit``, rolls back on error, always closes."""
    session = get_database().sessions()
    try:
        with translate_errors():
            yield session
            if commit:
                session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_db() -> Iterator[Session]:
    """FastAPI dependency: one session per request, rolled back on error, then closed."""
    with get_db_session() as session:
        yield session


@asynccontextmanager
async def get_async_db_session(commit: bool = False) -> AsyncIterator[AsyncSession]:
    """An async session with the same discipline as ``get_db_session``."""
    session = get_database().async_sessions()
    try:
        with translate_errors():
            yield session
            if commit:
                await session.commit()
    except BaseException:
        await session.rollback()
        raise
    finally:
        await session.close()
