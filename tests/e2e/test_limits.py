"""Per-key concurrency and rate limits through a real worker, database and broker.

The in-process worker runs 8 threads: more than any limit here, so a limit that holds
is the database's doing, not the pool's.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from core.database import get_db_session
from core.limits import key_states
from core.models import ExecutionEvent, KeySlot, StepExecution
from core.registry import WorkflowRegistry, configure_registry
from core.workflows import Concurrency, RateLimit, Retry, StepContext, Workflow
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue

LOCK = threading.Lock()
RUNNING: Counter[str] = Counter()
PEAK: Counter[str] = Counter()
STARTS: list[tuple[str, float]] = []
FAILS: Counter[str] = Counter()


def _enter(key: str) -> None:
    with LOCK:
        RUNNING[key] += 1
        PEAK[key] = max(PEAK[key], RUNNING[key])
        STARTS.append((key, time.monotonic()))


def _leave(key: str) -> None:
    with LOCK:
        RUNNING[key] -= 1


tenants = Workflow("limits-tenants")


@tenants.step()
def prepare(ctx: StepContext) -> str:
    return str(ctx.input["tenant"])


@tenants.step(
    depends_on=["prepare"],
    concurrency=Concurrency(key=lambda input: input["tenant"], limit=2),
    retry=Retry(max_attempts=2, backoff=0.05, jitter=False),
)
def call(ctx: StepContext, prepare: str) -> str:
    _enter(prepare)
    try:
        time.sleep(0.1)
        if ctx.input.get("fail_once") and ctx.attempt == 1:
            FAILS[prepare] += 1
            raise RuntimeError("first attempt fails")
    finally:
        _leave(prepare)
    return prepare


@tenants.step(depends_on=["call"])
def after(ctx: StepContext, call: str) -> str:
    return call


rated = Workflow("limits-rated")


@rated.step(rate_limit=RateLimit(key="limits-test-api", limit=10, per=timedelta(seconds=1)))
def ping(ctx: StepContext) -> int:
    _enter("rated")
    _leave("rated")
    return 1


@pytest.fixture
def app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    registry = WorkflowRegistry([tenants, rated])
    configure_registry(registry)
    for counter in (RUNNING, PEAK, FAILS):
        counter.clear()
    STARTS.clear()
    return create_app(clean_app_settings(database, redis_url), registry)


def _slots() -> int:
    with get_db_session() as session:
        return int(session.scalar(select(func.count()).select_from(KeySlot)) or 0)


def test_a_key_never_runs_more_than_its_limit_and_frees_every_slot(app: ConveyorCelery) -> None:
    with running_worker(app, concurrency=8):
        ids = [
            enqueue(tenants, {"tenant": tenant, "fail_once": i % 3 == 0}, app=app)
            for i in range(8)
            for tenant in ("a", "b")
        ]
        for execution_id in ids:
            assert wait_for(execution_id).status == "succeeded"
    assert PEAK["a"] == 2 and PEAK["b"] == 2
    assert FAILS["a"] > 0  # retries happened, and freed their slots
    assert _slots() == 0
    with get_db_session() as session:
        states = {s.key: s for s in key_states(session.connection())}
    assert states["limits-tenants.call:a"].running == 0
    assert states["limits-tenants.call:a"].limit == 2


def test_a_step_held_by_its_key_waits_as_a_row_with_its_reason(app: ConveyorCelery) -> None:
    with running_worker(app, concurrency=8):
        ids = [enqueue(tenants, {"tenant": "c"}, app=app) for _ in range(5)]
        for execution_id in ids:
            assert wait_for(execution_id).status == "succeeded"
    with get_db_session() as session:
        reasons = list(
            session.scalars(
                select(ExecutionEvent.reason).where(
                    ExecutionEvent.step_name == "call",
                    ExecutionEvent.execution_id.in_(ids),
                )
            )
        )
    assert reasons.count("admitted") == 5
    assert "held: key limits-tenants.call:c has no free slot" in reasons


def test_a_rate_limit_spaces_starts(app: ConveyorCelery) -> None:
    with running_worker(app, concurrency=8):
        ids = [enqueue(rated, {}, app=app) for _ in range(6)]
        for execution_id in ids:
            assert wait_for(execution_id).status == "succeeded"
    with get_db_session() as session:
        admitted = sorted(
            session.scalars(
                select(ExecutionEvent.created_at).where(
                    ExecutionEvent.execution_id.in_(ids),
                    ExecutionEvent.step_name == "ping",
                    ExecutionEvent.reason == "admitted",
                )
            )
        )
    # burst 1, 10 per second: one admission every 0.1 s at most (the database's clock;
    # a step's start then waits for its message, which the rate does not govern).
    assert len(admitted) == 6
    gaps = [(b - a).total_seconds() for a, b in zip(admitted, admitted[1:], strict=False)]
    # Each event is written a statement after the admission's decision, in its
    # transaction: a millisecond or two of skew each, never a start early by more.
    assert min(gaps) >= 0.095, gaps
    assert sum(gaps) >= 0.5 - 0.005, gaps
