"""Racers for concurrency tests: each runs one transition and reports whether it won.

Lives in an importable module so that ``multiprocessing`` (spawn) can start it in a
fresh interpreter, as separate worker processes would be.
"""

from __future__ import annotations

from multiprocessing.synchronize import Barrier

from core.config import Settings
from core.database import Database
from core.execution_state_manager import SyncExecutionStateManager


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
