"""Retry-safe transactions: each unit of work is written once, against a sync Connection.

A unit of work is a plain function whose first parameter is a ``Connection`` already
inside a transaction; it owns no transaction itself, so callers can group several in
one. ``Transactions.run`` begins a transaction on the sync engine (workers, CLI),
calls the function and commits; ``Transactions.run_async`` does the same on the async
engine (async producers, the seed's examples) through ``AsyncConnection.run_sync``, so
the same function serves both. Transient database errors (``core.errors.is_transient``)
roll back and re-run the *whole* function with bounded, jittered exponential backoff;
every other error is raised at once, translated to a ConveyorError.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Connection
from sqlalchemy.orm import Session
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from core.config import Settings
from core.database import Database
from core.errors import TransientDatabaseError, translate_errors

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
Work = Callable[Concatenate[Connection, P], T]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transaction is re-run after a transient error."""

    attempts: int = 5
    initial_wait: float = 0.05
    max_wait: float = 2.0
    on_retry: Callable[[RetryCallState], None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy configured by ``CONVEYOR_DB_RETRY_*``."""
        return cls(
            settings.db_retry_attempts, settings.db_retry_initial_wait, settings.db_retry_max_wait
        )

    def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("transaction attempt %d failed, retrying: %s", state.attempt_number, error)
        if self.on_retry is not None:
            self.on_retry(state)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for tenacity's ``Retrying`` / ``AsyncRetrying``."""
        return {
            "stop": stop_after_attempt(self.attempts),
            # Full jitter: concurrent losers of the same lock spread out instead of
            # colliding again in lockstep.
            "wait": wait_random_exponential(multiplier=self.initial_wait, max=self.max_wait),
            "retry": retry_if_exception_type(TransientDatabaseError),
            "before_sleep": self._before_sleep,
            "reraise": True,
        }


class Transactions:
    """Runs units of work in retried transactions on one database; long-lived."""

    def __init__(self, database: Database, policy: RetryPolicy) -> None:
        self.database = database
        self.policy = policy
        # Built once: tenacity keeps per-call statistics thread-locally, so one Retrying
        # serves every thread.
        self._retrying = Retrying(**policy.options())

    def run(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``work(connection, *args, **kwargs)`` in one transaction, re-run on transient
        errors; its result once committed."""
        result: T = self._retrying(self._once, work, *args, **kwargs)
        return result

    def _once(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        with translate_errors(), self.database.work_engine.begin() as connection:
            return work(connection, *args, **kwargs)

    async def run_async(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """The same unit of work on the async engine, through ``run_sync``."""
        async for attempt in AsyncRetrying(**self.policy.options()):
            with attempt, translate_errors():
                async with self.database.async_engine.begin() as connection:
                    result: T = await connection.run_sync(work, *args, **kwargs)
                    return result
        raise AssertionError("tenacity ends with a result or an error")  # pragma: no cover


def orm(connection: Connection) -> Session:
    """A session on ``connection``'s transaction, for the reads that return ORM objects.

    Objects it loads stay usable after the transaction ends (``expire_on_commit=False``).
    """
    return Session(bind=connection, expire_on_commit=False, autoflush=False)
