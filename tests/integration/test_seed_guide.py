"""The migration guide's "After" examples, run as written on both backends.

The guide (``seed/database-migration-guide.md``) is the user's contract: each function
below is its example, changed only where the guide is pseudo-code (names it leaves
undefined, a ``router`` it never builds, tests that need the ``database`` fixture).
Results are read back in a new session, so a test proves what was committed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, func, select, update
from sqlalchemy.orm import Session, selectinload

from core.database import get_async_db_session, get_database, get_db, get_db_session
from core.errors import AlreadyExists, InputValidationError, InvalidStatus, InvalidTransition
from core.models import ExecutionEvent, User, UserSession, WorkflowExecution
from tests.conftest import TestDatabase

# --- Pattern 1: async create ---------------------------------------------------------


async def create_workflow_execution(workflow_id: str, input_data: dict[str, Any]) -> Any:
    async with get_async_db_session() as db:
        execution = WorkflowExecution(
            workflow_id=workflow_id, input_data=input_data, status="pending"
        )
        db.add(execution)
        await db.commit()
        await db.refresh(execution)
        return execution


# --- Pattern 2: query ----------------------------------------------------------------


async def get_workflow_execution(execution_id: str) -> Any:
    async with get_async_db_session() as db:
        result = await db.execute(
            select(WorkflowExecution).where(WorkflowExecution.execution_id == execution_id)
        )
        execution = result.scalar_one_or_none()
        return execution


# --- Pattern 3: update (Method 1, and the commented Method 2) -------------------------


async def update_execution_status(execution_id: str, status: str) -> None:
    async with get_async_db_session() as db:
        # Method 1: Load, modify, commit
        result = await db.execute(
            select(WorkflowExecution).where(WorkflowExecution.execution_id == execution_id)
        )
        execution = result.scalar_one_or_none()

        if execution:
            execution.status = status
            await db.commit()


async def update_execution_status_bulk(execution_id: str, status: str) -> None:
    async with get_async_db_session() as db:
        # Method 2: Bulk update (more efficient)
        await db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == execution_id)
            .values(status=status)
        )
        await db.commit()


# --- Pattern 4 and "Sync Session": FastAPI routes on get_db --------------------------

# The guide's snippets use a ``router`` they never define; this is that router.
router = APIRouter()


@router.post("/users")
async def create_user_route(
    email: str,
    name: str,
    db: Session = Depends(get_db),  # noqa: B008 - the guide's (and FastAPI's classic) form
):
    new_user = User(email=email, first_name=name, status="active", role="member")
    db.add(new_user)
    db.commit()
    db.refresh(new_user)
    return new_user


@router.get("/users/{user_id}")
async def get_user(user_id: str, db: Session = Depends(get_db)):  # noqa: B008
    # Use synchronous database operations
    user = db.query(User).filter(User.id == user_id).first()
    return user


@router.post("/users-then-fail")
async def create_user_then_fail(email: str, db: Session = Depends(get_db)):  # noqa: B008
    """Writes a user, then fails: get_db must roll the write back."""
    db.add(User(email=email))
    db.flush()
    raise RuntimeError("the route failed after writing")


def make_app() -> FastAPI:
    app = FastAPI()
    app.include_router(router)
    return app


# --- Pattern 5: eager loading and joins ----------------------------------------------


async def get_user_with_sessions(user_id: str) -> Any:
    async with get_async_db_session() as db:
        # Method 1: Using selectinload (eager loading)
        result = await db.execute(
            select(User).options(selectinload(User.sessions)).where(User.id == user_id)
        )
        user = result.scalar_one_or_none()
        return user


async def get_user_with_sessions_joined(user_id: str) -> Any:
    async with get_async_db_session() as db:
        # Method 2: Using join
        result = await db.execute(
            select(User, UserSession)
            .join(UserSession, User.id == UserSession.user_id)
            .where(User.id == user_id)
        )
        rows = result.all()
        return rows


# --- Session patterns ----------------------------------------------------------------


async def my_async_function(user_id: str) -> Any:
    # The guide leaves user_id undefined; it is a parameter here.
    async with get_async_db_session() as db:
        result = await db.execute(select(User).where(User.id == user_id))
        user = result.scalar_one_or_none()
        return user


def my_function() -> None:
    with get_db_session(commit=True) as db:
        # Automatically commits on success
        user = User(email="test@example.com")
        db.add(user)
        # Commit happens automatically


# --- Example 1: the guide's ExecutionStateManager (a local stand-in, not core's) ------


class ExecutionStateManager:
    # No database manager needed

    async def create_execution(self, workflow_id: str, input_data: dict[str, Any]) -> str:
        async with get_async_db_session() as db:
            execution = WorkflowExecution(
                workflow_id=workflow_id, input_data=input_data, status="pending"
            )
            db.add(execution)
            await db.commit()
            await db.refresh(execution)
            return execution.execution_id


# --- Example 2: user creation --------------------------------------------------------


async def create_user(email: str, name: str) -> dict[str, Any]:
    async with get_async_db_session() as db:
        # Check if user exists
        result = await db.execute(select(User).where(User.email == email))
        existing = result.scalar_one_or_none()

        if existing:
            raise ValueError(f"User with email {email} already exists")

        # Create new user
        user = User(email=email, first_name=name, status="active", role="member")
        db.add(user)
        await db.commit()
        await db.refresh(user)

        return {
            "id": user.id,
            "email": user.email,
            "name": name,
            "first_name": user.first_name,
            "last_name": user.last_name,
        }


# --- helpers -------------------------------------------------------------------------


def seed_user(email: str, session_names: list[str]) -> str:
    """A committed user with one session per name; returns the user's id."""
    with get_db_session(commit=True) as db:
        user = User(email=email, first_name=email.split("@")[0])
        user.sessions = [UserSession(name=name) for name in session_names]
        db.add(user)
        db.flush()
        return user.id


