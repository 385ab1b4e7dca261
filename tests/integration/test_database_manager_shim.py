"""The deprecated ``core.database_manager`` shim: the guide's "Before" code still runs.

Every call warns (DeprecationWarning, attributed to the caller's line) and writes the
same rows as the guide's "After" code; ``execute``/``fetch_all`` bind their values.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from core.database import get_database, get_db_session
from core.database_manager import DatabaseManager, db_manager, get_db_session_for_request
from core.errors import AlreadyExists, InputValidationError, InvalidTransition
from core.models import Base, ExecutionEvent, User, UserSession, WorkflowExecution
from tests.conftest import TestDatabase
from tests.integration import test_seed_guide as after  # the guide's "After" code

# --- the guide's "Before" code ----------------------------------------------------


async def create_workflow_execution(workflow_id: str, input_data: dict[str, Any]) -> Any:
    execution = await db_manager.create_workflow_execution(
        workflow_id=workflow_id, input_data=input_data, status="pending"
    )
    return execution


async def get_workflow_execution(execution_id: str) -> Any:
    execution = await db_manager.get_workflow_execution(execution_id)
    return execution


async def update_execution_status(execution_id: str, status: str) -> None:
    # Old pattern using raw SQL
    await db_manager.execute(
        "UPDATE workflow_executions SET status = ? WHERE execution_id = ?", (status, execution_id)
    )


async def get_user_with_sessions(user_id: str) -> list[dict[str, Any]]:
    # Raw SQL query
    rows = await db_manager.fetch_all(
        """
        SELECT u.*, s.*
        FROM users u
        LEFT JOIN user_sessions s ON u.id = s.user_id
        WHERE u.id = ?
        """,
        (user_id,),
    )
    return rows


class ExecutionStateManager:
    def __init__(self) -> None:
        self.db = DatabaseManager()

    async def create_execution(self, workflow_id: str, input_data: dict[str, Any]) -> Any:
        return await self.db.create_workflow_execution(
            workflow_id=workflow_id, input_data=input_data
        )


async def create_user(email: str, name: str) -> dict[str, Any]:
    user = await db_manager.create_user(email, name)
    return user


# Pattern 4 "Before": the guide leaves db_manager, Session and router to the reader.
@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield
    # The route's async connections belong to this app's loop: close them in it.
    await get_database().async_engine.dispose()


app = FastAPI(lifespan=lifespan)


@app.post("/users")
async def create_user_route(
    email: str,
    name: str,
    db: Session = Depends(get_db_session_for_request),  # noqa: B008 - the guide's form
):
    new_user = await db_manager.create_user(email, name)
    return new_user


# --- helpers -------------------------------------------------------------------------


GENERATED = {"id", "execution_id", "created_at", "updated_at"}


def columns(obj: Base, skip: set[str] = GENERATED) -> dict[str, Any]:
    """An ORM object's column values, without the ones the database generates."""
    mapper = inspect(type(obj))
    return {c.key: getattr(obj, c.key) for c in mapper.column_attrs if c.key not in skip}


