"""Retention through a SIGKILL storm: while pool children are killed under a workload of
chains and fans, retention passes (as beat's conveyor.prune runs them, back to back)
delete a backlog of retired executions written with COPY, and old failed executions are
retried by an operator at the same moment as they become eligible.

What must hold: the workload's invariants (the shared checker) as without retention;
every retired execution deleted; and each retried-while-eligible execution either
deleted whole (before its retry took it) or retried and succeeded: never half of each.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url

from core.database import get_db_session
from core.errors import ExecutionNotFound
from core.models import StepExecution, WorkflowExecution
from core.retention import prune
from tests.conftest import TestDatabase
from tests.faults.checker import Figures, check, running_workers, wait_until_final
from tests.faults.conftest import StartCluster
from tests.faults.test_sigkill_storm import _kill_a_child

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(300)]

RETIRED = 100_000
CHAINS, FANS = 30, 8
OLD = 20  # executions made old and failed, retried while retention may take them
KILLS = 4
PAUSE = (0.5, 2.0)
FINISH_TIMEOUT = 150.0


def _retire(database: TestDatabase, rows: int) -> None:
    ended = datetime.now(UTC) - timedelta(days=400)
    url = make_url(database.url).set(drivername="postgresql")
    columns = (
        "execution_id, workflow_id, workflow_version, status, attempt, priority, "
        "idempotency_scope, starts_resent, depth, created_at, updated_at, finished_at"
    )
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY workflow_executions ({columns}) FROM STDIN") as copy,
        ):
            for _ in range(rows):
                row = (str(uuid.uuid4()), "retired", 1, "succeeded", 1, 0, "", 0, 0)
                copy.write_row((*row, ended, ended, ended))
        conn.execute("ANALYZE workflow_executions")


def _count(*where: object) -> int:
    with get_db_session() as db:
        query = select(func.count()).select_from(WorkflowExecution).where(*where)
        return int(db.execute(query).scalar_one())


def test_retention_through_a_sigkill_storm_deletes_the_retired_and_nothing_live(
    start_cluster: StartCluster, database: TestDatabase
) -> None:
    _retire(database, RETIRED)
    cluster = start_cluster()
    engine = cluster.app.engine
    # Executions that ended long ago and failed: eligible, and about to be retried.
    old = cluster.enqueue("fault_chain", range(5000, 5000 + OLD))
    wait_until_final(old, FINISH_TIMEOUT)
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id.in_(old))
            .values(status="failed", finished_at=datetime.now(UTC) - timedelta(days=400))
        )
        db.execute(
            update(StepExecution)
            .where(StepExecution.execution_id.in_(old), StepExecution.step_name == "link_9")
            .values(status="failed")
        )
    ids = cluster.enqueue_workload(CHAINS, FANS)
    settings = engine.settings.model_copy(update={"prune_pause": 0.0, "prune_batch": 2000})
    stop = threading.Event()
    pruned: list[int] = []

    def prune_passes() -> None:
        while not stop.is_set():
            pruned.append(prune(engine.manager.run, engine.registry, settings).total())

    def retry_old() -> None:
        for execution_id in old:
            with contextlib.suppress(ExecutionNotFound):  # retention took it first
                engine.retry(execution_id)
            time.sleep(0.05)

    pruner = threading.Thread(target=prune_passes, name="test-pruner")
    retrier = threading.Thread(target=retry_old, name="test-retrier")
    # The operator starts first; retention joins half way through the old ones (it
    # reaches their workflow first), so that some are retried and some pruned.
    retrier.start()
    time.sleep(OLD * 0.05 / 2)
    pruner.start()
    rng = random.Random()
    dead: set[int] = set()
    for _ in range(KILLS):
        time.sleep(rng.uniform(*PAUSE))
        dead.update(_kill_a_child(cluster, ids, rng))
    retrier.join(60)
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    survivors = [e for e in old if _count(WorkflowExecution.execution_id == e)]
    wait_until_final(survivors, FINISH_TIMEOUT)
    while _count(WorkflowExecution.workflow_id == "retired"):
        time.sleep(0.2)
    stop.set()
    pruner.join(60)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "pool children killed": len(dead),
            "retired executions pruned": sum(pruned),
            "old executions retried (the rest pruned first)": len(survivors),
            "workers running steps at the end": len(running_workers(ids)),
        },
    )
    try:
        check(ids, cluster.run_log, dead_pids=dead, figures=figures)
    finally:
        print(f"\nretention through a storm: {figures.line()}")
    assert _count(WorkflowExecution.workflow_id == "retired") == 0
    # Each old execution: gone whole, or retried and succeeded with every step.
    with get_db_session() as db:
        for execution_id in old:
            row = db.get(WorkflowExecution, execution_id)
            steps = db.execute(
                select(StepExecution.status).where(StepExecution.execution_id == execution_id)
            ).scalars()
            if row is None:
                assert list(steps) == [], execution_id
            else:
                assert row.status == "succeeded", (execution_id, row.status)
                assert set(steps) == {"succeeded"}, execution_id
