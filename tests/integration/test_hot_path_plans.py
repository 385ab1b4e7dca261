"""PostgreSQL's generic plans of the hot path probe a step by its primary key.

psycopg prepares a statement it has run a few times, and PostgreSQL then plans it once
for any parameters (a generic plan). A completion in an execution of many steps must
still find its downstream steps through the primary key (execution_id, step_name), not
read every step row of the execution: that would make each step cost as much as the
execution is long. Written as ``= ANY(:array)``, the names did exactly that (999 rows
filtered per completion in a 1,000-step chain); one parameter per name does not.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest
from sqlalchemy import make_url
from sqlalchemy.dialects import postgresql

from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.executions import StepSpec
from core.step_statements import hot_path
from tests.conftest import TestDatabase
from tests.helpers.state import insert_execution

pytestmark = pytest.mark.postgresql_only
STEPS = 300


def _generic_plan(database: TestDatabase, statement: Any, values: dict[str, Any]) -> str:
    """EXPLAIN ANALYZE of ``statement`` under a generic plan, in a rolled-back transaction."""
    compiled = statement.compile(dialect=postgresql.psycopg.dialect())
    bound = compiled.construct_params(values, _check=False)
    executed = compiled._process_parameters_for_postcompile(bound)
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in order:
            order.append(match[1])
        return f"${order.index(match[1]) + 1}"

    numbered = re.sub(r"%\((\w+)\)s", number, executed.statement)
    url = make_url(database.url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(url) as conn, conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.execute(f"PREPARE hot AS {numbered}")
        cursor = psycopg.ClientCursor(conn)  # EXECUTE's arguments as literals
        arguments = ", ".join(["%s"] * len(order))
        parameters = [executed.parameters[name] for name in order]
        cursor.execute(f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE hot({arguments})", parameters)
        return "\n".join(row[0] for row in cursor.fetchall())


def test_a_completion_in_a_long_chain_probes_its_downstream_step_by_key(
    database: TestDatabase,
) -> None:
    names = [f"s{i:04d}" for i in range(STEPS)]
    specs = [StepSpec(names[0]), *(StepSpec(name, unmet_deps=1) for name in names[1:])]
    execution_id = insert_execution("long", {}, steps=specs)
    manager = SyncEnhancedExecutionStateManager()
    manager.transition_execution(execution_id, "running")
    manager.transition_steps(execution_id, [names[0]], "queued")
    assert manager.claim_step(execution_id, names[0], worker="w", celery_task_id=None).applied

    plan = _generic_plan(
        database,
        hot_path("postgresql").complete_pg,
        {
            "eid": execution_id,
            "step": names[0],
            "at_attempt": 1,
            "output": "1",
            "downstream": [names[1]],
            "here": [names[1]],
            "continue_here": True,
            "worker_id": "w",
        },
    )

    # Each step row read and thrown away is one the primary key would have skipped.
    removed = [int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan)]
    assert max(removed, default=0) < 10, plan


@pytest.mark.parametrize("statement", ["hold", "continue_held_pg", "hand_off"])
def test_the_statements_of_held_siblings_probe_them_by_key(
    database: TestDatabase, statement: str
) -> None:
    """Holding, claiming and handing off a held sibling in an execution of many steps
    reads its row, not every step row of the execution. (Eight names are planned like
    the completion's eight downstream names: on this one-execution table PostgreSQL
    then filters the execution's rows, as it does for ``complete_pg``.)"""
    names = [f"s{i:04d}" for i in range(STEPS)]
    execution_id = insert_execution("wide", {}, steps=[StepSpec(name) for name in names])
    manager = SyncEnhancedExecutionStateManager()
    manager.transition_execution(execution_id, "running")
    manager.transition_steps(execution_id, names[:1], "queued")

    plan = _generic_plan(
        database,
        getattr(hot_path("postgresql"), statement),
        {
            "eid": execution_id,
            "step": names[0],
            "names": names[:1],
            "grace": 2.0,
            "worker_id": "w",
        },
    )

    removed = [int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan)]
    assert max(removed, default=0) < 10, plan
