"""The check each command that reads or writes state runs first: is the schema at head?

One cheap look before the command touches a table: Alembic's recorded revision against
the head this installation ships. It answers the same way on PostgreSQL and SQLite, and
also catches a database that is behind (migrated by an older conveyor), which
translating the driver's undefined-table error could not. It never creates a database:
a SQLite file that does not exist is reported, not made.
"""

from __future__ import annotations

import functools

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from core.config import Settings
from core.database import sqlite_file
from core.errors import MIGRATE, SchemaNotMigrated, SchemaTooNew
from migrations import alembic_config

__all__ = ["SchemaNotMigrated", "SchemaTooNew", "head_revision", "require_migrated"]

CONNECT_TIMEOUT = 10


@functools.cache
def _scripts() -> ScriptDirectory:
    """This installation's migrations (read once per process)."""
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str | None:
    """The newest revision this installation's migrations know."""
    return _scripts().get_current_head()


def _known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:  # alembic's "can't locate revision"
        return False


def _check_engine(url: URL) -> Engine:
    """A pool-less engine for the one look; read-only on SQLite."""
    if url.get_backend_name() == "postgresql":
        return create_engine(
            url, poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT}
        )
    path = sqlite_file(url)
    if path is None:
        return create_engine(url, poolclass=NullPool)
    # mode=ro rather than the process's engine: SQLite itself then refuses to create the
    # file (should it vanish after the existence check) or to write to it, whereas the
    # process's engine switches a new file to WAL and begins every transaction with
    # BEGIN IMMEDIATE, both writes. as_uri() escapes what a URI filename cannot hold.
    readonly = URL.create(
        "sqlite", database=path.resolve().as_uri(), query={"uri": "true", "mode": "ro"}
    )
    return create_engine(readonly, poolclass=NullPool)


def require_migrated(settings: Settings) -> None:
    """Raise SchemaNotMigrated unless the database's schema is at this conveyor's head."""
    url = settings.sync_database_url
    path = sqlite_file(url) if url.get_backend_name() == "sqlite" else None
    if path is not None and not path.exists():
        # The path is not printed: like the URL it comes from, it stays out of output.
        raise SchemaNotMigrated(
            "the database has no conveyor tables (its SQLite file does not exist: check "
            f"CONVEYOR_DATABASE_URL and the current directory): {MIGRATE}"
        )
    engine = _check_engine(url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaNotMigrated(f"the database has no conveyor tables: {MIGRATE}")
    if not _known(current):
        raise SchemaTooNew(
            f"the database is at revision {current}, which this conveyor does not know "
            f"(its newest is {head}): a newer conveyor migrated it; upgrade this one"
        )
    raise SchemaNotMigrated(
        f"the database schema is behind (revision {current}; this conveyor needs {head}): {MIGRATE}"
    )
