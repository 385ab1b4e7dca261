"""Dialect hooks for the few SQL pieces that differ between PostgreSQL and SQLite.

Timestamps that statements write come from the database's clock, not the writer's:
with many workers on many machines, stall detection and deadlines must compare
times taken from one clock.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from core.types import UTCDateTime


class utcnow(FunctionElement[Any]):
    """The database's current UTC time, optionally shifted by ``offset_seconds``."""

    type = UTCDateTime()
    inherit_cache = True
    name = "utcnow"

    def __init__(self, offset_seconds: float | ColumnElement[Any] | None = None) -> None:
        if offset_seconds is None:
            super().__init__()
        elif isinstance(offset_seconds, ColumnElement):
            super().__init__(offset_seconds)
        else:
            super().__init__(literal(float(offset_seconds), Float()))


@compiles(utcnow, "postgresql")
def _utcnow_postgresql(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    if not element.clauses.clauses:
        return "statement_timestamp()"
    offset = compiler.process(element.clauses, **kw)
    return f"(statement_timestamp() + make_interval(secs => {offset}))"


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    # Six fractional digits, like SQLAlchemy's own SQLite DATETIME strings, so that the
    # stored text sorts and compares the same whoever wrote it.
    if not element.clauses.clauses:
        return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"
    offset = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', ({offset}) || ' seconds') || '000')"


class clock_now(utcnow):
    """The database's clock as it reads when evaluated (PostgreSQL ``clock_timestamp()``),
    optionally shifted by ``offset_seconds``; not the statement's start like ``utcnow``.

    For a write that may wait on a lock: its time is when it wrote, not when it asked.
    """

    inherit_cache = True
    name = "clock_now"


@compiles(clock_now, "postgresql")
def _clock_now_postgresql(element: clock_now, compiler: SQLCompiler, **kw: Any) -> str:
    if not element.clauses.clauses:
        return "clock_timestamp()"
    offset = compiler.process(element.clauses, **kw)
    return f"(clock_timestamp() + make_interval(secs => {offset}))"


@compiles(clock_now, "sqlite")
def _clock_now_sqlite(element: clock_now, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite's 'now' is that of the statement; its writes are serial, so nothing waits.
    return _utcnow_sqlite(element, compiler, **kw)
