"""Bursts finish in order: steps of running executions go ahead of starting new ones
(CONVEYOR_ORDER=depth_first), priorities still win, and breadth_first keeps the old order."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery.signals import before_task_publish
from sqlalchemy import func, select

from core.database import get_db_session
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from tests.e2e.conftest import running_worker, wait_for
from worker.app import ConveyorCelery
from worker.engine import START_BATCH, START_BATCH_SIZE
from worker.producer import enqueue, enqueue_many

BURST = 40


def _times(column: Any, execution_ids: list[str], step: str | None = None) -> list[datetime]:
    model = StepExecution if step else WorkflowExecution
    query = select(model.execution_id, column).where(model.execution_id.in_(execution_ids))
    if step:
        query = query.where(StepExecution.step_name == step)
    with get_db_session() as db:
        found = dict(db.execute(query).all())
    return [found[i] for i in execution_ids]


def finished_at(execution_ids: list[str]) -> list[datetime]:
    """When each execution finished, in the order of ``execution_ids``."""
    return _times(WorkflowExecution.finished_at, execution_ids)


def admitted_at(execution_ids: list[str]) -> list[datetime]:
    """When each execution was started (admitted), in the order of ``execution_ids``."""
    return _times(WorkflowExecution.started_at, execution_ids)


def spearman(values: list[datetime]) -> float:
    """Rank correlation of ``values`` with their positions (1.0: the same order)."""
    ranks = {
        index: rank for rank, index in enumerate(sorted(range(len(values)), key=values.__getitem__))
    }
    n = len(values)
    squared = sum((position - ranks[position]) ** 2 for position in range(n))
    return 1 - 6 * squared / (n * (n * n - 1))


def run_burst(app: ConveyorCelery) -> list[str]:
    # Every start message is queued before a worker runs, as in a burst.
    ids = enqueue_many("short_chain", [None] * BURST, app=app)
    with running_worker(app, concurrency=2):
        for execution_id in ids:
            wait_for(execution_id, timeout=60)
    return ids


def test_a_burst_finishes_in_the_order_it_came(conveyor_app: ConveyorCelery) -> None:
    ids = run_burst(conveyor_app)
    finished = finished_at(ids)
    admitted = admitted_at(ids)

    assert spearman(finished) >= 0.9, finished
    # Results flow out from the start: the first tenth was done before the second half
    # of the burst was even admitted, and the first execution before the last one.
    assert max(finished[: BURST // 10]) < min(admitted[BURST // 2 :])
    assert finished[0] < admitted[-1]


def test_breadth_first_starts_everything_first(conveyor_app: ConveyorCelery) -> None:
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"order": "breadth_first"})
    ids = run_burst(conveyor_app)
    # Arrival order: every start message was queued ahead of the steps they released, so
    # the last execution was admitted before the first one was done.
    assert admitted_at(ids)[-1] < finished_at(ids)[0]


def test_a_higher_priority_still_goes_first(conveyor_app: ConveyorCelery) -> None:
    low = enqueue_many("short_chain", [None] * 10, priority=0, app=conveyor_app)
    high = enqueue("short_chain", priority=9, app=conveyor_app)
    with running_worker(conveyor_app, concurrency=1):
        wait_for(high, timeout=60)
        for execution_id in low:
            wait_for(execution_id, timeout=60)
    # Enqueued last, it started ahead of the steps of the executions already running.
    assert finished_at([high])[0] < max(finished_at(low))
    assert sum(1 for at in finished_at(low) if at < finished_at([high])[0]) <= 1


def _published(app: ConveyorCelery, run: Any) -> list[str]:
    """The task names ``run()`` published, in order."""
    names: list[str] = []

    def seen(sender: str | None = None, **_: Any) -> None:
        names.append(str(sender))

    before_task_publish.connect(seen, weak=False)
    try:
        run()
    finally:
        before_task_publish.disconnect(seen)
    return names


def _created_events(execution_ids: list[str]) -> dict[str, int]:
    """How many times each execution was started (pending -> running events)."""
    query = (
        select(ExecutionEvent.execution_id, func.count())
        .where(
            ExecutionEvent.execution_id.in_(execution_ids),
            ExecutionEvent.step_name.is_(None),
            ExecutionEvent.to_status == "running",
        )
        .group_by(ExecutionEvent.execution_id)
    )
    with get_db_session() as db:
        return {row[0]: row[1] for row in db.execute(query).all()}


def test_enqueue_many_sends_batches_that_workers_split_and_a_duplicate_is_a_no_op(
    conveyor_app: ConveyorCelery,
) -> None:
    count = START_BATCH_SIZE + 3  # two batches: a full one and a short one
    ids: list[str] = []
    names = _published(
        conveyor_app,
        lambda: ids.extend(enqueue_many("short_chain", [None] * count, app=conveyor_app)),
    )
    assert names == [START_BATCH, START_BATCH]
    # The same batches delivered again (a worker killed while splitting one): every
    # start after the first of an execution finds it admitted and does nothing.
    conveyor_app.engine.publish_starts(
        [(execution_id, "short_chain", 0) for execution_id in ids], batched=True
    )
    with running_worker(conveyor_app, concurrency=4):
        for execution_id in ids:
            assert wait_for(execution_id, timeout=120).status == "succeeded"
    assert _created_events(ids) == dict.fromkeys(ids, 1)
    with get_db_session() as db:
        attempts = db.execute(
            select(func.max(StepExecution.attempt)).where(StepExecution.execution_id.in_(ids))
        ).scalar_one()
    assert attempts == 1


def test_a_lost_start_batch_is_recovered_by_the_reconciler(
    conveyor_app: ConveyorCelery,
) -> None:
    ids = enqueue_many("short_chain", [None] * 20, app=conveyor_app)
    conveyor_app.control.purge()  # the broker lost the batch message (a flush)
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"start_after": 0.001})
    with running_worker(conveyor_app):
        # Reconciler re-sends stay single starts.
        report = engine.reconcile()
        assert sorted(report.start) == sorted((i, "short_chain", 0) for i in ids)
        for execution_id in ids:
            assert wait_for(execution_id, timeout=60).status == "succeeded"
    assert _created_events(ids) == dict.fromkeys(ids, 1)
