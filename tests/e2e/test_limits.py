"""Per-key concurrency and rate limits through a real worker, database and broker.

The in-process worker runs 8 threads: more than any limit here, so a limit that holds
is the database's doing, not the pool's.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from core.database import get_db_session
from core.limits import key_states
from core.models import ExecutionEvent, FlowKey, KeySlot, StepExecution
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
CALLS_MAY_END = threading.Event()


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
        CALLS_MAY_END.wait(timeout=30)  # a test holds the calls in flight for a while
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


GATE = threading.Event()

fair = Workflow(
    "limits-fair",
    max_concurrency=2,
    concurrency=Concurrency(key=lambda input: input["tenant"], limit=2),
)


@fair.step()
def work(ctx: StepContext) -> str:
    return str(ctx.input["tenant"])


newest = Workflow(
    "limits-newest",
    concurrency=Concurrency(key=lambda input: input["tenant"], limit=1, on_limit="cancel_newest"),
)
in_progress = Workflow(
    "limits-in-progress",
    concurrency=Concurrency(
        key=lambda input: input["tenant"], limit=1, on_limit="cancel_in_progress"
    ),
)


def _blocked(ctx: StepContext) -> str:
    # Held until the test opens the gate, or its execution is cancelled.
    while not GATE.wait(0.05):
        if ctx.is_cancelled():
            return "cancelled"
    return "done"


newest.step(name="hold")(_blocked)
in_progress.step(name="hold")(_blocked)

held = Workflow("limits-held")


@held.step(concurrency=Concurrency(key="limits-held-api", limit=1))
def blocked(ctx: StepContext) -> str:
    return _blocked(ctx)


# The same step behind one upstream step: admitted when that one completes.
held_later = Workflow("limits-held-later")


@held_later.step()
def first(ctx: StepContext) -> str:
    return "first"


@held_later.step(depends_on=["first"], concurrency=Concurrency(key="limits-later-api", limit=1))
def blocked_later(ctx: StepContext, first: str) -> str:
    return _blocked(ctx)


paused = Workflow("limits-paused")


@paused.step(
    concurrency=Concurrency(key="limits-paused-api", limit=5),
    retry=Retry(max_attempts=2, backoff=0.0, jitter=False),
)
def call_api(ctx: StepContext) -> str:
    if ctx.input.get("throttled") and ctx.attempt == 1:
        ctx.pause_key("limits-paused-api", until=timedelta(seconds=1.5))
        raise RuntimeError("429 Too Many Requests")
    return "ok"


def _scalar(query: Any) -> int:
    with get_db_session() as session:
        return int(session.execute(query).scalar_one())


@pytest.fixture
def app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    registry = WorkflowRegistry(
        [tenants, rated, fair, newest, in_progress, held, held_later, paused]
    )
    configure_registry(registry)
    for counter in (RUNNING, PEAK, FAILS):
        counter.clear()
    STARTS.clear()
    GATE.clear()
    CALLS_MAY_END.set()
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
    assert PEAK["a"] == 2
    assert PEAK["b"] == 2
    assert FAILS["a"] > 0  # retries happened, and freed their slots
    assert _slots() == 0
    with get_db_session() as session:
        states = {s.key: s for s in key_states(session.connection())}
    assert states["limits-tenants.call:a"].running == 0
    assert states["limits-tenants.call:a"].limit == 2


def test_a_step_held_by_its_key_waits_as_a_row_with_its_reason(app: ConveyorCelery) -> None:
    # Two calls hold the key's two slots until the others have come to it and wait.
    CALLS_MAY_END.clear()
    with running_worker(app, concurrency=8):
        ids = [enqueue(tenants, {"tenant": "c"}, app=app) for _ in range(5)]
        waiting = select(func.count()).where(
            StepExecution.execution_id.in_(ids),
            StepExecution.step_name == "call",
            StepExecution.status == "waiting",
            StepExecution.wait_kind == "key",
        )
        deadline = time.monotonic() + 30
        while _scalar(waiting) < 3:
            assert time.monotonic() < deadline, "three calls should wait for a slot"
            time.sleep(0.02)
        CALLS_MAY_END.set()
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


def test_a_step_admitted_at_once_continues_in_the_worker_that_released_it(
    app: ConveyorCelery,
) -> None:
    """Like a step released without limits: no broker message, no claim of its own."""
    with running_worker(app, concurrency=8):
        execution_id = enqueue(tenants, {"tenant": "d"}, app=app)
        assert wait_for(execution_id).status == "succeeded"
    with get_db_session() as session:
        reasons = list(
            session.scalars(
                select(ExecutionEvent.reason)
                .where(
                    ExecutionEvent.execution_id == execution_id, ExecutionEvent.step_name == "call"
                )
                .order_by(ExecutionEvent.id)
            )
        )
        steps = {
            row.step_name: row
            for row in session.scalars(
                select(StepExecution).where(StepExecution.execution_id == execution_id)
            )
        }
    assert reasons[-3:] == ["admitted", "continued in worker", "step succeeded"], reasons
    assert steps["call"].celery_task_id is None
    assert steps["call"].worker == steps["prepare"].worker
    assert _slots() == 0


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
    # burst 1, 10 per second: one admission every 0.1 s at most. The history records
    # each admission at the database clock's reading it was decided on (a step's start
    # then waits for its message, which the rate does not govern).
    assert len(admitted) == 6
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(admitted)]
    assert min(gaps) >= 0.1 - 1e-6, gaps


def _admitted_at(execution_ids: list[str], step: str | None = None) -> dict[str, datetime]:
    """When each execution (or its ``step``) was admitted, by the database's clock."""
    with get_db_session() as session:
        rows = session.execute(
            select(ExecutionEvent.execution_id, ExecutionEvent.created_at).where(
                ExecutionEvent.execution_id.in_(execution_ids),
                ExecutionEvent.reason == "admitted",
                ExecutionEvent.step_name.is_(None)
                if step is None
                else ExecutionEvent.step_name == step,
            )
        ).all()
    return {row.execution_id: row.created_at for row in rows}


