"""The waker (``core.waker.wake_due``): with nothing due it reads the due index once and
the next wake time once and writes nothing; it takes at most its limit; overlapping
wakers take disjoint rows (PostgreSQL: ``FOR UPDATE SKIP LOCKED``); it reports when
the next wait falls due."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, event, select, update

from core import waits, waker
from core.database import get_database
from core.executions import create_executions, execution_of
from core.models import ExecutionEvent, StepExecution
from core.registry import WorkflowRegistry
from core.sql import utcnow
from core.workflows import StepContext, Workflow
from tests.conftest import TestDatabase

sleeper = Workflow("waker-sleeper")
sleeper.sleep("nap", duration=timedelta(hours=1))


@sleeper.step(depends_on=["nap"])
def after(ctx: StepContext, nap: str) -> str:
    return nap


REGISTRY = WorkflowRegistry([sleeper])
LIMIT = 3


def definition_of(name: str, version: int) -> Workflow | None:
    return sleeper if (name, version) == (sleeper.name, sleeper.version) else None


def sleeping(count: int) -> list[str]:
    """``count`` running executions of ``sleeper``, each asleep for an hour."""
    database = get_database()
    news = [
        execution_of(
            REGISTRY, sleeper.name, {"i": i}, max_payload_bytes=database.settings.max_payload_bytes
        )
        for i in range(count)
    ]
    with database.engine.begin() as conn:
        ids = [c.execution_id for c in create_executions(conn, news)]
    with database.engine.begin() as conn:
        admission, armed = waits.admit(conn, sleeper, ids, definition_of)
    assert sorted(admission.started) == sorted(ids)
    assert armed.woken == []  # an hour away: armed, not ended
    return ids


def fall_due(execution_ids: Sequence[str]) -> None:
    """Move the naps' wake time a minute into the past (test setup: as if the hour had
    passed), by the database's clock, which the waker compares with."""
    with get_database().engine.begin() as conn:
        conn.execute(
            update(StepExecution)
            .where(StepExecution.execution_id.in_(execution_ids), StepExecution.step_name == "nap")
            .values(wake_at=utcnow(-60))
        )


def naps(execution_ids: Sequence[str]) -> dict[str, Any]:
    """Each execution's nap row: (status, wake_at, updated_at)."""
    with get_database().engine.connect() as conn:
        rows = conn.execute(
            select(
                StepExecution.execution_id,
                StepExecution.status,
                StepExecution.wake_at,
                StepExecution.updated_at,
            ).where(StepExecution.execution_id.in_(execution_ids), StepExecution.step_name == "nap")
        ).all()
    return {r.execution_id: (r.status, r.wake_at, r.updated_at) for r in rows}


def woken_events(execution_ids: Sequence[str]) -> list[str]:
    """The executions whose nap has a waiting -> succeeded event, once per event."""
    with get_database().engine.connect() as conn:
        return list(
            conn.execute(
                select(ExecutionEvent.execution_id).where(
                    ExecutionEvent.execution_id.in_(execution_ids),
                    ExecutionEvent.step_name == "nap",
                    ExecutionEvent.from_status == "waiting",
                    ExecutionEvent.to_status == "succeeded",
                )
            ).scalars()
        )


@contextmanager
def counted(conn: Connection) -> Iterator[list[str]]:
    """The statements ``conn`` sends during the block."""
    sent: list[str] = []

    def before(_c: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(conn, "before_cursor_execute", before)
    try:
        yield sent
    finally:
        event.remove(conn, "before_cursor_execute", before)


def test_with_nothing_due_the_waker_reads_twice_and_writes_nothing(
    database: TestDatabase,
) -> None:
    ids = sleeping(4)
    before = naps(ids)
    with get_database().engine.begin() as conn, counted(conn) as sent:
        outcome = waker.wake_due(conn, LIMIT, definition_of)
    # The due scan (ix_execution_steps_waiting_wake), then the next wake time: no write.
    assert len(sent) == 2, sent
    assert all(s.lstrip().upper().startswith("SELECT") for s in sent), sent
    assert "min(" in sent[1].lower()
    assert outcome.taken == 0
    assert (outcome.queued, outcome.woken, outcome.finished) == ([], [], [])
    assert naps(ids) == before
    assert woken_events(ids) == []
    # When the next one falls due: the earliest wake time.
    assert outcome.next_due == min(wake_at for _, wake_at, _ in before.values())


def test_a_limit_of_three_takes_three_of_ten_due(database: TestDatabase) -> None:
    ids = sleeping(10)
    fall_due(ids)
    with get_database().engine.begin() as conn:
        outcome = waker.wake_due(conn, LIMIT, definition_of)
    assert outcome.taken == LIMIT
    # A full batch: more may be due, so no next wake time is read.
    assert outcome.next_due is None
    woken = woken_events(ids)
    assert len(woken) == LIMIT
    assert sorted(woken) == sorted({e for e, _ in outcome.queued})
    assert [s for s, _, _ in naps(ids).values()].count("succeeded") == LIMIT

    # The next passes take the rest, the last one short, with nothing due after it.
    taken = [LIMIT]
    while taken[-1] == LIMIT:
        with get_database().engine.begin() as conn:
            more = waker.wake_due(conn, LIMIT, definition_of)
        taken.append(more.taken)
    assert taken == [3, 3, 3, 1]
    assert more.next_due is None
    assert sorted(woken_events(ids)) == sorted(ids)


@pytest.mark.postgresql_only
def test_overlapping_wakers_take_disjoint_rows(database: TestDatabase) -> None:
    ids = sleeping(10)
    fall_due(ids)
    engine = get_database().engine
    with engine.connect() as first, engine.connect() as second, first.begin():
        one = waker.wake_due(first, 4, definition_of)
        # The first waker's transaction is still open, its rows locked: the second
        # skips them without waiting for it.
        with second.begin():
            two = waker.wake_due(second, 10, definition_of)
    assert (one.taken, two.taken) == (4, 6)
    ones = {e for e, _ in one.queued}
    twos = {e for e, _ in two.queued}
    assert not ones & twos
    assert ones | twos == set(ids)
    assert sorted(woken_events(ids)) == sorted(ids)


def test_the_next_wake_time_is_reported_after_a_short_batch(database: TestDatabase) -> None:
    due = sleeping(2)
    later = sleeping(3)
    fall_due(due)
    with get_database().engine.begin() as conn:
        outcome = waker.wake_due(conn, LIMIT, definition_of)
    assert outcome.taken == 2
    assert outcome.next_due == min(wake_at for _, wake_at, _ in naps(later).values())
    assert sorted(woken_events(due + later)) == sorted(due)


def test_a_due_wait_of_a_workflow_this_process_does_not_know_is_put_off_not_failed(
    database: TestDatabase,
) -> None:
    ids = sleeping(2)
    fall_due(ids)
    with get_database().engine.begin() as conn:
        outcome = waker.wake_due(conn, LIMIT, lambda _name, _version: None)
    assert outcome.taken == 2
    assert (outcome.queued, outcome.woken, outcome.finished) == ([], [], [])
    # Still waiting, due again later for a waker that knows the workflow, which then
    # wakes it as usual.
    rows = naps(ids)
    assert {status for status, _, _ in rows.values()} == {"waiting"}
    with get_database().engine.begin() as conn:
        assert waker.wake_due(conn, LIMIT, definition_of).taken == 0
    fall_due(ids)
    with get_database().engine.begin() as conn:
        assert waker.wake_due(conn, LIMIT, definition_of).taken == 2
    assert sorted(woken_events(ids)) == sorted(ids)
