"""PostgreSQL's generic plan of a map item's completion stays O(1) in the map's size.

Each item's end passes its slot to the lowest pending item. Joined ``FROM nxt``, the
planner scanned every pending item of the map to find that one row (``Rows Removed by
Join Filter`` of thousands at 10,000 items: the map O(n^2)); found through the primary
key, an item's end reads a handful of rows however long the map.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import insert, text

from core.database import get_database
from core.executions import StepSpec
from core.map_statements import map_statements
from core.models import MapItem
from tests.conftest import TestDatabase
from tests.helpers.state import insert_execution
from tests.integration.test_hot_path_plans import _generic_plan

pytestmark = pytest.mark.postgresql_only
ITEMS = 3_000


def test_an_items_completion_admits_the_next_item_by_key(database: TestDatabase) -> None:
    execution_id = insert_execution(
        "mapped", {}, steps=[StepSpec("src"), StepSpec("each", 1, wait_kind="map")]
    )
    with get_database().engine.begin() as conn:
        conn.execute(
            text("UPDATE workflow_executions SET status = 'running' WHERE execution_id = :e"),
            {"e": execution_id},
        )
        conn.execute(
            text(
                "UPDATE execution_steps SET status = 'succeeded', output_data = "
                "CAST(:out AS jsonb) WHERE execution_id = :e AND step_name = 'src'"
            ),
            {"e": execution_id, "out": str(list(range(ITEMS)))},
        )
        conn.execute(
            text(
                "UPDATE execution_steps SET status = 'waiting', unmet_deps = 0, map_total = :n,"
                " map_left = :n, map_failed = 0, map_max_failed = 0"
                " WHERE execution_id = :e AND step_name = 'each'"
            ),
            {"e": execution_id, "n": ITEMS},
        )
        conn.execute(
            insert(MapItem),
            [
                {
                    "execution_id": execution_id,
                    "step_name": "each",
                    "item_index": i,
                    "status": "running" if i == 0 else "pending",
                    "attempt": 1,
                }
                for i in range(ITEMS)
            ],
        )
    # No ANALYZE: a map's items are inserted and run long before autovacuum's statistics
    # arrive, and without them the join form scanned every pending item.
    statement = map_statements("postgresql").complete_pg
    assert statement is not None
    values = {
        "eid": execution_id,
        "step": "each",
        "idx": 0,
        "att": 1,
        "out": "0",
        "over": "src",
        "to": "running",
        "worker": "w",
    }
    plan = _generic_plan(database, statement, values)
    removed = [int(n) for n in re.findall(r"Rows Removed by (?:Join )?Filter: (\d+)", plan)]
    assert max(removed, default=0) < 10, plan
    assert "(item_index = $" in plan, plan  # the admitted item found by its key
