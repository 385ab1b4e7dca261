"""Racers for concurrency tests: transitions raced by processes or threads.

Lives in an importable module so that ``multiprocessing`` (spawn) can start it in a
fresh interpreter, as separate worker processes would be.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Barrier
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, event

from core import steps
from core.config import Settings
from core.database import Database
from core.execution_state_manager import SyncExecutionStateManager
from core.outcomes import Claim, StepCompletion
from core.workflows import Dag

T = TypeVar("T")


def race_transition(database_url: str, execution_id: str, target: str, barrier: Barrier) -> bool:
    """Wait for every racer, then try ``target``; True if this racer's CAS applied."""
    database = Database(
        Settings(
            database_url=database_url,
            db_retry_attempts=50,
            db_retry_initial_wait=0.01,
            db_retry_max_wait=0.1,
        )
    )
    try:
        manager = SyncExecutionStateManager(database)
        barrier.wait(timeout=60)
        return manager.transition_execution(execution_id, target, reason="race").applied
    finally:
        database.dispose()


# The first statement of an execution's finish check: the finish lock, or the finish
# itself (the fused one, the set-wise one), or a pass's other execution transitions.
FINISH_CHECK = (
    "pg_advisory_xact_lock",
    "WITH finished AS",
    "UPDATE workflow_executions SET status",
)


def run_together(
    engine: Engine, works: Sequence[Callable[[Connection], T]], timeout: float = 10.0
) -> list[T]:
    """Run each unit of work in its own transaction on its own connection (threads),
    none going on to an execution's finish check (or its commit, if it makes none)
    until all have come that far: the interleaving in which, under READ COMMITTED, each
    sees the others' step updates not yet committed.

    PostgreSQL only: SQLite's writers are serial (BEGIN IMMEDIATE), so a second
    transaction could not make its update while the first waits at the barrier. The
    works must not update the same rows, or one would wait for the other's commit.
    """
    barrier = threading.Barrier(len(works))

    def run(work: Callable[[Connection], T]) -> T:
        with engine.connect() as conn:
            waited = [False]

            def wait_once() -> None:
                if not waited[0]:
                    waited[0] = True
                    barrier.wait(timeout=timeout)

            def before_statement(_conn: Connection, _cursor: Any, text: str, *_: Any) -> None:
                if any(marker in text for marker in FINISH_CHECK):
                    wait_once()

            event.listen(conn, "before_cursor_execute", before_statement)
            event.listen(conn, "commit", lambda _conn: wait_once())
            with conn.begin():
                return work(conn)

    with ThreadPoolExecutor(len(works)) as pool:
        return list(pool.map(run, works))


def complete_together(
    engine: Engine,
    claims: Sequence[Claim],
    dag: Dag,
    outputs: Sequence[Any] | None = None,
    timeout: float = 10.0,
) -> list[StepCompletion]:
    """Complete each claim in its own transaction at the same moment (``run_together``):
    each transaction records its step before any checks for the execution's end."""
    values = list(outputs) if outputs is not None else [None] * len(claims)

    def completion(claim: Claim, output: Any) -> Callable[[Connection], StepCompletion]:
        encoded = None if output is None else json.dumps(output)
        return lambda conn: steps.complete(conn, claim, output, encoded, dag, None)

    works = [completion(c, out) for c, out in zip(claims, values, strict=True)]
    return run_together(engine, works, timeout)