def test_a_busy_tenant_cannot_starve_another(app: ConveyorCelery) -> None:
    from worker.producer import enqueue_many

    busy = enqueue_many(fair, [{"tenant": "a"} for _ in range(1000)], app=app)
    late = enqueue(fair, {"tenant": "b"}, app=app)
    with running_worker(app, concurrency=8):
        assert wait_for(late).status == "succeeded"
    admitted = _admitted_at([*busy, late])
    order = sorted(admitted, key=lambda e: admitted[e])
    # B arrived behind 1,000 of A's; with 2 slots it starts within the next 2 admissions.
    assert order.index(late) <= 2, order.index(late)


def test_cancel_newest_cancels_the_execution_over_the_limit(app: ConveyorCelery) -> None:
    with running_worker(app, concurrency=4):
        first = enqueue(newest, {"tenant": "t"}, app=app)
        wait_for(first, lambda e: e.status == "running")
        second = enqueue(newest, {"tenant": "t"}, app=app)
        assert wait_for(second).status == "cancelled"
        GATE.set()
        assert wait_for(first).status == "succeeded"


def test_cancel_in_progress_makes_room_for_the_newest(app: ConveyorCelery) -> None:
    with running_worker(app, concurrency=4):
        first = enqueue(in_progress, {"tenant": "t"}, app=app)
        wait_for(first, lambda e: e.status == "running")
        second = enqueue(in_progress, {"tenant": "t"}, app=app)
        assert wait_for(first).status == "cancelled"
        wait_for(second, lambda e: e.status == "running")
        GATE.set()
        assert wait_for(second).status == "succeeded"


def test_a_cancel_frees_its_slot_for_the_next_waiter_at_once(app: ConveyorCelery) -> None:
    with running_worker(app, concurrency=4):
        first = enqueue(held, {}, app=app)
        wait_for(first, lambda e: e.status == "running")
        second = enqueue(held, {}, app=app)
        deadline = time.monotonic() + 10
        while _step_status(second, "blocked") != "waiting":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert app.engine.cancel(first)
        # No reconciler runs here: the cancel itself admitted the waiter.
        deadline = time.monotonic() + 10
        while _step_status(second, "blocked") != "running":
            assert time.monotonic() < deadline, _step_status(second, "blocked")
            time.sleep(0.05)
        GATE.set()
        assert wait_for(second).status == "succeeded"
    assert _slots() == 0


