"""Retention at scale, on PostgreSQL: a million finished executions and ten thousand open
ones (built with COPY), pruned in batches of at most 5,000 executions a transaction;
exactly the eligible ones go, never an open one, and a second pass finds nothing.

Marked slow: it runs in CI (``make test`` runs every test); ``-m "not slow"`` skips it
on a laptop."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from core.database import get_db_session
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from tests.conftest import TestDatabase
from worker.app import ConveyorCelery

pytestmark = [pytest.mark.postgresql_only, pytest.mark.slow, pytest.mark.timeout(600)]

FINISHED = 1_000_000
OPEN = 10_000
WITH_STEPS = 100_000  # finished executions given a step and an event row, to cascade


def _copy(database: TestDatabase) -> dict[str, int]:
    """Write the rows with COPY; how many of each kind are eligible for deletion."""
    url = make_url(database.url).set(drivername="postgresql")
    now = datetime.now(UTC)
    old, young = now - timedelta(days=400), now - timedelta(days=1)
    counts = {"old_succeeded": 0, "old_failed": 0, "young": 0, "open": OPEN}
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        with conn.cursor() as cur:
            columns = (
                "execution_id, workflow_id, workflow_version, status, attempt, priority, "
                "idempotency_scope, starts_resent, depth, created_at, updated_at, finished_at"
            )
            steps: list[str] = []
            with cur.copy(f"COPY workflow_executions ({columns}) FROM STDIN") as copy:
                for n in range(FINISHED):
                    status = "succeeded" if n % 4 else ("failed", "cancelled", "timed_out")[n % 3]
                    is_old = n % 10 != 0  # 90% past retention
                    if not is_old:
                        counts["young"] += 1
                    elif status == "succeeded":
                        counts["old_succeeded"] += 1
                    else:
                        counts["old_failed"] += 1
                    ended = old if is_old else young
                    eid = str(uuid.UUID(int=n))
                    if n < WITH_STEPS:
                        steps.append(eid)
                    copy.write_row(
                        (eid, f"wf{n % 5}", 1, status, 1, 0, "", 0, 0, ended, ended, ended)
                    )
                for n in range(OPEN):
                    # Open work with an old finish time (an execution retried after it
                    # ended keeps none, but a prune must not trust that).
                    status = ("pending", "running")[n % 2]
                    copy.write_row(
                        (
                            str(uuid.UUID(int=FINISHED + n)),
                            f"wf{n % 5}",
                            1,
                            status,
                            1,
                            0,
                            "",
                            0,
                            0,
                            old,
                            old,
                            old,
                        )
                    )
            with cur.copy(
                "COPY execution_steps (execution_id, step_name, status, attempt, max_attempts, "
                "recoveries, attempt_base, unmet_deps, republishes, created_at, updated_at) "
                "FROM STDIN"
            ) as copy:
                for eid in steps:
                    copy.write_row((eid, "only", "succeeded", 1, 1, 0, 0, 0, 0, old, old))
            with cur.copy(
                "COPY execution_events (execution_id, to_status, attempt, reason, created_at) "
                "FROM STDIN"
            ) as copy:
                for eid in steps:
                    copy.write_row((eid, "succeeded", 1, "done", old))
        conn.execute("ANALYZE")
    return counts


def _count(model: type, *where: object) -> int:
    with get_db_session() as db:
        return int(db.execute(select(func.count()).select_from(model).where(*where)).scalar_one())


def test_a_million_finished_executions_are_pruned_in_batches_and_no_open_one(
    conveyor_app: ConveyorCelery, database: TestDatabase
) -> None:
    began = time.monotonic()
    counts = _copy(database)
    built = time.monotonic() - began
    # No rest between batches: the pass alone, as fast as it goes.
    conveyor_app.engine.settings = conveyor_app.engine.settings.model_copy(
        update={"prune_pause": 0.0}
    )
    began = time.monotonic()
    report = conveyor_app.engine.prune()
    took = time.monotonic() - began
    print(f"\nbuilt {FINISHED + OPEN:,} executions in {built:.1f}s; pruned in {took:.1f}s")
    assert report.total("succeeded") == counts["old_succeeded"]
    assert report.total("failed") == counts["old_failed"]
    assert not report.capped
    sizes = [size for part in report.parts for size in part.batches]
    assert max(sizes) <= 5000
    assert sum(sizes) == counts["old_succeeded"] + counts["old_failed"]
    # Exactly the eligible ones are gone: the young and every open one stay.
    final = ("succeeded", "failed", "cancelled", "timed_out")
    assert _count(WorkflowExecution, WorkflowExecution.status.in_(final)) == counts["young"]
    open_left = _count(WorkflowExecution, WorkflowExecution.status.in_(("pending", "running")))
    assert open_left == OPEN
    # Their steps and history went with them (the young tenth of those that had some stay).
    assert _count(StepExecution) == WITH_STEPS // 10
    assert _count(ExecutionEvent) == WITH_STEPS // 10
    # A second pass deletes nothing.
    assert conveyor_app.engine.prune().total() == 0