def stored_execution(execution_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An execution's row and its events' rows, read in a new session."""
    with get_db_session() as db:
        execution = db.get(WorkflowExecution, execution_id)
        assert execution is not None
        events = db.scalars(
            select(ExecutionEvent)
            .where(ExecutionEvent.execution_id == execution_id)
            .order_by(ExecutionEvent.id)
        ).all()
        return columns(execution), [columns(e) for e in events]


def stored_user(email: str) -> dict[str, Any]:
    with get_db_session() as db:
        user = db.scalars(select(User).where(User.email == email)).one()
        return columns(user, GENERATED | {"email"})


def count_users() -> int:
    with get_db_session() as db:
        return db.scalar(select(func.count()).select_from(User)) or 0


def seed_user(email: str, session_names: list[str]) -> str:
    with get_db_session(commit=True) as db:
        user = User(email=email, first_name="Seed")
        user.sessions = [UserSession(name=name) for name in session_names]
        db.add(user)
        db.flush()
        return user.id


def warned_here(record: pytest.WarningsRecorder, replacement: str) -> None:
    """Every warning recorded is a DeprecationWarning naming ``replacement``, raised here."""
    assert record.list
    for warning in record.list:
        assert issubclass(warning.category, DeprecationWarning)
        assert replacement in str(warning.message)
        assert warning.filename == __file__


# --- every "Before" call works and warns ---------------------------------------------


@pytest.mark.asyncio
async def test_pattern1_before_writes_what_after_writes(database: TestDatabase) -> None:
    with pytest.deprecated_call() as record:
        before = await create_workflow_execution("invoice", {"customer": 42})
    warned_here(record, "WorkflowExecution added in core.database.get_async_db_session()")
    now = await after.create_workflow_execution("invoice", {"customer": 42})

    assert type(before) is WorkflowExecution
    assert columns(before) == columns(now)
    assert stored_execution(before.execution_id) == stored_execution(now.execution_id)
    row, events = stored_execution(before.execution_id)
    assert (row["workflow_id"], row["input_data"], row["status"]) == (
        "invoice",
        {"customer": 42},
        "pending",
    )
    assert [(e["from_status"], e["to_status"]) for e in events] == [(None, "pending")]


@pytest.mark.asyncio
async def test_create_workflow_execution_refuses_a_non_initial_status(
    database: TestDatabase,
) -> None:
    with pytest.deprecated_call(), pytest.raises(InvalidTransition, match="running"):
        await db_manager.create_workflow_execution(
            workflow_id="wf", input_data={}, status="running"
        )

    with get_db_session() as db:
        assert db.scalar(select(func.count()).select_from(WorkflowExecution)) == 0


@pytest.mark.asyncio
async def test_pattern2_before_reads_what_after_reads(database: TestDatabase) -> None:
    created = await after.create_workflow_execution("invoice", {"customer": 7})

    with pytest.deprecated_call() as record:
        before = await get_workflow_execution(created.execution_id)
        missing = await get_workflow_execution("no-such-id")
    warned_here(record, "select(core.models.WorkflowExecution)")
    now = await after.get_workflow_execution(created.execution_id)

    assert before is not None
    assert columns(before, set()) == columns(now, set())
    assert missing is None


@pytest.mark.asyncio
async def test_pattern3_before_update_changes_the_row(database: TestDatabase) -> None:
    created = await after.create_workflow_execution("invoice", {"customer": 7})
    other = await after.create_workflow_execution("invoice", {"customer": 8})

    with pytest.deprecated_call() as record:
        await update_execution_status(created.execution_id, "running")
    warned_here(record, "update()/insert()")

    assert stored_execution(created.execution_id)[0]["status"] == "running"
    assert stored_execution(other.execution_id)[0]["status"] == "pending"


@pytest.mark.asyncio
async def test_execute_returns_the_rowcount(database: TestDatabase) -> None:
    seed_user("a@example.com", [])
    seed_user("b@example.com", [])

    with pytest.deprecated_call():
        changed = await db_manager.execute(
            "UPDATE users SET role = ? WHERE role = ?", ("admin", "member")
        )
        unchanged = await db_manager.execute(
            "UPDATE users SET role = ? WHERE id = ?", ("x", "none")
        )

    assert (changed, unchanged) == (2, 0)


def test_pattern4_before_route_writes_what_after_route_writes(database: TestDatabase) -> None:
    with pytest.deprecated_call() as record, TestClient(app) as client:
        response = client.post("/users", params={"email": "old@example.com", "name": "Ann"})
    with TestClient(after.make_app()) as client:
        now = client.post("/users", params={"email": "new@example.com", "name": "Ann"})

    assert response.status_code == 200
    body = response.json()
    assert body == {
        "id": body["id"],
        "email": "old@example.com",
        "name": "Ann",
        "first_name": "Ann",
        "last_name": None,
    }
    assert now.status_code == 200
    assert stored_user("old@example.com") == stored_user("new@example.com")
    messages = {str(w.message) for w in record.list}
    assert any("use core.database.get_db " in m for m in messages), messages
    assert any("DatabaseManager.create_user" in m for m in messages), messages


def test_get_db_session_for_request_is_get_db(database: TestDatabase) -> None:
    dependency = get_db_session_for_request()
    with pytest.deprecated_call() as record:
        db = next(dependency)
    warned_here(record, "core.database.get_db")
    assert isinstance(db, Session)

    db.add(User(email="gone@example.com"))
    db.flush()
    with pytest.raises(RuntimeError):
        dependency.throw(RuntimeError("request failed"))

    assert count_users() == 0


@pytest.mark.asyncio
async def test_pattern5_before_left_join_returns_the_joined_rows(
    database: TestDatabase,
) -> None:
    user_id = seed_user("cy@example.com", ["laptop", "phone"])
    lonely_id = seed_user("lonely@example.com", [])

    with pytest.deprecated_call() as record:
        rows = await get_user_with_sessions(user_id)
        lonely = await get_user_with_sessions(lonely_id)
    warned_here(record, "select() on core.models")

    # Repeated names (id, created_at, ...) keep the first table's value, as sqlite3.Row did.
    assert sorted((r["id"], r["email"], r["user_id"], r["name"]) for r in rows) == [
        (user_id, "cy@example.com", user_id, "laptop"),
        (user_id, "cy@example.com", user_id, "phone"),
    ]
    assert [(r["id"], r["email"], r["user_id"], r["name"]) for r in lonely] == [
        (lonely_id, "lonely@example.com", None, None)
    ]
    assert all(isinstance(r, dict) for r in rows + lonely)


@pytest.mark.asyncio
async def test_example1_before_state_manager(database: TestDatabase) -> None:
    with pytest.deprecated_call() as record:
        manager = ExecutionStateManager()
        before = await manager.create_execution("report", {"month": "2026-02"})
    warned_here(record, "core.database")
    now_id = await after.ExecutionStateManager().create_execution("report", {"month": "2026-02"})

    # "Before" returned the execution, "After" returns its id; the rows are the same.
    assert isinstance(before, WorkflowExecution)
    assert stored_execution(before.execution_id) == stored_execution(now_id)


def test_database_manager_instantiation_warns(database: TestDatabase) -> None:
    with pytest.warns(DeprecationWarning, match=r"DatabaseManager\(\) is deprecated") as record:
        DatabaseManager()
    warned_here(record, "core.database.get_async_db_session()")


@pytest.mark.asyncio
async def test_example2_before_returns_what_after_returns(database: TestDatabase) -> None:
    with pytest.deprecated_call() as record:
        before = await create_user("old@example.com", "Fay")
    warned_here(record, "core.models.User")
    now = await after.create_user("new@example.com", "Fay")

    skip = {"id", "email"}
    assert before.keys() == now.keys()
    assert {k: v for k, v in before.items() if k not in skip} == {
        k: v for k, v in now.items() if k not in skip
    }
    assert before["email"] == "old@example.com"
    assert stored_user("old@example.com") == stored_user("new@example.com")


@pytest.mark.asyncio
async def test_example2_before_refuses_a_duplicate_email(database: TestDatabase) -> None:
    with pytest.deprecated_call():
        await create_user("fay@example.com", "Fay")
        with pytest.raises(AlreadyExists, match=r"User with email fay@example\.com already exists"):
            await create_user("fay@example.com", "Someone else")

    assert count_users() == 1
    assert stored_user("fay@example.com")["first_name"] == "Fay"


@pytest.mark.asyncio
async def test_create_user_names_the_email_when_the_constraint_catches_it(
    database: TestDatabase,
) -> None:
    seed_user("fay@example.com", [])

    # The check by equal email misses " fay@example.com ", which the model strips to the
    # stored one: the unique constraint refuses it, as it would a concurrent insert.
    with (
        pytest.deprecated_call(),
        pytest.raises(AlreadyExists, match=r"User with email  fay@example\.com  already") as info,
    ):
        await db_manager.create_user(" fay@example.com ", "Fay")

    assert isinstance(info.value.__cause__, AlreadyExists)
    assert count_users() == 1


# --- raw SQL pass-through: values are bound, never interpolated ---------------------

EVIL = "x'; DROP TABLE users; --"


@pytest.mark.asyncio
async def test_execute_stores_sql_in_a_value_literally(database: TestDatabase) -> None:
    seed_user("a@example.com", [])

    with pytest.deprecated_call():
        await db_manager.execute(
            "UPDATE users SET first_name = ? WHERE email = ?", (EVIL, "a@example.com")
        )
        rows = await db_manager.fetch_all(
            "SELECT first_name FROM users WHERE email = ?", ("a@example.com",)
        )
        none = await db_manager.fetch_all("SELECT id FROM users WHERE email = ?", ("' OR '1'='1",))

    assert rows == [{"first_name": EVIL}]
    assert none == []
    assert count_users() == 1


@pytest.mark.asyncio
async def test_question_marks_in_literals_and_comments_are_not_placeholders(
    database: TestDatabase,
) -> None:
    seed_user("a@example.com", [])

    with pytest.deprecated_call():
        rows = await db_manager.fetch_all(
            "SELECT email, 'what?' AS q, 'it''s ?' AS r -- really?\n"
            "FROM users /* who? */ WHERE email = ? AND \"role\" <> '?'",
            ("a@example.com",),
        )

    assert rows == [{"email": "a@example.com", "q": "what?", "r": "it's ?"}]


@pytest.mark.asyncio
async def test_colons_in_the_sql_are_not_bind_parameters(database: TestDatabase) -> None:
    seed_user("a@example.com", [])

    with pytest.deprecated_call():
        rows = await db_manager.fetch_all(
            "SELECT 'at 10:30 :tag' AS note FROM users WHERE email = ?", ("a@example.com",)
        )

    assert rows == [{"note": "at 10:30 :tag"}]


@pytest.mark.postgresql_only
@pytest.mark.asyncio
async def test_placeholder_next_to_a_cast(database: TestDatabase) -> None:
    with pytest.deprecated_call():
        rows = await db_manager.fetch_all("SELECT ?::integer + 1 AS n", ("41",))

    assert rows == [{"n": 42}]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("sql", "params", "message"),
    [
        ("UPDATE users SET role = ? WHERE id = ?", ("admin",), r"has 2 \? placeholder"),
        ("UPDATE users SET role = ?", ("admin", "extra"), r"but 2 parameter"),
        ("UPDATE users SET role = 'admin?'", ("admin",), r"has 0 \? placeholder"),
        ("UPDATE users SET role = ? WHERE id = ?", "ab", "tuple or list"),
    ],
)
async def test_wrong_params_are_refused_before_running(
    database: TestDatabase, sql: str, params: Any, message: str
) -> None:
    seed_user("a@example.com", [])

    with pytest.deprecated_call(), pytest.raises(InputValidationError, match=message):
        await db_manager.execute(sql, params)
    with pytest.deprecated_call(), pytest.raises(InputValidationError, match=message):
        await db_manager.fetch_all(sql, params)

    assert stored_user("a@example.com")["role"] == "member"


def test_importing_the_shim_does_not_warn() -> None:
    # Only calls warn: a module that merely imports the shim must not fail under -W error.
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import core.database_manager"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
