"""Deprecated: the old ``database_manager`` API as a thin shim over ``core.database``.

It exists so that code can migrate one module at a time (see the database migration
guide). Every public call emits a DeprecationWarning naming its replacement; every
operation runs in a ``core.database`` session on the ORM models, except ``execute`` and
``fetch_all``, which pass the caller's SQL through with its values bound, never
interpolated. New code must not import this module (ruff bans it, TID251).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import TextClause, select, text
from sqlalchemy.orm import Session

from core.database import get_async_db_session, get_db
from core.errors import AlreadyExists, InputValidationError
from core.models import User, WorkflowExecution

__all__ = ["DatabaseManager", "db_manager", "get_db_session_for_request"]

_GUIDE = "see the database migration guide"

# What text() takes for a named bind parameter (SQLAlchemy's own pattern): colons in
# the caller's SQL that match it are escaped, so only our placeholders become binds.
_TEXT_BIND = re.compile(r"(?<![:\w\x5c]):(\w+)(?![:\w])")
# Characters next to which a rendered ``:pN`` would not be read as a bind parameter.
_GLUED_BEFORE = re.compile(r"[:\w\x5c]")
_GLUED_AFTER = re.compile(r"[:\w]")


def _deprecated(name: str, replacement: str) -> None:
    # stacklevel 3: past this helper and the deprecated function, to the caller's line.
    warnings.warn(
        f"core.database_manager.{name} is deprecated; use {replacement} ({_GUIDE})",
        DeprecationWarning,
        stacklevel=3,
    )


def _qmark_positions(sql: str) -> list[int]:
    """Offsets of the ``?`` placeholders in ``sql``, outside quotes and comments."""
    positions: list[int] = []
    i, end = 0, len(sql)
    while i < end:
        char = sql[i]
        if char in "'\"":
            # A quote doubled inside a literal or identifier escapes itself.
            close = sql.find(char, i + 1)
            while close != -1 and sql.startswith(char, close + 1):
                close = sql.find(char, close + 2)
            i = end if close == -1 else close + 1
        elif sql.startswith("--", i):
            newline = sql.find("\n", i)
            i = end if newline == -1 else newline + 1
        elif sql.startswith("/*", i):
            close = sql.find("*/", i + 2)
            i = end if close == -1 else close + 2
        else:
            if char == "?":
                positions.append(i)
            i += 1
    return positions


def _bind_qmarks(sql: str, params: Sequence[Any]) -> tuple[TextClause, dict[str, Any]]:
    """``sql`` with qmark placeholders as a ``text()`` statement and its bound values."""
    if isinstance(params, str | bytes) or not isinstance(params, Sequence):
        raise InputValidationError(
            f"params must be a tuple or list of values, not {type(params).__name__}"
        )
    escaped = _TEXT_BIND.sub(r"\\:\1", sql)
    positions = _qmark_positions(escaped)
    if len(positions) != len(params):
        raise InputValidationError(
            f"the SQL has {len(positions)} ? placeholder(s) but {len(params)} "
            f"parameter(s) were given"
        )
    pieces: list[str] = []
    values: dict[str, Any] = {}
    start = 0
    for number, (position, value) in enumerate(zip(positions, params, strict=True), 1):
        name = f"p{number}"
        values[name] = value
        before = " " if position and _GLUED_BEFORE.match(escaped, position - 1) else ""
        after = " " if _GLUED_AFTER.match(escaped, position + 1) else ""
        pieces += [escaped[start:position], f"{before}:{name}{after}"]
        start = position + 1
    pieces.append(escaped[start:])
    return text("".join(pieces)), values


class DatabaseManager:
    """Deprecated: use ``core.database`` sessions with the ``core.models`` models."""

    def __init__(self) -> None:
        """Deprecated: no manager is needed; open a ``core.database`` session instead."""
        _deprecated("DatabaseManager()", "core.database.get_async_db_session()")

    async def create_workflow_execution(
        self, workflow_id: str, input_data: Any = None, status: str = "pending"
    ) -> WorkflowExecution:
        """Deprecated: add a ``WorkflowExecution`` in ``get_async_db_session()``."""
        _deprecated(
            "DatabaseManager.create_workflow_execution",
            "core.models.WorkflowExecution added in core.database.get_async_db_session()",
        )
        async with get_async_db_session() as db:
            execution = WorkflowExecution(
                workflow_id=workflow_id, input_data=input_data, status=status
            )
            db.add(execution)
            await db.commit()
            await db.refresh(execution)
            return execution

    async def get_workflow_execution(self, execution_id: str) -> WorkflowExecution | None:
        """Deprecated: ``select(WorkflowExecution)`` in ``get_async_db_session()``."""
        _deprecated(
            "DatabaseManager.get_workflow_execution",
            "select(core.models.WorkflowExecution) in core.database.get_async_db_session()",
        )
        async with get_async_db_session() as db:
            result = await db.execute(
                select(WorkflowExecution).where(WorkflowExecution.execution_id == execution_id)
            )
            return result.scalar_one_or_none()

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Deprecated: run one statement with qmark (``?``) values, commit, return its rowcount."""
        _deprecated(
            "DatabaseManager.execute",
            "update()/insert() on core.models in core.database.get_async_db_session()",
        )
        statement, values = _bind_qmarks(sql, params)
        async with get_async_db_session(commit=True) as db:
            connection = await db.connection()
            result = await connection.execute(statement, values)
            return result.rowcount

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Deprecated: run a query with qmark (``?``) values and return its rows as dicts.

        A column name that repeats (``SELECT u.*, s.*``) keeps its first value, as
        ``dict(sqlite3.Row)`` did; alias the columns to get both.
        """
        _deprecated(
            "DatabaseManager.fetch_all",
            "select() on core.models in core.database.get_async_db_session()",
        )
        statement, values = _bind_qmarks(sql, params)
        async with get_async_db_session() as db:
            connection = await db.connection()
            result = await connection.execute(statement, values)
            names = list(result.keys())
            rows: list[dict[str, Any]] = []
            for row in result:
                record: dict[str, Any] = {}
                for name, value in zip(names, row, strict=True):
                    record.setdefault(name, value)
                rows.append(record)
            return rows

    async def create_user(self, email: str, name: str) -> dict[str, str | None]:
        """Deprecated: add a ``core.models.User``; AlreadyExists if the email is taken."""
        _deprecated(
            "DatabaseManager.create_user",
            "core.models.User added in core.database.get_async_db_session()",
        )
        taken = AlreadyExists(f"User with email {email} already exists")
        try:
            async with get_async_db_session() as db:
                existing = await db.execute(select(User.id).where(User.email == email))
                if existing.first() is not None:
                    raise taken
                user = User(email=email, first_name=name, status="active", role="member")
                db.add(user)
                await db.commit()
                await db.refresh(user)
        except AlreadyExists as error:
            if error is taken:
                raise
            # A concurrent insert won the race between the check and the commit; the
            # unique constraint caught it, and the caller still gets the email named.
            raise taken from error
        return {
            "id": user.id,
            "email": user.email,
            "name": name,
            "first_name": user.first_name,
            "last_name": user.last_name,
        }


# Built without __init__ so that importing the shim does not warn; each call does.
db_manager: DatabaseManager = object.__new__(DatabaseManager)


def get_db_session_for_request() -> Iterator[Session]:
    """Deprecated FastAPI dependency: use ``core.database.get_db``, which this runs."""
    # Runs when the framework (or next()) first advances the generator: stacklevel 2
    # names that frame, since ``Depends(...)`` itself is not a call.
    warnings.warn(
        f"core.database_manager.get_db_session_for_request is deprecated; "
        f"use core.database.get_db ({_GUIDE})",
        DeprecationWarning,
        stacklevel=2,
    )
    yield from get_db()