def seed_execution(status: str = "pending") -> str:
    """A committed execution walked through the ORM to ``status``; returns its id."""
    path = {"pending": [], "running": ["running"], "succeeded": ["running", "succeeded"]}
    with get_db_session(commit=True) as db:
        execution = WorkflowExecution(workflow_id="wf", input_data={"n": 1})
        db.add(execution)
        db.flush()
        for step in path[status]:
            execution.status = step
            db.flush()
        return execution.execution_id


def read_execution(execution_id: str) -> WorkflowExecution | None:
    with get_db_session() as db:
        return db.get(WorkflowExecution, execution_id)


def read_events(execution_id: str) -> list[tuple[str | None, str, str | None]]:
    with get_db_session() as db:
        events = db.scalars(
            select(ExecutionEvent)
            .where(ExecutionEvent.execution_id == execution_id)
            .order_by(ExecutionEvent.id)
        )
        return [(e.from_status, e.to_status, e.reason) for e in events]


def count_users() -> int:
    with get_db_session() as db:
        return db.scalar(select(func.count()).select_from(User)) or 0


@contextmanager
def recorded_selects(engine: Engine) -> Iterator[list[str]]:
    """The SELECT statements run on ``engine`` inside the block."""
    statements: list[str] = []

    def record(*args: Any) -> None:
        statement: str = args[2]
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


# --- Pattern 1 -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pattern1_creates_a_pending_execution(database: TestDatabase) -> None:
    execution = await create_workflow_execution("invoice", {"customer": 42, "lines": [1, 2]})

    assert execution.status == "pending"
    assert execution.created_at.tzinfo is not None
    stored = read_execution(execution.execution_id)
    assert stored is not None
    assert (stored.workflow_id, stored.input_data, stored.status) == (
        "invoice",
        {"customer": 42, "lines": [1, 2]},
        "pending",
    )
    assert stored.created_at == execution.created_at
    assert read_events(execution.execution_id) == [(None, "pending", "created")]


