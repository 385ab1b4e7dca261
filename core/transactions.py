"""Retry-safe transactions that run the same units of work on sync and async sessions.

A unit of work is a *plan*: a generator that yields SQLAlchemy statements and receives
each one's ``Result``. It does no I/O itself, so one plan serves the sync runner
(Celery workers) and the async runner (async producers) alike. A runner opens a
session, begins a transaction, drives the plan, and commits; any error rolls the
whole transaction back. Transient database errors (see ``core.errors.is_transient``)
re-run the *whole* plan from a fresh generator with bounded, jittered exponential
backoff; every other error is raised at once, translated to a ConveyorError.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from sqlalchemy import Executable, Result
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from core.config import Settings
from core.errors import TransientDatabaseError, translate_errors

log = logging.getLogger(__name__)

T = TypeVar("T")
# What a plan yields: a statement, or a statement with a list of parameter sets
# (executemany, e.g. one event row per transitioned step).
Call: TypeAlias = Executable | tuple[Executable, Sequence[Mapping[str, Any]]]
Plan: TypeAlias = Generator[Call, Result[Any], T]
PlanFactory: TypeAlias = Callable[[], Plan[T]]


def _split(call: Call) -> tuple[Executable, Sequence[Mapping[str, Any]] | None]:
    return call if isinstance(call, tuple) else (call, None)


def drive(plan: Plan[T], execute: Callable[[Executable, Any], Result[Any]]) -> T:
    """Run ``plan`` to completion, executing each statement it yields with ``execute``."""
    try:
        call = next(plan)
        while True:
            call = plan.send(execute(*_split(call)))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        plan.close()


async def drive_async(
    plan: Plan[T], execute: Callable[[Executable, Any], Awaitable[Result[Any]]]
) -> T:
    """The async twin of ``drive``: the same plan, awaited statement by statement."""
    try:
        call = next(plan)
        while True:
            call = plan.send(await execute(*_split(call)))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        plan.close()


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


class TransactionRunner:
    """Runs plans in retried transactions on sync sessions (workers, CLI)."""

    def __init__(self, sessions: sessionmaker[Session], policy: RetryPolicy) -> None:
        self._sessions = sessions
        self._policy = policy

    def run(self, plan: PlanFactory[T]) -> T:
        """Run a fresh ``plan()`` in one transaction, re-running it on transient errors."""
        for attempt in Retrying(**self._policy.options()):
            with attempt:
                return self._once(plan)
        raise AssertionError("tenacity ends with a result or an error")  # pragma: no cover

    def _once(self, plan: PlanFactory[T]) -> T:
        with translate_errors(), self._sessions() as session, session.begin():
            return drive(plan(), session.execute)


class AsyncTransactionRunner:
    """Runs plans in retried transactions on async sessions (async producers)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], policy: RetryPolicy) -> None:
        self._sessions = sessions
        self._policy = policy

    async def run(self, plan: PlanFactory[T]) -> T:
        """Run a fresh ``plan()`` in one transaction, re-running it on transient errors."""
        async for attempt in AsyncRetrying(**self._policy.options()):
            with attempt:
                return await self._once(plan)
        raise AssertionError("tenacity ends with a result or an error")  # pragma: no cover

    async def _once(self, plan: PlanFactory[T]) -> T:
        with translate_errors():
            async with self._sessions() as session, session.begin():
                return await drive_async(plan(), session.execute)
