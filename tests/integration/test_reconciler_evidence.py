"""The reconciler judges on evidence: a stall only on time the database was reachable
(``database_liveness``), a republish only when the step's last message is older than a
delay that doubles with each re-send.

Passes run through core alone (no broker, no worker): what a pass decides is what is
under test. Time is moved by writing the rows' timestamps back, not by sleeping.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Interval, func, literal, select, update

from core import executions, reconciler
from core import statements as sql
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.executions import StepSpec
from core.models import DatabaseLiveness, StepExecution, WorkflowExecution
from core.outcomes import ReconcileReport
from core.statements import REPUBLISH_BACKOFF_MAX, START_BACKOFF_MAX
from tests.conftest import TestDatabase
from tests.helpers.state import (
    database_reachable_for,
    events,
    execution_row,
    force_execution_status,
    force_step_status,
    insert_execution,
    step_row,
)

SE = StepExecution
WE = WorkflowExecution
DL = DatabaseLiveness
STALL_TIMEOUT = 5.0
GAP = 2.5
REPUBLISH_AFTER = 60.0


def _pass(
    manager: SyncEnhancedExecutionStateManager,
    republish_after: float = 3600.0,
    start_after: float = 3600.0,
) -> ReconcileReport:
    report: ReconcileReport = manager.run(
        reconciler.reconcile_pass,
        stall_timeout=STALL_TIMEOUT,
        republish_after=republish_after,
        start_after=start_after,
        limit=1000,
        max_recoveries=3,
        dag_of=lambda _workflow, _version: None,
        gap=GAP,
    )
    return report


def _stale_running_step(manager: SyncEnhancedExecutionStateManager) -> str:
    """An execution whose one step runs on a worker that last beat an hour ago."""
    execution_id = insert_execution("w", {}, steps=[StepSpec("s")])
    manager.transition_execution(execution_id, "running")
    manager.transition_steps(execution_id, None, "queued")
    assert manager.claim_step(execution_id, "s", worker="host:1", celery_task_id=None)
    force_step_status(
        execution_id, "s", "running", heartbeat_at=datetime.now(UTC) - timedelta(hours=1)
    )
    return execution_id


def _liveness(manager: SyncEnhancedExecutionStateManager) -> Any:
    return manager.run(lambda conn: conn.execute(select(DL)).one_or_none())


def _set_liveness(manager: SyncEnhancedExecutionStateManager, **values: Any) -> None:
    manager.run(lambda conn: conn.execute(update(DL).where(DL.id == 1).values(**values)))


# --- hole 9: a stall is judged on time the database was reachable --------------------


def test_a_pass_after_a_gap_in_sightings_takes_no_step(database: TestDatabase) -> None:
    # Reachable for an hour, then unseen for a minute (down, in crash recovery, hung or
    # partitioned: no pass could reach it). Heartbeats are an hour old, and that says
    # nothing about the worker: it could not write either.
    manager = SyncEnhancedExecutionStateManager()
    execution_id = _stale_running_step(manager)
    database_reachable_for(3600)
    _set_liveness(manager, last_seen_at=datetime.now(UTC) - timedelta(minutes=1))

    first = _pass(manager)

    assert first.requeued == [], "a step was taken after an outage, its worker maybe alive"
    assert step_row(execution_id, "s")["status"] == "running"
    seen = _liveness(manager)
    # The outage ended now: reachable since this pass's sighting.
    assert abs(seen.last_seen_at - seen.reachable_since) < timedelta(seconds=1)
    # Once the database has been reachable for a whole stall timeout and the worker has
    # still not beaten, it is gone: its step is taken back.
    _set_liveness(manager, reachable_since=datetime.now(UTC) - timedelta(seconds=STALL_TIMEOUT + 1))
    assert _pass(manager).requeued == [(execution_id, "s")]


def test_the_first_pass_ever_takes_no_step(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    execution_id = _stale_running_step(manager)
    assert _liveness(manager) is None

    assert _pass(manager).requeued == []

    seen = _liveness(manager)
    assert seen is not None, "the first pass recorded no sighting"
    assert abs(seen.last_seen_at - seen.reachable_since) < timedelta(seconds=1)
    assert step_row(execution_id, "s")["status"] == "running"


def test_passes_within_the_gap_keep_the_database_reachable(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    execution_id = _stale_running_step(manager)
    database_reachable_for(STALL_TIMEOUT)
    _set_liveness(manager, last_seen_at=datetime.now(UTC) - timedelta(seconds=GAP / 2))

    assert _pass(manager).requeued == [(execution_id, "s")]


def test_a_scan_on_a_stale_sighting_judges_nothing(database: TestDatabase) -> None:
    # A pass held up between its sighting and its scan (a server hung in between) finds
    # its own sighting older than the gap on the scan's clock: it judges nothing.
    manager = SyncEnhancedExecutionStateManager()
    _stale_running_step(manager)
    database_reachable_for(3600)
    _set_liveness(manager, last_seen_at=datetime.now(UTC) - timedelta(seconds=GAP * 2))

    def scan(conn: Connection) -> list[Any]:
        return list(conn.execute(sql.stalled_steps(STALL_TIMEOUT, GAP, 100)).all())

    assert manager.run(scan) == []


def test_the_gap_is_half_the_stall_timeout_and_at_least_two_passes() -> None:
    assert reconciler.outage_gap(60.0, 5.0) == 30.0
    assert reconciler.outage_gap(4.0, 1.0) == 2.0
    assert reconciler.outage_gap(5.0, 5.0) == 10.0
    assert reconciler.outage_gap(10.0) == 5.0


# --- hole 14: republishing backs off ----------------------------------------------------


def _shift_back(conn: Connection, seconds: float) -> None:
    """Move every step's queued_at and republished_at ``seconds`` into the past: as if
    that much time went by before the next pass."""
    if conn.dialect.name == "postgresql":
        delta = literal(timedelta(seconds=seconds), Interval())
        values = {"queued_at": SE.queued_at - delta, "republished_at": SE.republished_at - delta}
    else:

        def back(column: Any) -> Any:
            return func.strftime("%Y-%m-%d %H:%M:%f", column, f"-{seconds} seconds") + "000"

        values = {"queued_at": back(SE.queued_at), "republished_at": back(SE.republished_at)}
    conn.execute(update(SE).values(values))


def _backlog(manager: SyncEnhancedExecutionStateManager, executions: int, steps: int) -> list[str]:
    ids = []
    for _ in range(executions):
        execution_id = insert_execution("w", {}, steps=[StepSpec(f"s{i}") for i in range(steps)])
        manager.transition_execution(execution_id, "running")
        manager.transition_steps(execution_id, None, "queued")
        ids.append(execution_id)
    return ids


def test_a_deep_backlog_is_republished_with_a_doubling_delay(database: TestDatabase) -> None:
    # 200 queued steps that no worker takes (they wait behind a backlog), 16 passes one
    # republish delay apart: each step's message is re-sent after 1, 3, 7 and 15 delays
    # (the delay doubles: 1, 2, 4, 8), not on every pass.
    manager = SyncEnhancedExecutionStateManager()
    ids = _backlog(manager, executions=20, steps=10)
    passes = 16
    sent: Counter[tuple[str, str]] = Counter()
    queued_at = {}
    kept: list[bool] = []
    for number in range(1, passes + 1):
        manager.run(_shift_back, REPUBLISH_AFTER)
        if number == 1:
            queued_at = {
                (eid, f"s{i}"): step_row(eid, f"s{i}")["queued_at"]
                for eid in ids
                for i in range(10)
            }
        report = _pass(manager, republish_after=REPUBLISH_AFTER)
        sent.update(report.republish)
        if number == 1:
            kept = [step_row(eid, name)["queued_at"] == at for (eid, name), at in queued_at.items()]

    most = math.ceil(math.log2(passes))
    assert len(sent) == 200
    assert max(sent.values()) <= most, (
        f"a step was republished {max(sent.values())} times in {passes} passes"
    )
    assert set(sent.values()) == {4}
    assert all(step_row(eid, "s0")["republishes"] == 4 for eid in ids)
    # A re-send leaves queued_at (where the queue-wait metric starts) alone.
    assert all(kept)
    assert all(
        sum(1 for e in events(eid) if e[1:] == ("queued", "queued")) == 4 * 10 for eid in ids
    )


def test_the_delay_stops_doubling_at_its_cap(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    (execution_id,) = _backlog(manager, executions=1, steps=1)
    force_step_status(execution_id, "s0", "queued", republishes=10)
    manager.run(_shift_back, REPUBLISH_AFTER * REPUBLISH_BACKOFF_MAX - 1)
    assert _pass(manager, republish_after=REPUBLISH_AFTER).republish == []
    manager.run(_shift_back, 2)
    assert _pass(manager, republish_after=REPUBLISH_AFTER).republish == [(execution_id, "s0")]
    assert step_row(execution_id, "s0")["republishes"] == 11


def test_a_step_queued_anew_starts_its_republish_count_again(database: TestDatabase) -> None:
    # A stall recovery queues the step for another attempt: no message of that attempt
    # was re-sent yet, so its backoff starts from one delay again.
    manager = SyncEnhancedExecutionStateManager()
    (execution_id,) = _backlog(manager, executions=1, steps=1)
    force_step_status(execution_id, "s0", "queued", republishes=3, republished_at=datetime.now(UTC))
    assert manager.claim_step(execution_id, "s0", worker="host:1", celery_task_id=None)
    force_step_status(
        execution_id, "s0", "running", heartbeat_at=datetime.now(UTC) - timedelta(hours=1)
    )
    database_reachable_for(3600)
    assert _pass(manager).requeued == [(execution_id, "s0")]
    row = step_row(execution_id, "s0")
    assert (row["status"], row["republishes"], row["republished_at"]) == ("queued", 0, None)


# --- hole 14: start messages of pending executions back off too -------------------------

START_AFTER = 30.0


def _shift_executions_back(conn: Connection, seconds: float) -> None:
    """Move every execution's updated_at and start_resent_at ``seconds`` into the past:
    as if that much time went by before the next pass."""
    columns = ("updated_at", "start_resent_at")
    if conn.dialect.name == "postgresql":
        delta = literal(timedelta(seconds=seconds), Interval())
        values = {name: WE.__table__.c[name] - delta for name in columns}
    else:
        values = {
            name: func.strftime("%Y-%m-%d %H:%M:%f", WE.__table__.c[name], f"-{seconds} seconds")
            + "000"
            for name in columns
        }
    conn.execute(update(WE).values(values))


def _pending(executions: int) -> list[str]:
    return [insert_execution("w", {}, steps=[StepSpec("s")]) for _ in range(executions)]


def test_a_deep_backlog_of_pending_executions_gets_its_starts_with_a_doubling_delay(
    database: TestDatabase,
) -> None:
    # 200 pending executions whose start messages wait behind a backlog (or a
    # max_concurrency limit), 16 passes one start delay apart: each start is re-sent
    # after 1, 3, 7 and 15 delays (the delay doubles: 1, 2, 4, 8), not on every pass.
    manager = SyncEnhancedExecutionStateManager()
    ids = _pending(200)
    passes = 16
    sent: Counter[str] = Counter()
    for _ in range(passes):
        manager.run(_shift_executions_back, START_AFTER)
        report = _pass(manager, start_after=START_AFTER)
        sent.update(execution_id for execution_id, _workflow, _priority in report.start)

    most = math.ceil(math.log2(passes))
    assert set(sent) == set(ids)
    assert max(sent.values()) <= most, (
        f"a start was re-sent {max(sent.values())} times in {passes} passes"
    )
    assert set(sent.values()) == {4}
    assert {execution_row(eid)["starts_resent"] for eid in ids} == {4}


def test_the_start_delay_stops_doubling_at_its_cap(database: TestDatabase) -> None:
    manager = SyncEnhancedExecutionStateManager()
    (execution_id,) = _pending(1)
    manager.run(
        lambda conn: conn.execute(
            update(WE).values(starts_resent=10, start_resent_at=datetime.now(UTC))
        )
    )
    manager.run(_shift_executions_back, START_AFTER * START_BACKOFF_MAX - 1)
    assert _pass(manager, start_after=START_AFTER).start == []
    manager.run(_shift_executions_back, 2)
    assert [s[0] for s in _pass(manager, start_after=START_AFTER).start] == [execution_id]
    assert execution_row(execution_id)["starts_resent"] == 11


def test_a_retried_execution_starts_its_start_count_again(database: TestDatabase) -> None:
    # Its start was re-sent 3 times while it was pending before; it ran, failed and is
    # retried: pending again, a new start message, and its backoff from one delay again.
    manager = SyncEnhancedExecutionStateManager()
    (execution_id,) = _pending(1)
    for _ in range(3):
        manager.run(_shift_executions_back, START_AFTER * 8)
        assert [s[0] for s in _pass(manager, start_after=START_AFTER).start] == [execution_id]
    assert execution_row(execution_id)["starts_resent"] == 3
    manager.transition_execution(execution_id, "running")
    force_execution_status(execution_id, "failed")

    retried = manager.run(executions.retry_execution, execution_id, {"s": []}, None)

    assert retried.applied
    row = execution_row(execution_id)
    assert (row["status"], row["starts_resent"], row["start_resent_at"]) == ("pending", 0, None)
    assert _pass(manager, start_after=START_AFTER).start == []
    manager.run(_shift_executions_back, START_AFTER + 1)
    assert [s[0] for s in _pass(manager, start_after=START_AFTER).start] == [execution_id]
    assert execution_row(execution_id)["starts_resent"] == 1


def test_an_unsent_start_is_due_again_at_the_next_pass(database: TestDatabase) -> None:
    # The pass committed the re-send, then its publish failed: nothing was sent, so the
    # start is as the pass found it, due at once, and no backoff was spent.
    manager = SyncEnhancedExecutionStateManager()
    (execution_id,) = _pending(1)
    manager.run(_shift_executions_back, START_AFTER + 1)
    report = _pass(manager, start_after=START_AFTER)
    assert [s[0] for s in report.start] == [execution_id]
    assert execution_row(execution_id)["starts_resent"] == 1

    restored = manager.run(reconciler.restore_unsent_starts, [report.unsent_starts[execution_id]])

    assert restored == 1
    row = execution_row(execution_id)
    assert (row["starts_resent"], row["start_resent_at"]) == (0, None)
    assert [s[0] for s in _pass(manager, start_after=START_AFTER).start] == [execution_id]
    assert execution_row(execution_id)["starts_resent"] == 1