@pytest.mark.asyncio
async def test_pattern1_refuses_non_json_input_and_writes_nothing(
    database: TestDatabase,
) -> None:
    with pytest.raises(InputValidationError, match="input_data"):
        await create_workflow_execution("invoice", {"when": datetime.now(UTC)})

    with get_db_session() as db:
        assert db.scalar(select(func.count()).select_from(WorkflowExecution)) == 0


# --- Pattern 2 -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pattern2_reads_an_execution_by_id(database: TestDatabase) -> None:
    execution_id = seed_execution()

    found = await get_workflow_execution(execution_id)

    assert found is not None
    assert (found.execution_id, found.workflow_id, found.input_data, found.status) == (
        execution_id,
        "wf",
        {"n": 1},
        "pending",
    )
    assert await get_workflow_execution("no-such-id") is None


# --- Pattern 3 -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pattern3_load_modify_commit_records_the_transition(
    database: TestDatabase,
) -> None:
    execution_id = seed_execution()

    await update_execution_status(execution_id, "running")

    stored = read_execution(execution_id)
    assert stored is not None
    assert (stored.status, stored.previous_status) == ("running", "pending")
    assert read_events(execution_id) == [
        (None, "pending", "created"),
        ("pending", "running", "updated through the ORM"),
    ]


@pytest.mark.asyncio
async def test_pattern3_unknown_id_changes_nothing(database: TestDatabase) -> None:
    execution_id = seed_execution()

    await update_execution_status("no-such-id", "running")

    stored = read_execution(execution_id)
    assert stored is not None
    assert stored.status == "pending"


@pytest.mark.asyncio
async def test_pattern3_refuses_an_illegal_transition(database: TestDatabase) -> None:
    execution_id = seed_execution("succeeded")

    with pytest.raises(InvalidTransition, match="succeeded -> pending"):
        await update_execution_status(execution_id, "pending")

    stored = read_execution(execution_id)
    assert stored is not None
    assert stored.status == "succeeded"
    assert [to for _, to, _ in read_events(execution_id)] == ["pending", "running", "succeeded"]


@pytest.mark.asyncio
async def test_pattern3_refuses_an_unknown_status(database: TestDatabase) -> None:
    execution_id = seed_execution()

    with pytest.raises(InvalidStatus, match="'finished'"):
        await update_execution_status(execution_id, "finished")

    stored = read_execution(execution_id)
    assert stored is not None
    assert stored.status == "pending"


def test_orm_status_assignment_is_checked_at_once(database: TestDatabase) -> None:
    with get_db_session() as db:
        execution = WorkflowExecution(workflow_id="wf", status="pending")
        execution.status = "running"
        execution.status = "succeeded"
        with pytest.raises(InvalidTransition):
            execution.status = "pending"
        with pytest.raises(InvalidStatus):
            execution.status = "done"
        assert execution.status == "succeeded"
        db.rollback()


@pytest.mark.asyncio
async def test_pattern3_bulk_update_changes_the_status(database: TestDatabase) -> None:
    execution_id = seed_execution()

    await update_execution_status_bulk(execution_id, "running")

    stored = read_execution(execution_id)
    assert stored is not None
    assert stored.status == "running"


# --- Pattern 4 and the "Sync Session" pattern ---------------------------------------


def test_pattern4_route_creates_a_user_through_get_db(database: TestDatabase) -> None:
    with TestClient(make_app()) as client:
        response = client.post("/users", params={"email": "ann@example.com", "name": "Ann"})

    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("email", "first_name", "last_name", "status", "role")} == {
        "email": "ann@example.com",
        "first_name": "Ann",
        "last_name": None,
        "status": "active",
        "role": "member",
    }
    with get_db_session() as db:
        stored = db.get(User, body["id"])
        assert stored is not None
        assert (stored.email, stored.first_name) == ("ann@example.com", "Ann")


def test_sync_session_route_reads_a_user(database: TestDatabase) -> None:
    user_id = seed_user("bob@example.com", [])

    with TestClient(make_app()) as client:
        found = client.get(f"/users/{user_id}")
        missing = client.get("/users/no-such-id")

    assert found.status_code == 200
    assert (found.json()["id"], found.json()["email"]) == (user_id, "bob@example.com")
    assert missing.status_code == 200
    assert missing.json() is None


