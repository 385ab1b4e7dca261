"""The rules of writing state: one winner per race, illegal transitions refused, and
transient failures retried as whole transactions with exactly one effect."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text

from core.config import Settings
from core.database import Database
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.errors import InvalidTransition, TransientDatabaseError
from core.execution_state_manager import SyncExecutionStateManager
from core.executions import StepSpec
from core.states import EXECUTIONS, STEPS, ExecutionStatus, StepStatus
from core.transactions import RetryPolicy
from tests.conftest import TestDatabase
from tests.helpers.race import race_transition
from tests.helpers.state import (
    events,
    execution_row,
    force_execution_status,
    force_step_status,
    insert_execution,
    step_row,
)

RACERS = 8


def test_one_winner_among_threads(database: TestDatabase) -> None:
    manager = SyncExecutionStateManager()
    execution_id = manager.create_execution("w", {})
    barrier = threading.Barrier(RACERS)

    def racer(_: int) -> bool:
        barrier.wait(timeout=30)
        return manager.transition_execution(execution_id, "running").applied

    with ThreadPoolExecutor(RACERS) as pool:
        outcomes = list(pool.map(racer, range(RACERS)))
    assert outcomes.count(True) == 1
    assert events(execution_id) == [(None, None, "pending"), (None, "pending", "running")]


def test_one_winner_among_processes(database: TestDatabase) -> None:
    execution_id = SyncExecutionStateManager().create_execution("w", {})
    context = multiprocessing.get_context("spawn")
    with context.Manager() as shared:
        barrier = shared.Barrier(RACERS)
        with context.Pool(RACERS) as pool:
            outcomes = pool.starmap(
                race_transition,
                [(database.url, execution_id, "cancelled", barrier)] * RACERS,
            )
    assert outcomes.count(True) == 1
    assert execution_row(execution_id)["status"] == "cancelled"
    # The winner closed the execution's step with it, once.
    assert events(execution_id) == [
        (None, None, "pending"),
        (None, "pending", "cancelled"),
        ("only", "pending", "cancelled"),
    ]


ILLEGAL_EXECUTION_EDGES = [
    (source, target)
    for source, target in product(ExecutionStatus, ExecutionStatus)
    if not EXECUTIONS.is_allowed(source, target)
]
ILLEGAL_STEP_EDGES = [
    (source, target)
    for source, target in product(StepStatus, StepStatus)
    if not STEPS.is_allowed(source, target)
]


def test_every_illegal_execution_transition_is_refused(database: TestDatabase) -> None:
    manager = SyncExecutionStateManager()
    execution_id = manager.create_execution("w", {})
    for source, target in ILLEGAL_EXECUTION_EDGES:
        force_execution_status(execution_id, source)
        before, history = execution_row(execution_id), events(execution_id)
        with pytest.raises(InvalidTransition, match=f"{source} -> {target} is not allowed"):
            manager.transition_execution(execution_id, target, expected=source)
        if EXECUTIONS.sources_of(target):
            # Asked without naming a source: the row is simply not in one that leads there.
            result = manager.transition_execution(execution_id, target)
            assert not result.applied
            assert result.current_status == source
        else:
            with pytest.raises(InvalidTransition):
                manager.transition_execution(execution_id, target)
        assert execution_row(execution_id) == before
        assert events(execution_id) == history


def test_every_illegal_step_transition_is_refused(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    execution_id = insert_execution("w", {}, steps=[StepSpec("s")])
    for source, target in ILLEGAL_STEP_EDGES:
        force_step_status(execution_id, "s", source)
        before, history = step_row(execution_id, "s"), events(execution_id)
        with pytest.raises(InvalidTransition, match=f"{source} -> {target} is not allowed"):
            manager.transition_step(execution_id, "s", target, expected=source)
        if STEPS.sources_of(target):
            result = manager.transition_step(execution_id, "s", target)
            assert not result.applied
            assert result.current_status == source
        else:
            with pytest.raises(InvalidTransition):
                manager.transition_step(execution_id, "s", target)
        assert step_row(execution_id, "s") == before
        assert events(execution_id) == history


def test_every_legal_transition_applies_with_its_event(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    execution_id = insert_execution("w", {}, steps=[StepSpec("s")])
    legal = [(s, t) for s, t in product(StepStatus, StepStatus) if STEPS.is_allowed(s, t)]
    for source, target in legal:
        force_step_status(execution_id, "s", source)
        count_before = len(events(execution_id))
        assert manager.transition_step(execution_id, "s", target, expected=source).applied
        assert step_row(execution_id, "s")["status"] == target
        assert events(execution_id)[count_before:] == [("s", source, target)]


def _counting_policy(retries: list[int], **kwargs: Any) -> RetryPolicy:
    return RetryPolicy(
        attempts=5,
        initial_wait=0.01,
        max_wait=0.05,
        on_retry=lambda state: retries.append(state.attempt_number),
        **kwargs,
    )


@pytest.mark.postgresql_only
def test_connection_killed_mid_transaction_is_retried_once(
    database: TestDatabase,
) -> None:
    """pg_terminate_backend between the compare-and-set and its event row: the whole
    transaction rolls back and is re-run; the transition and its event land once."""
    retries: list[int] = []
    manager = SyncExecutionStateManager(retry_policy=_counting_policy(retries))
    execution_id = manager.create_execution("w", {})
    admin = create_engine(database.url, isolation_level="AUTOCOMMIT")
    engine = manager.database.work_engine
    killed: list[int] = []

    def kill_before_event_insert(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("INSERT INTO execution_events") and not killed:
            pid = conn.connection.dbapi_connection.info.backend_pid
            with admin.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            killed.append(pid)

    event.listen(engine, "before_cursor_execute", kill_before_event_insert)
    try:
        result = manager.transition_execution(execution_id, "running")
    finally:
        event.remove(engine, "before_cursor_execute", kill_before_event_insert)
        admin.dispose()
    assert killed
    assert retries == [1]
    assert result.applied
    assert result.from_status == "pending"
    assert execution_row(execution_id)["status"] == "running"
    assert events(execution_id) == [(None, None, "pending"), (None, "pending", "running")]


@pytest.mark.sqlite_only
def test_sqlite_lock_held_by_another_connection_is_retried(database: TestDatabase) -> None:
    retries: list[int] = []
    holder = sqlite3.connect(database.url.removeprefix("sqlite:///"), isolation_level=None)

    def release_lock(_state: Any) -> None:
        retries.append(1)
        holder.execute("COMMIT")

    settings = database.settings.model_copy(update={"sqlite_busy_timeout_ms": 50})
    locked_db = Database(settings)
    manager = SyncExecutionStateManager(
        locked_db,
        retry_policy=RetryPolicy(attempts=3, initial_wait=0, max_wait=0, on_retry=release_lock),
    )
    execution_id = manager.create_execution("w", {})
    holder.execute("BEGIN IMMEDIATE")
    try:
        result = manager.transition_execution(execution_id, "running")
    finally:
        holder.close()
        locked_db.dispose()
    assert retries == [1]
    assert result.applied
    assert events(execution_id) == [(None, None, "pending"), (None, "pending", "running")]


def test_retries_are_bounded_then_a_typed_error(database: TestDatabase, backend: str) -> None:
    """A database that stays unavailable: TransientDatabaseError after the last attempt."""
    manager = SyncExecutionStateManager()
    execution_id = manager.create_execution("w", {})
    retries: list[int] = []
    if backend == "sqlite":
        settings = database.settings.model_copy(update={"sqlite_busy_timeout_ms": 10})
        broken = Database(settings)
        holder = sqlite3.connect(database.url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    else:
        # A server that refuses connections: nothing listens on this port.
        from tests.servers import free_port

        url = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
        broken = Database(Settings(database_url=url))
        holder = None
    manager = SyncExecutionStateManager(
        broken,
        retry_policy=RetryPolicy(
            attempts=3,
            initial_wait=0,
            max_wait=0,
            on_retry=lambda s: retries.append(s.attempt_number),
        ),
    )
    try:
        with pytest.raises(TransientDatabaseError, match="database unavailable") as raised:
            manager.transition_execution(execution_id, "running")
    finally:
        if holder is not None:
            holder.close()
        broken.dispose()
    assert retries == [1, 2]
    assert raised.value.__cause__ is not None
    assert execution_row(execution_id)["status"] == "pending"
