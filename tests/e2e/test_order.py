"""Bursts finish in order: steps of running executions go ahead of starting new ones
(CONVEYOR_ORDER=depth_first), priorities still win, and breadth_first keeps the old order."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from core.database import get_db_session
from core.models import StepExecution, WorkflowExecution
from tests.e2e.conftest import running_worker, wait_for
from worker.app import ConveyorCelery
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
