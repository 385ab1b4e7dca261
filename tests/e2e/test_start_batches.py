"""``enqueue_many`` sends one start message per batch of executions
(``conveyor.start_batch``, ``START_BATCH_SIZE`` a message), and the workers split it: every
execution starts once, in order, however often a batch is delivered."""

from __future__ import annotations

import redis
from sqlalchemy import func, select

from core.database import get_db_session
from core.models import ExecutionEvent, StepExecution
from tests.e2e.conftest import running_worker, wait_for
from worker.app import ConveyorCelery
from worker.engine import START_BATCH_SIZE
from worker.producer import enqueue_many


def _waiting_messages(app: ConveyorCelery, redis_url: str) -> int:
    """Messages in the broker's lists of conveyor's queue (every priority's)."""
    client = redis.Redis.from_url(redis_url)
    try:
        queue = app.engine.settings.default_queue
        names = [k for k in client.keys(f"{queue}*") if client.type(k) == b"list"]
        return sum(int(client.llen(name)) for name in names)
    finally:
        client.close()


def test_enqueue_many_sends_a_message_per_batch_and_every_execution_runs_once(
    conveyor_app: ConveyorCelery, redis_url: str
) -> None:
    count = 2 * START_BATCH_SIZE + 50
    ids = enqueue_many("short_chain", [None] * count, app=conveyor_app)
    assert _waiting_messages(conveyor_app, redis_url) == 3  # 100 + 100 + 50
    # A batch delivered twice (a redelivery, a duplicate publish) starts nothing twice.
    conveyor_app.engine.publish_starts([(i, "short_chain", 0) for i in ids[:START_BATCH_SIZE]])
    with running_worker(conveyor_app, concurrency=2):
        for execution_id in ids:
            assert wait_for(execution_id, timeout=60).status == "succeeded"
    with get_db_session() as db:
        starts = db.scalar(
            select(func.count())
            .select_from(ExecutionEvent)
            .where(
                ExecutionEvent.execution_id.in_(ids),
                ExecutionEvent.step_name.is_(None),
                ExecutionEvent.to_status == "running",
            )
        )
        attempts = set(
            db.scalars(select(StepExecution.attempt).where(StepExecution.execution_id.in_(ids)))
        )
    assert starts == count
    assert attempts == {1}


def test_a_lost_start_batch_is_recovered_by_the_reconciler_with_single_starts(
    conveyor_app: ConveyorCelery,
) -> None:
    ids = enqueue_many("short_chain", [None] * 20, app=conveyor_app)
    conveyor_app.control.purge()  # the broker lost the batch message (a flush)
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"start_after": 0.001})
    with running_worker(conveyor_app):
        report = engine.reconcile()
        assert sorted(report.start) == sorted((i, "short_chain", 0) for i in ids)
        for execution_id in ids:
            assert wait_for(execution_id, timeout=60).status == "succeeded"
    with get_db_session() as db:
        rows = db.execute(
            select(ExecutionEvent.execution_id, func.count())
            .where(
                ExecutionEvent.execution_id.in_(ids),
                ExecutionEvent.step_name.is_(None),
                ExecutionEvent.to_status == "running",
            )
            .group_by(ExecutionEvent.execution_id)
        ).all()
        starts = {row[0]: row[1] for row in rows}
    assert starts == dict.fromkeys(ids, 1)
