"""An event sent while its wait is being established: the (name, key) event lock orders
the sender and the establishing transaction, so the later of the two sees the earlier's
commit. Every wait completes once, no event is consumed twice, none is lost.

Each side is a real unit of work in its own transaction on its own connection:
establishing is ``core.steps.complete`` of the step upstream of an event wait (it enters
the wait and looks for an event already sent), sending is ``core.events.send_event``.
Every racer is held just before its ``pg_advisory_xact_lock`` on the event lock class
until all have come that far (each has done everything before its critical section:
the completion its row updates, uncommitted), then they are let at the lock one by one
in the drawn order, the next once the one before holds it or queues for it
(``pg_locks``).

The mutation check replaces the event lock with a statement that locks nothing and
holds every racer's commit until all have run their checks: then each side misses the
other's uncommitted row and an event is lost, which proves the barrier sits inside the
window the lock closes. PostgreSQL only: SQLite's writers are serial.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, event, literal, select, text

from core import events, steps, waits
from core.database import get_database
from core.executions import create_executions, execution_of
from core.models import ExecutionEvent, InboxEvent, StepExecution
from core.outcomes import Claim
from core.registry import WorkflowRegistry
from core.wait_statements import EVENT_LOCK, wait_statements
from core.workflows import StepContext, Workflow
from tests.conftest import TestDatabase

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(300)]

EVENT = "race.approved"
TIMEOUT = 20.0

racing = Workflow("event-race")


@racing.step()
def request(ctx: StepContext) -> dict[str, str]:
    return {"key": str(ctx.input["key"])}


racing.wait(
    "approval",
    depends_on=["request"],
    event=EVENT,
    key=lambda ctx, request: request["key"],
)


@racing.step(depends_on=["approval"])
def pay(ctx: StepContext, approval: Any) -> Any:
    return approval


REGISTRY = WorkflowRegistry([racing])


def definition_of(name: str, version: int) -> Workflow | None:
    return racing if (name, version) == (racing.name, racing.version) else None


# --- the racers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Racer:
    """One side: ``work`` runs in its own transaction; ``label`` names it in reports."""

    label: str
    work: Callable[[Connection], Any]


def _is_event_lock(statement: str, parameters: Any) -> bool:
    """The event lock statement (or its no-op stand-in in the mutation check): the
    advisory lock whose class is EVENT_LOCK, not an execution's finish lock."""
    values = parameters.values() if isinstance(parameters, dict) else parameters or ()
    return ("pg_advisory_xact_lock" in statement or "no_event_lock" in statement) and (
        EVENT_LOCK in list(values)
    )


def _waiting_on_lock(monitor: Connection, pid: int) -> bool:
    """Whether backend ``pid`` is queued for an advisory lock it does not hold yet."""
    found = monitor.execute(
        text("SELECT 1 FROM pg_locks WHERE pid = :pid AND locktype = 'advisory' AND NOT granted"),
        {"pid": pid},
    ).first()
    return found is not None


