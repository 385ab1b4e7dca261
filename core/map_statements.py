"""The statements of a map step's items (``core.maps``), built once per dialect with
bind parameters.

Every item statement names its rows by primary key, (execution_id, step_name,
item_index), or by (execution_id, step_name) with a status the partial indexes cover;
only the reconciler's scans (stalled and due items) span executions, as their step
twins do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    Float,
    Integer,
    Select,
    String,
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    text,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.selectable import TextualSelect

from core.models import DatabaseLiveness, MapItem, StepExecution, WorkflowExecution
from core.sql import utcnow
from core.statements import LIVENESS_ROW, REPUBLISH_BACKOFF_MAX
from core.states import ExecutionStatus, StepStatus
from core.types import json_type

MI = MapItem.__table__.c
SE = StepExecution.__table__.c
WE = WorkflowExecution.__table__.c
ITEMS = cast(Table, MapItem.__table__)
DL = DatabaseLiveness.__table__.c

PENDING = StepStatus.PENDING.value
QUEUED = StepStatus.QUEUED.value
RUNNING = StepStatus.RUNNING.value
SUCCEEDED = StepStatus.SUCCEEDED.value
FAILED = StepStatus.FAILED.value
CANCELLED = StepStatus.CANCELLED.value
WAITING = StepStatus.WAITING.value
OPEN = (PENDING, QUEUED, RUNNING)


def _item() -> Any:
    return and_(
        MI.execution_id == bindparam("eid"),
        MI.step_name == bindparam("step"),
        MI.item_index == bindparam("idx"),
    )


def _map_row() -> Any:
    return and_(SE.execution_id == bindparam("eid"), SE.step_name == bindparam("step"))


def _map_waiting() -> Any:
    """The map step is still waiting for its items (not ended, failed or cancelled)."""
    return exists().where(
        SE.execution_id == MI.execution_id, SE.step_name == MI.step_name, SE.status == WAITING
    )


def _execution_running() -> Any:
    return exists().where(
        WE.execution_id == MI.execution_id, WE.status == ExecutionStatus.RUNNING.value
    )


@dataclass(frozen=True)
class MapStatements:
    """One dialect's item statements (see each field's comment for what it touches)."""

    # The map step's counters at expansion: compare-and-set on waiting at its attempt.
    start: Update
    # n item rows in one statement, the first ``p`` queued: no per-row parameters.
    expand: Insert
    # A plain re-run drops the earlier run's items before expanding again.
    drop: Delete
    # queued -> running (a delivered item), of a waiting map of a running execution.
    claim: Update
    # An item's input: element ``idx`` of the ``over`` step's stored output, read in
    # place (PostgreSQL ``->``; SQLite ``json_extract``, quoted back to JSON).
    item_input: Select[Any]
    # running -> succeeded at its attempt.
    succeed: Update
    # running -> failed at its attempt.
    fail: Update
    # running -> queued at the next attempt, due after the retry's backoff.
    retry: Update
    # The map row's fan-in counter, decremented by the transaction that ends an item
    # (first: it takes the map row's lock before any item's; see core.maps._record).
    count: Update
    # The lowest pending item (locked, SKIP LOCKED: two ends admit two items).
    next_pending: Select[Any]
    # pending -> queued (published after commit) or running here (continued).
    admit: Update
    # The items' outputs in item order: the aggregation, once, by the last item.
    outputs: Select[Any]
    # Every open item of one map -> cancelled (the map failed, or was cancelled).
    cancel: Update
    # The map's counts by status (status, CLI, API, dashboard).
    counts: Select[Any]
    # One item's status, attempt, recoveries and claiming delivery, by primary key.
    item: Select[Any]
    # PostgreSQL: an item's success in one statement (see COMPLETE_PG); None elsewhere.
    complete_pg: TextualSelect | None = None


# An item's success on PostgreSQL, one round trip for what SQLite does in four (the map
# row counted down first, then the item, as core.maps._record explains; then the slot
# passed to the lowest pending item, queued or running here; and that item's input):
#
#   counted   UPDATE execution_steps  map_left - 1        the map row, locked first
#   done      UPDATE map_items        running -> succeeded (only if counted)
#   nxt       SELECT map_items        lowest pending, FOR UPDATE SKIP LOCKED (if done, left)
#   admitted  UPDATE map_items        pending -> :to (queued, or running for :worker)
#
# (``admitted`` finds its row by the primary key through a scalar subquery: joined
# ``FROM nxt``, the planner scanned every pending item of the map, O(n) per item.)
# No row: the map no longer waits. done_index NULL: the item was not running at this
# attempt (a duplicate end), and the caller undoes the count.
COMPLETE_PG = """
WITH counted AS (
  UPDATE execution_steps SET map_left = map_left - 1, updated_at = statement_timestamp()
   WHERE execution_id = :eid AND step_name = :step AND status = 'waiting'
  RETURNING map_left, map_failed, map_max_failed, map_total, attempt
), done AS (
  UPDATE map_items SET status = 'succeeded', output_data = :out,
         finished_at = statement_timestamp()
   WHERE execution_id = :eid AND step_name = :step AND item_index = :idx
     AND status = 'running' AND attempt = :att AND EXISTS (SELECT 1 FROM counted)
  RETURNING item_index
), nxt AS (
  SELECT item_index FROM map_items
   WHERE execution_id = :eid AND step_name = :step AND status = 'pending'
     AND EXISTS (SELECT 1 FROM done) AND (SELECT map_left FROM counted) > 0
   ORDER BY item_index LIMIT 1 FOR UPDATE SKIP LOCKED
), admitted AS (
  UPDATE map_items m SET status = CAST(:to AS varchar), worker = :worker,
         queued_at = statement_timestamp(),
         started_at = CASE WHEN CAST(:to AS varchar) = 'running' THEN statement_timestamp() END,
         heartbeat_at = CASE WHEN CAST(:to AS varchar) = 'running' THEN statement_timestamp() END
   WHERE m.execution_id = :eid AND m.step_name = :step
     AND m.item_index = (SELECT item_index FROM nxt) AND m.status = 'pending'
  RETURNING m.item_index, m.status, m.attempt, m.recoveries
)
SELECT c.map_left, c.map_failed, c.map_max_failed, c.map_total, c.attempt,
       (SELECT item_index FROM done) AS done_index,
       a.item_index AS next_index, a.status AS next_status, a.attempt AS next_attempt,
       a.recoveries AS next_recoveries,
       CASE WHEN a.status = 'running' THEN
         (SELECT o.output_data -> a.item_index FROM execution_steps o
           WHERE o.execution_id = :eid AND o.step_name = :over) END AS item
  FROM counted c LEFT JOIN admitted a ON true