def test_get_db_rolls_back_when_the_route_fails(database: TestDatabase) -> None:
    with TestClient(make_app()) as client, pytest.raises(RuntimeError, match="after writing"):
        client.post("/users-then-fail", params={"email": "gone@example.com"})

    assert count_users() == 0


def test_get_db_rolls_back_an_error_thrown_into_it(database: TestDatabase) -> None:
    dependency = get_db()
    db = next(dependency)
    db.add(User(email="gone@example.com"))
    db.flush()

    with pytest.raises(RuntimeError):
        dependency.throw(RuntimeError("request failed"))

    assert count_users() == 0


def test_pattern4_duplicate_email_is_a_typed_error(database: TestDatabase) -> None:
    seed_user("ann@example.com", [])

    with (
        TestClient(make_app()) as client,
        pytest.raises(AlreadyExists, match="already exists"),
    ):
        client.post("/users", params={"email": "ann@example.com", "name": "Ann"})

    assert count_users() == 1


# --- Pattern 5 -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pattern5_selectinload_returns_a_usable_user(database: TestDatabase) -> None:
    user_id = seed_user("cy@example.com", ["laptop", "phone"])
    seed_user("other@example.com", ["elsewhere"])

    user = await get_user_with_sessions(user_id)

    # The session is closed: the relationship must already be loaded to be read here.
    assert user is not None
    assert user.email == "cy@example.com"
    assert sorted(s.name for s in user.sessions) == ["laptop", "phone"]
    assert {s.user_id for s in user.sessions} == {user_id}
    assert await get_user_with_sessions("no-such-id") is None


@pytest.mark.asyncio
async def test_pattern5_join_returns_user_and_session_pairs(database: TestDatabase) -> None:
    user_id = seed_user("cy@example.com", ["laptop", "phone"])
    lonely_id = seed_user("lonely@example.com", [])

    rows = await get_user_with_sessions_joined(user_id)

    assert sorted((u.id, s.name) for u, s in rows) == [(user_id, "laptop"), (user_id, "phone")]
    # An inner join: a user without sessions has no rows.
    assert await get_user_with_sessions_joined(lonely_id) == []


@pytest.mark.asyncio
async def test_selectinload_loads_all_sessions_in_one_extra_query(
    database: TestDatabase,
) -> None:
    for n in range(3):
        seed_user(f"u{n}@example.com", [f"s{n}a", f"s{n}b"])
    engine = get_database().async_engine.sync_engine

    async with get_async_db_session() as db:
        await db.execute(select(func.count()).select_from(User))  # connect before counting
        with recorded_selects(engine) as selects:
            result = await db.execute(select(User).options(selectinload(User.sessions)))
            users = result.scalars().all()
            names = sorted(s.name for user in users for s in user.sessions if s.name)

    assert names == ["s0a", "s0b", "s1a", "s1b", "s2a", "s2b"]
    assert len(selects) == 2, selects
    assert "user_sessions" not in selects[0]
    assert "user_sessions" in selects[1]


def test_lazy_sessions_cost_a_query_per_user_and_selectinload_one(
    database: TestDatabase,
) -> None:
    for n in range(3):
        seed_user(f"u{n}@example.com", [f"s{n}"])
    engine = get_database().engine

    with get_db_session() as db, recorded_selects(engine) as lazy:
        for user in db.scalars(select(User)).all():
            assert len(user.sessions) == 1
    with get_db_session() as db, recorded_selects(engine) as eager:
        for user in db.scalars(select(User).options(selectinload(User.sessions))).all():
            assert len(user.sessions) == 1

    assert len(lazy) == 1 + 3
    assert len(eager) == 2


# --- Session patterns ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_session_pattern_reads_a_user(database: TestDatabase) -> None:
    user_id = seed_user("dee@example.com", [])

    user = await my_async_function(user_id)

    assert user is not None
    assert user.email == "dee@example.com"


