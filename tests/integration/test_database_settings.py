"""Engines as configured: SQLite's pragmas and write locking, URLs, pool defaults."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from core.config import Settings
from core.database import get_database, get_db_session


@pytest.mark.sqlite_only
def test_sqlite_runs_with_wal_busy_timeout_and_foreign_keys(database: object) -> None:
    with get_db_session() as db:
        assert db.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert db.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
        assert db.execute(text("PRAGMA busy_timeout")).scalar_one() == 5000


def test_urls_are_normalised_to_the_shipped_drivers() -> None:
    settings = Settings(database_url="postgres://u:secret@db:5432/conveyor")
    assert settings.sync_database_url.drivername == "postgresql+psycopg"
    assert settings.async_database_url.drivername == "postgresql+psycopg"
    assert "secret" not in repr(settings)
    lite = Settings(database_url="sqlite:///./state.db")
    assert lite.async_database_url.drivername == "sqlite+aiosqlite"
    with pytest.raises(ValueError, match="unsupported database 'mysql'"):
        Settings(database_url="mysql://u@h/db")


def test_pool_has_the_guides_defaults(database: object) -> None:
    pool = get_database().engine.pool
    assert pool.size() == 5  # type: ignore[attr-defined]
    assert pool._max_overflow == 10  # type: ignore[attr-defined]
    assert pool._timeout == 30  # type: ignore[attr-defined]
    assert pool._recycle == 3600
    assert pool._pre_ping is True
    # conveyor's own transactions never ping: a dropped connection re-runs them whole.
    assert get_database().work_engine.pool._pre_ping is False