@pytest.mark.parametrize(
    ("workflow", "step"), [(held, "blocked"), (held_later, "blocked_later")], ids=["root", "later"]
)
def test_a_step_held_by_its_key_parks_its_execution_and_one_admitted_does_not(
    app: ConveyorCelery, workflow: Workflow, step: str
) -> None:
    """Parked (every open step waiting) is what ``conveyor status`` shows as waiting: a
    step admitted at once leaves its execution running unparked, whether released at the
    start or by its upstream step's completion."""
    with running_worker(app, concurrency=4):
        first = enqueue(workflow, {}, app=app)
        wait_for(first, lambda e: e.status == "running")
        deadline = time.monotonic() + 10
        while _step_status(first, step) != "running":
            assert time.monotonic() < deadline, _step_status(first, step)
            time.sleep(0.05)
        second = enqueue(workflow, {}, app=app)
        while _step_status(second, step) != "waiting":
            assert time.monotonic() < deadline, _step_status(second, step)
            time.sleep(0.05)
        assert wait_for(first, lambda e: e.status == "running").parked_at is None
        assert wait_for(second, lambda e: e.status == "running").parked_at is not None
        GATE.set()
        assert wait_for(first).status == "succeeded"
        assert wait_for(second).status == "succeeded"
    assert _slots() == 0


def test_pause_key_holds_every_start_until_its_time(app: ConveyorCelery) -> None:
    with running_worker(app, concurrency=4):
        throttled = enqueue(paused, {"throttled": True}, app=app)
        deadline = time.monotonic() + 10
        while (until := _paused_until("limits-paused-api")) is None:
            assert time.monotonic() < deadline, "the step never paused its key"
            time.sleep(0.02)
        others = [enqueue(paused, {}, app=app) for _ in range(3)]
        # Beat does not run here: the waker's ticks are the test's (every 0.2 s).
        deadline = time.monotonic() + 20
        while any(_step_status(e, "call_api") != "succeeded" for e in [throttled, *others]):
            assert time.monotonic() < deadline
            app.engine.wake()
            time.sleep(0.2)
        for execution_id in [throttled, *others]:
            assert wait_for(execution_id).status == "succeeded"
    admitted = _admitted_at(others, "call_api")
    assert len(admitted) == 3
    assert min(admitted.values()) >= until


def _paused_until(key: str) -> datetime | None:
    with get_db_session() as session:
        return session.scalar(select(FlowKey.paused_until).where(FlowKey.key == key))


def _step_status(execution_id: str, step: str) -> str:
    with get_db_session() as session:
        return str(
            session.scalar(
                select(StepExecution.status).where(
                    StepExecution.execution_id == execution_id, StepExecution.step_name == step
                )
            )
        )


conditional = Workflow("limits-conditional")


@conditional.step()
def classify(ctx: StepContext) -> str:
    return str(ctx.input["kind"])


@conditional.step(
    depends_on=["classify"],
    when=lambda ctx, classify: classify == "refund",
    concurrency=Concurrency(key="limits-refunds", limit=1),
)
def refund(ctx: StepContext, classify: str) -> str:
    _enter("refund")
    time.sleep(0.05)
    _leave("refund")
    return "refunded"


def test_a_condition_decides_before_the_limit_admits(
    database: TestDatabase, redis_url: str
) -> None:
    registry = WorkflowRegistry([conditional])
    configure_registry(registry)
    PEAK.clear()
    app = create_app(clean_app_settings(database, redis_url), registry)
    with running_worker(app, concurrency=8):
        kinds = ["refund", "other", "refund", "refund", "other"]
        ids = [enqueue(conditional, {"kind": kind}, app=app) for kind in kinds]
        for execution_id in ids:
            assert wait_for(execution_id).status == "succeeded"
    statuses = [_step_status(e, "refund") for e in ids]
    assert statuses == ["succeeded", "skipped", "succeeded", "succeeded", "skipped"]
    assert PEAK["refund"] == 1
    assert _slots() == 0


def test_the_reconciler_frees_a_slot_an_end_left_and_admits_the_waiter(
    app: ConveyorCelery,
) -> None:
    from tests.helpers.state import force_step_status

    first = enqueue(held, {}, app=app)
    second = enqueue(held, {}, app=app)
    with running_worker(app, concurrency=4):
        deadline = time.monotonic() + 10
        while {_step_status(first, "blocked"), _step_status(second, "blocked")} != {
            "running",
            "waiting",
        }:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        holder, waiter = (
            (first, second) if _step_status(first, "blocked") == "running" else (second, first)
        )
        # An end written behind conveyor's back (no code path freed its slot): the
        # holder's slot row outlives it.
        force_step_status(holder, "blocked", "cancelled")
        with get_db_session() as session:
            assert key_states(session.connection(), ["limits-held-api"])[0].running == 0
        assert _slots() == 1
        report = app.engine.reconcile()
        assert report.slots_freed == 1
        deadline = time.monotonic() + 10
        while _step_status(waiter, "blocked") != "running":
            assert time.monotonic() < deadline, _step_status(waiter, "blocked")
            time.sleep(0.05)
        GATE.set()
        assert wait_for(waiter).status == "succeeded"