def test_context_manager_commits_on_success(database: TestDatabase) -> None:
    my_function()

    with get_db_session() as db:
        stored = db.scalars(select(User)).one()
        assert (stored.email, stored.status, stored.role) == (
            "test@example.com",
            "active",
            "member",
        )


def test_context_manager_rolls_back_on_exception(database: TestDatabase) -> None:
    def write_then_fail() -> None:
        with get_db_session(commit=True) as db:
            db.add(User(email="test@example.com"))
            db.flush()  # the row is in the database's transaction, not yet committed
            raise RuntimeError("fails before the block ends")

    with pytest.raises(RuntimeError, match="before the block ends"):
        write_then_fail()

    assert count_users() == 0


def test_duplicate_email_through_the_orm_is_already_exists(database: TestDatabase) -> None:
    seed_user("dup@example.com", [])

    with pytest.raises(AlreadyExists), get_db_session(commit=True) as db:
        db.add(User(email="dup@example.com"))

    assert count_users() == 1


@pytest.mark.asyncio
async def test_good_pattern_rolls_back_and_raises_typed(database: TestDatabase) -> None:
    seed_user("dup@example.com", [])

    async def good_pattern() -> None:
        async with get_async_db_session() as db:
            try:
                db.add(User(email="dup@example.com"))
                await db.commit()
            except Exception:
                await db.rollback()
                raise

    with pytest.raises(AlreadyExists):
        await good_pattern()

    assert count_users() == 1


@pytest.mark.asyncio
async def test_expunged_user_is_usable_outside_its_session(database: TestDatabase) -> None:
    seed_user("eve@example.com", ["tablet"])

    # The guide's troubleshooting example calls db.query() on an AsyncSession, which has
    # no query(); select() is its async form.
    async with get_async_db_session() as db:
        user = (await db.execute(select(User).options(selectinload(User.sessions)))).scalar_one()
        db.expunge(user)

    assert user.email == "eve@example.com"
    assert [s.name for s in user.sessions] == ["tablet"]


# --- Example 1 -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_example1_state_manager_returns_the_new_id(database: TestDatabase) -> None:
    execution_id = await ExecutionStateManager().create_execution("report", {"month": "2026-02"})

    stored = read_execution(execution_id)
    assert stored is not None
    assert (stored.workflow_id, stored.input_data, stored.status) == (
        "report",
        {"month": "2026-02"},
        "pending",
    )


# --- Example 2 -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_example2_creates_a_user_and_returns_a_dict(database: TestDatabase) -> None:
    created = await create_user("fay@example.com", "Fay")

    assert created == {
        "id": created["id"],
        "email": "fay@example.com",
        "name": "Fay",
        "first_name": "Fay",
        "last_name": None,
    }
    with get_db_session() as db:
        stored = db.get(User, created["id"])
        assert stored is not None
        assert (stored.email, stored.first_name, stored.status, stored.role) == (
            "fay@example.com",
            "Fay",
            "active",
            "member",
        )


@pytest.mark.asyncio
async def test_example2_refuses_a_duplicate_email(database: TestDatabase) -> None:
    await create_user("fay@example.com", "Fay")

    with pytest.raises(ValueError, match=r"User with email fay@example\.com already exists"):
        await create_user("fay@example.com", "Someone else")

    assert count_users() == 1


# --- "Testing Migrated Code": the guide's own test -----------------------------------


@pytest.mark.asyncio
async def test_create_user(database: TestDatabase) -> None:
    """Test user creation with new pattern"""
    async with get_async_db_session() as db:
        # Create user
        user = User(email="test@example.com", first_name="Test", status="active")
        db.add(user)
        await db.commit()
        await db.refresh(user)

        # Verify user was created
        result = await db.execute(select(User).where(User.email == "test@example.com"))
        found_user = result.scalar_one_or_none()

        assert found_user is not None
        assert found_user.email == "test@example.com"