"""


@cache
def map_statements(dialect: str) -> MapStatements:
    """The item statements for ``dialect`` (built once per process)."""
    now = utcnow()
    if dialect == "postgresql":
        series = (
            func.generate_series(0, bindparam("n", type_=Integer) - 1)
            .table_valued("value")
            .render_derived(name="series")
        )
        index = series.c.value
        source: Any = series
    else:
        numbers = select(literal(0, Integer).label("value")).cte("numbers", recursive=True)
        numbers = numbers.union_all(
            select((numbers.c.value + 1).label("value")).where(
                numbers.c.value + 1 < bindparam("n", type_=Integer)
            )
        )
        index = numbers.c.value
        source = numbers
    first = index < bindparam("p", type_=Integer)
    expand = insert(ITEMS).from_select(
        [
            "execution_id",
            "step_name",
            "item_index",
            "status",
            "attempt",
            "recoveries",
            "attempt_base",
            "republishes",
            "queued_at",
        ],
        select(
            bindparam("eid"),
            bindparam("step"),
            index,
            case((first, QUEUED), else_=PENDING),
            bindparam("att", type_=Integer),
            bindparam("att", type_=Integer) - 1,
            bindparam("att", type_=Integer) - 1,
            literal(0, Integer),
            case((first, now), else_=None),
        ).select_from(source),
    )
    over = StepExecution.__table__.alias("over_step")
    if dialect == "postgresql":
        element: Any = over.c.output_data[bindparam("idx", type_=Integer)]
    else:
        # json_extract returns SQL text for a string element: json_quote makes it JSON
        # again (and leaves an object or array, which it returns as JSON, as it is).
        path = literal("$[") + sql_cast(bindparam("idx", type_=Integer), String) + literal("]")
        element = func.json_quote(func.json_extract(over.c.output_data, path))
    item_input = select(type_coerce(element, json_type()).label("item")).where(
        over.c.execution_id == bindparam("eid"), over.c.step_name == bindparam("over")
    )
    returning = (MI.item_index, MI.status, MI.attempt, MI.recoveries)
    return MapStatements(
        start=update(StepExecution)
        .where(_map_row(), SE.status == WAITING, SE.attempt == bindparam("att"))
        .values(
            map_total=bindparam("n"),
            map_left=bindparam("left"),
            map_failed=0,
            map_max_failed=bindparam("max_failed"),
            updated_at=now,
        )
        .returning(SE.attempt),
        expand=expand,
        drop=delete(MapItem).where(
            MI.execution_id == bindparam("eid"), MI.step_name == bindparam("step")
        ),
        claim=update(MapItem)
        .where(
            _item(),
            MI.status == QUEUED,
            or_(MI.next_attempt_at.is_(None), MI.next_attempt_at <= now),
            _map_waiting(),
            _execution_running(),
        )
        .values(
            status=RUNNING,
            worker=bindparam("worker"),
            celery_task_id=bindparam("task_id"),
            started_at=now,
            heartbeat_at=now,
            next_attempt_at=None,
            finished_at=None,
        )
        .returning(MI.attempt, MI.recoveries, MI.queued_at, MI.started_at),
        item_input=item_input,
        succeed=update(MapItem)
        .where(_item(), MI.status == RUNNING, MI.attempt == bindparam("att"))
        .values(
            status=SUCCEEDED,
            output_data=bindparam("out", type_=json_type()),
            error=null(),  # an item that succeeded after retries shows no error
            finished_at=now,
        )
        .returning(MI.item_index),
        fail=update(MapItem)
        .where(_item(), MI.status == RUNNING, MI.attempt == bindparam("att"))
        .values(status=FAILED, error=bindparam("err", type_=json_type()), finished_at=now)
        .returning(MI.item_index),
        retry=update(MapItem)
        .where(_item(), MI.status == RUNNING, MI.attempt == bindparam("att"))
        .values(
            status=QUEUED,
            attempt=MI.attempt + 1,
            error=bindparam("err", type_=json_type()),
            queued_at=now,
            next_attempt_at=utcnow(bindparam("delay", type_=Float)),
            worker=None,
            started_at=None,
            heartbeat_at=None,
        )
        .returning(MI.attempt),
        count=update(StepExecution)
        .where(_map_row(), SE.status == WAITING)
        .values(
            map_left=SE.map_left - bindparam("left", type_=Integer, value=1),
            map_failed=SE.map_failed + bindparam("failed", type_=Integer),
            updated_at=now,
        )
        .returning(SE.map_left, SE.map_failed, SE.map_max_failed, SE.map_total, SE.attempt),
        next_pending=select(MI.item_index)
        .where(MI.execution_id == bindparam("eid"), MI.step_name == bindparam("step"))
        .where(MI.status == PENDING)
        .order_by(MI.item_index)
        .limit(bindparam("n", type_=Integer))
        .with_for_update(skip_locked=True),
        admit=update(MapItem)
        .where(_item(), MI.status == PENDING)
        .values(
            status=bindparam("to", type_=String),
            queued_at=now,
            worker=bindparam("worker"),
            started_at=case((bindparam("to", type_=String) == RUNNING, now), else_=None),
            heartbeat_at=case((bindparam("to", type_=String) == RUNNING, now), else_=None),
        )
        .returning(*returning),
        outputs=select(MI.item_index, MI.status, MI.output_data)
        .where(MI.execution_id == bindparam("eid"), MI.step_name == bindparam("step"))
        .order_by(MI.item_index),
        cancel=update(MapItem)
        .where(
            MI.execution_id == bindparam("eid"),
            MI.step_name == bindparam("step"),
            MI.status.in_(OPEN),
        )
        .values(status=CANCELLED, finished_at=now, next_attempt_at=None),
        counts=select(MI.status, func.count())
        .where(MI.execution_id == bindparam("eid"), MI.step_name == bindparam("step"))
        .group_by(MI.status),
        item=select(MI.status, MI.attempt, MI.recoveries, MI.celery_task_id).where(_item()),
        complete_pg=text(COMPLETE_PG)
        .bindparams(bindparam("out", type_=JSONB(none_as_null=True)))
        .columns(item=JSONB())
        if dialect == "postgresql"
        else None,
    )


def cancel_items_of(execution_ids: Sequence[str]) -> Update:
    """Every open item of the executions' maps -> cancelled (the executions ended:
    cancelled, timed out, failed): none is left queued to be claimed."""
    return (
        update(MapItem)
        .where(MI.execution_id.in_(list(execution_ids)), MI.status.in_(OPEN))
        .values(status=CANCELLED, finished_at=utcnow(), next_attempt_at=None)
    )


def _key_match(keys: Sequence[tuple[str, str, int]]) -> Any:
    return tuple_(MI.execution_id, MI.step_name, MI.item_index).in_([tuple(k) for k in keys])


def stalled_items(stall_timeout_seconds: float, gap_seconds: float, limit: int) -> Select[Any]:
    """Running items stalled on the evidence of a reachable database (bounded, oldest
    first): ``core.statements.stalled_steps``' predicate on items."""
    cutoff = utcnow(-stall_timeout_seconds)
    reachable_since = (
        select(DL.reachable_since)
        .where(DL.id == LIVENESS_ROW, DL.last_seen_at > utcnow(-gap_seconds))
        .scalar_subquery()
    )
    return (
        select(
            MI.execution_id,
            MI.step_name,
            MI.item_index,
            MI.attempt,
            MI.recoveries,
            MI.attempt_base,
            MI.worker,
        )
        .where(MI.status == RUNNING, MI.heartbeat_at < cutoff, reachable_since < cutoff)
        .order_by(MI.heartbeat_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def recover_items(keys: Sequence[tuple[str, str, int]]) -> Update:
    """running -> queued at attempt + 1 (recoveries + 1: a crash is not an error retry)
    for stalled items; the pass publishes them."""
    return (
        update(MapItem)
        .where(MI.status == RUNNING, _key_match(keys))
        .values(
            status=QUEUED,
            attempt=MI.attempt + 1,
            recoveries=MI.recoveries + 1,
            queued_at=utcnow(),
            republished_at=None,
            next_attempt_at=None,
            worker=None,
            heartbeat_at=None,
        )
        .returning(MI.execution_id, MI.step_name, MI.item_index, MI.attempt)
    )


_ITEM_BACKOFF = case(
    *((MI.republishes == n, 2**n) for n in range(REPUBLISH_BACKOFF_MAX.bit_length() - 1)),
    else_=REPUBLISH_BACKOFF_MAX,
)


def due_items(republish_after: float, limit: int) -> Select[Any]:
    """Queued items of waiting maps of running executions that are due (a retry's
    backoff over), or whose last message went unclaimed for ``republish_after *
    2**republishes`` seconds (capped), as ``due_queued_steps``."""
    last_sent = func.coalesce(MI.republished_at, MI.queued_at)
    return (
        select(MI.execution_id, MI.step_name, MI.item_index)
        .where(
            MI.status == QUEUED,
            or_(
                and_(
                    MI.next_attempt_at.is_(None),
                    last_sent < utcnow(-republish_after * _ITEM_BACKOFF),
                ),
                MI.next_attempt_at <= utcnow(),
            ),
            _map_waiting(),
            _execution_running(),
        )
        .order_by(MI.queued_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def republish_items(keys: Sequence[tuple[str, str, int]]) -> Update:
    """queued -> queued for items about to be sent again (a due retry's first message
    is no re-send)."""
    return (
        update(MapItem)
        .where(MI.status == QUEUED, _key_match(keys))
        .values(
            republished_at=utcnow(),
            republishes=case(
                (MI.next_attempt_at.is_(None), MI.republishes + 1), else_=MI.republishes
            ),
            next_attempt_at=None,
        )
        .returning(MI.execution_id, MI.step_name, MI.item_index)
    )