def race(engine: Engine, racers: Sequence[Racer], *, hold_commits: bool = False) -> list[Any]:
    """Run every racer at once, each held just before its event lock until all have come
    that far, then let them at it in the given order: each next once the one before has
    the lock or is queued for it. ``hold_commits``: also hold every commit until all
    have reached theirs (only possible when nothing serialises them: the mutation)."""
    count = len(racers)
    at_lock = threading.Barrier(count + 1)  # the racers and the conductor
    at_commit = threading.Barrier(count)
    turns = [threading.Event() for _ in racers]
    locked = [threading.Event() for _ in racers]
    pids: list[int | None] = [None] * count
    failed = threading.Event()

    def run(index: int) -> Any:
        racer = racers[index]
        with engine.connect() as conn:
            pids[index] = conn.connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
            reached = [False]

            def before(_c: Connection, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
                if not reached[0] and _is_event_lock(statement, params):
                    reached[0] = True
                    at_lock.wait(timeout=TIMEOUT)
                    if not turns[index].wait(timeout=TIMEOUT):
                        raise TimeoutError(f"{racer.label}: its turn never came")

            def after(_c: Connection, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
                if _is_event_lock(statement, params):
                    locked[index].set()

            def commit(_c: Connection) -> None:
                if hold_commits:
                    at_commit.wait(timeout=TIMEOUT)

            event.listen(conn, "before_cursor_execute", before)
            event.listen(conn, "after_cursor_execute", after)
            event.listen(conn, "commit", commit)
            try:
                with conn.begin():
                    result = racer.work(conn)
                if not reached[0]:
                    raise AssertionError(f"{racer.label} never took the event lock")
                return result
            except BaseException:
                failed.set()
                at_lock.abort()
                at_commit.abort()
                raise

    def conduct() -> None:
        """Let the racers at the lock one by one, in order."""
        at_lock.wait(timeout=TIMEOUT)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as monitor:
            for index in range(count):
                turns[index].set()
                deadline = time.monotonic() + TIMEOUT
                pid = pids[index]
                assert pid is not None
                while not (locked[index].is_set() or _waiting_on_lock(monitor, pid)):
                    if failed.is_set():
                        return
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{racers[index].label} neither took nor queued")
                    time.sleep(0.001)

    with ThreadPoolExecutor(count + 1) as pool:
        conductor = pool.submit(conduct)
        futures = [pool.submit(run, index) for index in range(count)]
        results = [future.result(timeout=3 * TIMEOUT) for future in futures]
        conductor.result(timeout=3 * TIMEOUT)
    return results


# --- the setting -----------------------------------------------------------------------


def claimed_requests(waits_count: int, key: str) -> list[Claim]:
    """``waits_count`` running executions of ``racing`` for ``key``, each with its
    ``request`` step claimed (what a worker holds before completing it)."""
    database = get_database()
    news = [
        execution_of(
            REGISTRY,
            racing.name,
            {"key": key},
            max_payload_bytes=database.settings.max_payload_bytes,
        )
        for _ in range(waits_count)
    ]
    with database.engine.begin() as conn:
        ids = [c.execution_id for c in create_executions(conn, news)]
    with database.engine.begin() as conn:
        admission, _ = waits.admit(conn, racing, ids, definition_of)
    assert sorted(admission.started) == sorted(ids)
    claims = []
    for execution_id in ids:
        with database.engine.begin() as conn:
            claim = steps.claim(conn, execution_id, "request", "racer", None, (), lambda _r: ())
        assert claim is not None
        claims.append(claim)
    return claims


def establishing(claim: Claim, key: str) -> Racer:
    """Side A: the completion of ``request`` that enters and establishes the wait."""

    def work(conn: Connection) -> Any:
        output = {"key": key}
        done = steps.complete(
            conn, claim, output, f'{{"key": "{key}"}}', racing, None, definition_of
        )
        assert done.transition.applied
        return done

    return Racer(f"complete {claim.execution_id[:8]}", work)


def sending(key: str, number: int) -> Racer:
    """Side B: ``send_event`` for the same (name, key)."""

    def work(conn: Connection) -> Any:
        return events.send_event(
            conn,
            EVENT,
            key,
            {"n": number},
            ttl_seconds=3600,
            definition_of=definition_of,
        )

    return Racer(f"send #{number}", work)


@dataclass(frozen=True)
class Outcome:
    """What the race left: completed waits, open waits, consumed and open events."""

    completed: dict[str, Any]  # execution -> the wait's output
    open_waits: list[str]
    consumed: list[tuple[str, Any]]  # (consuming execution, payload)
    open_events: list[Any]
    completions: Counter[str]  # execution -> events waiting -> succeeded of the wait


def outcome_of(execution_ids: Sequence[str], key: str) -> Outcome:
    with get_database().engine.connect() as conn:
        wait_rows = conn.execute(
            select(
                StepExecution.execution_id, StepExecution.status, StepExecution.output_data
            ).where(
                StepExecution.execution_id.in_(execution_ids),
                StepExecution.step_name == "approval",
            )
        ).all()
        inbox = conn.execute(
            select(InboxEvent.consumed_by_execution, InboxEvent.payload).where(
                InboxEvent.name == EVENT, InboxEvent.event_key == key
            )
        ).all()
        ended = conn.execute(
            select(ExecutionEvent.execution_id).where(
                ExecutionEvent.execution_id.in_(execution_ids),
                ExecutionEvent.step_name == "approval",
                ExecutionEvent.from_status == "waiting",
                ExecutionEvent.to_status == "succeeded",
            )
        ).scalars()
        completions = Counter(ended)
    statuses = {r.execution_id: r.status for r in wait_rows}
    assert set(statuses.values()) <= {"waiting", "succeeded"}, statuses
    return Outcome(
        completed={r.execution_id: r.output_data for r in wait_rows if r.status == "succeeded"},
        open_waits=[e for e, s in statuses.items() if s == "waiting"],
        consumed=[(r.consumed_by_execution, r.payload) for r in inbox if r.consumed_by_execution],
        open_events=[r.payload for r in inbox if r.consumed_by_execution is None],
        completions=completions,
    )


def lost(outcome: Outcome) -> bool:
    """An event left open while a wait for it is left open: neither saw the other."""
    return bool(outcome.open_events) and bool(outcome.open_waits)


def took(side: str, result: Any) -> bool:
    """Whether a racer found the other side there: a completion whose wait ended at once
    on an event already sent, a send that a wait consumed."""
    if side == "A":
        woken = result.woken.woken if result.woken is not None else []
        return any(how == "event" for _, _, how in woken)
    receipt, _ = result
    return receipt.consumed_by is not None


def expected_takes(order: Sequence[str]) -> list[bool]:
    """What each racer finds when the lock lets them through one at a time in ``order``:
    a wait finds an event iff one is left open, and a send a wait iff one is armed."""
    open_waits = open_events = 0
    found = []
    for side in order:
        if side == "A":
            found.append(open_events > 0)
            open_events, open_waits = (
                (open_events - 1, open_waits) if open_events else (0, open_waits + 1)
            )
        else:
            found.append(open_waits > 0)
            open_waits, open_events = (
                (open_waits - 1, open_events) if open_waits else (0, open_events + 1)
            )
    return found


def run_race(order: Sequence[str], hold_commits: bool = False) -> tuple[Outcome, list[bool]]:
    """One race: a completion establishing a wait for each "A" of ``order`` and a send
    for each "B", for one fresh key, let at the event lock in that order. What the race
    left, and what each racer found (``took``)."""
    key = f"k-{uuid.uuid4().hex[:12]}"
    claims = claimed_requests(order.count("A"), key)
    sides = {
        "A": iter([establishing(claim, key) for claim in claims]),
        "B": iter([sending(key, number) for number in range(order.count("B"))]),
    }
    racers = [next(sides[side]) for side in order]
    results = race(get_database().engine, racers, hold_commits=hold_commits)
    found = [took(side, result) for side, result in zip(order, results, strict=True)]
    return outcome_of([c.execution_id for c in claims], key), found


def check(outcome: Outcome, waits_count: int, events: int) -> None:
    """The guarantees: each wait completes at most once, by the one event it consumed;
    no event is consumed twice; none is lost."""
    note = f"{outcome}"
    # Each completed wait: one event waiting -> succeeded, and nothing for the others.
    assert all(outcome.completions[e] == 1 for e in outcome.completed), note
    assert sum(outcome.completions.values()) == len(outcome.completed), note
    consumers = Counter(execution for execution, _ in outcome.consumed)
    assert all(n == 1 for n in consumers.values()), f"a wait consumed two events: {note}"
    assert set(consumers) == set(outcome.completed), note
    # The wait's output is the payload of the event it consumed.
    for execution, payload in outcome.consumed:
        assert outcome.completed[execution] == payload, note
    # None lost: as many completions as there could be, the rest open on one side only.
    assert len(outcome.completed) == min(waits_count, events), note
    assert len(outcome.consumed) + len(outcome.open_events) == events, note
    assert not lost(outcome), f"an event and a wait for it are both left open: {note}"


# --- the tests -------------------------------------------------------------------------


@st.composite
def orders(draw: st.DrawFn) -> tuple[str, ...]:
    """1-3 waits and 1-3 events, in the order their racers reach the lock."""
    waits_count = draw(st.integers(1, 3))
    events = draw(st.integers(1, 3))
    return tuple(draw(st.permutations(["A"] * waits_count + ["B"] * events)))


@settings(
    # Every order of 1-3 waits and 1-3 events is one of 62; most are drawn.
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(order=orders())
def test_an_event_racing_its_wait_is_consumed_once_and_never_lost(
    database: TestDatabase, order: tuple[str, ...]
) -> None:
    outcome, found = run_race(order)
    check(outcome, order.count("A"), order.count("B"))
    # The racers went through in the drawn order: each found what came before it.
    assert found == expected_takes(order), (order, outcome)


@pytest.fixture
def no_event_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """core.waits (establishing) and core.events (sending) with an event lock statement
    that locks nothing (the class stays a parameter, so that the racers are held at the
    same place)."""
    statements = dataclasses.replace(
        wait_statements(), event_lock=select(literal(EVENT_LOCK).label("no_event_lock"))
    )
    monkeypatch.setattr(waits, "wait_statements", lambda: statements)
    monkeypatch.setattr(events, "wait_statements", lambda: statements)


FORCED = [("A", "B"), ("B", "A"), ("A", "B", "B"), ("B", "A", "A"), ("A", "B", "A", "B")]


def test_without_the_event_lock_the_race_loses_an_event(
    database: TestDatabase, no_event_lock: None
) -> None:
    """The mutation check: with the lock gone, every racer's check runs before any
    commits in these forced interleavings, and an event is left open beside an open
    wait for it, which the guarantees' check refuses. Proof that the racers meet inside
    the window the lock closes."""
    for order in FORCED:
        outcome, found = run_race(order, hold_commits=True)
        assert lost(outcome), f"{order}: no event lost without the lock: {outcome}"
        assert not any(found), "each side missed the other"
        with pytest.raises(AssertionError):
            check(outcome, order.count("A"), order.count("B"))


def test_the_forced_interleavings_are_safe_with_the_lock(database: TestDatabase) -> None:
    """The same interleavings with the lock in place (commits not held: the lock
    serialises them)."""
    for order in itertools.chain(FORCED, [("B", "B", "A", "A", "A")]):
        outcome, found = run_race(order)
        check(outcome, order.count("A"), order.count("B"))
        assert found == expected_takes(order), (order, outcome)
