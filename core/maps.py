"""Map steps: one row per item, at most ``max_parallel`` queued or running, the last
item's transaction aggregates.

A map step is a wait node (``wait_kind = 'map'``): no worker runs the step itself.
Its life, each part a unit of work on a ``Connection`` in its caller's transaction:

- *expanded* (``expand``) by the transaction that releases it (its ``over`` step's
  completion, or its execution's start): the upstream output is checked (a list, at
  most ``max_items`` long; else the map fails with MapInputError and no item row is
  written); an empty list ends the map at once with ``[]``; otherwise one INSERT
  writes every item, the first ``max_parallel`` queued (their messages published
  after commit), the rest pending (no message);
- each item is *claimed* (``claim_item``) from its message, run by a worker, and
  *ended* (``complete_item``, ``fail_item``) by a compare-and-set that also counts the
  map down (``map_left``, the atomic fan-in counter) and passes its slot on: the
  lowest pending item is admitted, queued, or running in the same worker
  (continuation, no message); so queued + running never exceeds ``max_parallel``;
- the item that brings ``map_left`` to zero *aggregates* (the outputs in item order,
  ``None`` for tolerated failures) and ends the map step like any wait
  (``core.waits.end_waits``: its dependents released, the execution finished), in its
  own transaction, once;
- an item that fails for good past what ``on_item_failure`` tolerates *fails the map*:
  its open items are cancelled in the same transaction (none is left queued);
- ``core.map_repair.retry_failed_items`` re-runs only the failed (and cancelled) items of
  a failed map; ``core.map_repair.reconcile_items`` is the reconciler's pass over items;
  ``core.map_children`` runs the items of child maps (``wf.child(..., over=)``).

Publishing what a transaction set in motion is the caller's, after its commit
(``WaitOutcome.items``, ``ItemCompletion``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Connection, Row, func, select, tuple_, update

from core.errors import MapInputError, MapItemsFailed
from core.map_statements import (
    MI,
    map_statements,
)
from core.models import MapItem, StepExecution
from core.outcomes import Claim, Route, WaitOutcome
from core.sql import utcnow
from core.states import StepStatus
from core.step_statements import hot_path
from core.waits import (
    DefinitionOf,
    WaitEnd,
    WaitingExecution,
    end_waits,
    read_execution,
    wait_error,
)
from core.workflows import MapSpec, Step, Workflow

log = logging.getLogger(__name__)

ItemKey = tuple[str, str, int]
SE_TABLE = StepExecution.__table__


@dataclass
class ItemCompletion:
    """What recording an item's end did: whether it applied, the items it queued (to
    publish), the item this worker continues with, and what ending the map set in
    motion (``woken``: dependents queued, the execution finished)."""

    applied: bool
    queued: list[ItemKey] = field(default_factory=list)
    continued: Claim | None = None
    woken: WaitOutcome | None = None


def _event(execution_id: str, step: str, to: str, attempt: int, reason: str) -> dict[str, Any]:
    return {
        "execution_id": execution_id,
        "step_name": step,
        "from_status": StepStatus.WAITING.value,
        "to_status": to,
        "attempt": attempt,
        "reason": reason,
    }


def _events(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        conn.execute(hot_path(conn.dialect.name).events, list(rows))


# --- expanding ----------------------------------------------------------------------


def expand(
    conn: Connection,
    execution: WaitingExecution,
    step: Step,
    attempt: int,
    known_outputs: Mapping[str, Any],
    outcome: WaitOutcome,
) -> WaitEnd | None:
    """Expand the map step ``step`` (waiting at ``attempt``) over its upstream list; the
    end to record now when the map ends at once (an empty list, or a refused input)."""
    spec = step.wait
    assert isinstance(spec, MapSpec)
    ms = map_statements(conn.dialect.name)
    eid = execution.execution_id
    names = {"eid": eid, "step": step.name}
    if spec.over in known_outputs:  # the completion that released the map holds it
        items = known_outputs[spec.over]
    else:
        params = {"eid": eid, "names": [spec.over]}
        items = conn.execute(hot_path(conn.dialect.name).outputs, params).one().output_data
    refused: MapInputError | None = None
    if not isinstance(items, list):
        refused = MapInputError(step.name, spec.over, got=_json_kind(items))
    elif len(items) > spec.max_items:
        refused = MapInputError(step.name, spec.over, length=len(items), limit=spec.max_items)
    if refused is not None:
        log.warning("map %s/%s refused its input: %s", eid, step.name, refused)
        return WaitEnd(
            eid,
            step.name,
            attempt,
            StepStatus.FAILED.value,
            error=wait_error(refused),
            reason=f"map input refused: {refused}",
            how="refused",
        )
    assert isinstance(items, list)
    total = len(items)
    workflow = execution.workflow.name
    if total == 0:
        return WaitEnd(
            eid,
            step.name,
            attempt,
            StepStatus.SUCCEEDED.value,
            output=[],
            reason="map over an empty list",
            how="empty",
        )
    counts = {r[0]: int(r[1]) for r in conn.execute(ms.counts, names)}
    pending = counts.get(StepStatus.PENDING.value, 0)
    if pending:
        # retry_failed_items left the failed items pending: run those, keep the rest.
        left = total - counts.get(StepStatus.SUCCEEDED.value, 0)
        reason = f"map resumed: {left} of {total} item(s) run again, {spec.max_parallel} at a time"
    else:
        if counts:  # an execution retry: the map runs again from its first item
            conn.execute(ms.drop, names)
        left = total
        reason = f"map expanded: {total} item(s), {spec.max_parallel} at a time"
    limit = spec.tolerate.limit(total)
    started = conn.execute(
        ms.start, {**names, "att": attempt, "n": total, "left": left, "max_failed": limit}
    ).first()
    if started is None:
        return None  # no longer waiting at this attempt: a race another writer won
    if pending:
        rows = _admit(conn, eid, step.name, min(pending, spec.max_parallel), None)
        queued = [r.item_index for r in rows]
    else:
        conn.execute(ms.expand, {**names, "n": total, "p": spec.max_parallel, "att": attempt})
        queued = list(range(min(total, spec.max_parallel)))
    _events(conn, [_event(eid, step.name, StepStatus.WAITING.value, attempt, reason)])
    outcome.items += [(eid, step.name, index) for index in queued]
    outcome.routes[eid] = execution.route
    outcome.item_counts.append((workflow, step.name, "expanded", left))
    return None


def _json_kind(value: Any) -> str:
    names = {dict: "an object", str: "text", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, int | float) else type(value).__name__


def _admit(
    conn: Connection, execution_id: str, step: str, n: int, continue_as: str | None
) -> list[Row[Any]]:
    """pending -> queued for the lowest ``n`` pending items (SKIP LOCKED: concurrent
    ends admit different items); with ``continue_as``, the first goes running for that
    worker instead. The rows admitted (index, status, attempt, recoveries)."""
    if n <= 0:
        return []
    ms = map_statements(conn.dialect.name)
    names = {"eid": execution_id, "step": step}
    found = conn.execute(ms.next_pending, {**names, "n": n}).scalars().all()
    admitted: list[Row[Any]] = []
    for position, index in enumerate(found):
        here = continue_as is not None and position == 0
        to = StepStatus.RUNNING.value if here else StepStatus.QUEUED.value
        params = {**names, "idx": index, "to": to, "worker": continue_as if here else None}
        row = conn.execute(ms.admit, params).first()
        if row is not None:
            admitted.append(row)
    return admitted


# --- an item's life -----------------------------------------------------------------


def claim_item(
    conn: Connection,
    execution_id: str,
    step: Step,
    index: int,
    worker: str,
    task_id: str | None,
) -> Claim | None:
    """Claim a queued item of a waiting map of a running execution for ``worker``, with
    its input and the map's unmapped upstream outputs; None when the claim loses (a
    duplicate or early delivery, a cancelled item or map): a no-op."""
    ms = map_statements(conn.dialect.name)
    params = {
        "eid": execution_id,
        "step": step.name,
        "idx": index,
        "worker": worker,
        "task_id": task_id,
    }
    row = conn.execute(ms.claim, params).first()
    if row is None:
        return None
    return _item_claim(conn, execution_id, step, index, row.attempt, row.recoveries, False)


def _item_claim(
    conn: Connection,
    execution_id: str,
    step: Step,
    index: int,
    attempt: int,
    recoveries: int,
    continued: bool,
    route: Route | None = None,
    input_data: Any = None,
    item: tuple[Any] | None = None,
) -> Claim:
    spec = step.wait
    assert isinstance(spec, MapSpec)
    sql_ = hot_path(conn.dialect.name)
    ms = map_statements(conn.dialect.name)
    if route is None:
        found = conn.execute(sql_.execution, {"eid": execution_id}).one()
        route = Route(found.workflow_id, found.workflow_version, found.priority, found.shape_hash)
        input_data = found.input_data
    if item is None:  # the item's input, unless the caller read it already
        item = (
            conn.execute(
                ms.item_input, {"eid": execution_id, "over": spec.over, "idx": index}
            ).scalar_one(),
        )
    unmapped = list(step.depends_on[1:])
    outputs: dict[str, Any] = {}
    if unmapped:
        rows = conn.execute(sql_.outputs, {"eid": execution_id, "names": unmapped})
        outputs = {r.step_name: r.output_data for r in rows}
    return Claim(
        execution_id,
        step.name,
        attempt,
        recoveries,
        route,
        input_data,
        outputs,
        continued=continued,
        map_index=index,
        item=item[0],
    )


def running_item(
    conn: Connection, execution_id: str, step: Step, index: int, task_id: str
) -> Claim | None:
    """The claim a delivery (``task_id``) holds on a running item, if it still does."""
    ms = map_statements(conn.dialect.name)
    key = {"eid": execution_id, "step": step.name, "idx": index}
    row = conn.execute(ms.item, key).first()
    if row is None or row.status != StepStatus.RUNNING.value or row.celery_task_id != task_id:
        return None
    return _item_claim(conn, execution_id, step, index, row.attempt, row.recoveries, False)


def complete_item(
    conn: Connection,
    claim: Claim,
    output: Any,
    workflow: Workflow,
    continue_as: str | None,
    definition_of: DefinitionOf,
) -> ItemCompletion:
    """Record an item's output, count the map down and pass the slot on (to a pending
    item, continued here with ``continue_as``), or, as the last item, aggregate and
    end the map, all in this transaction. Not applied when the item is no longer
    running at this attempt (a duplicate or late end, or a cancelled map)."""
    ms = map_statements(conn.dialect.name)
    if ms.complete_pg is not None:
        return _complete_pg(conn, claim, output, workflow, continue_as, definition_of)
    counted = _record(conn, claim, 0, ms.succeed, {"out": output})
    if counted is None:
        return ItemCompletion(applied=False)
    return _ended(conn, claim, counted, workflow, 0, continue_as, definition_of)


def _complete_pg(
    conn: Connection,
    claim: Claim,
    output: Any,
    workflow: Workflow,
    continue_as: str | None,
    definition_of: DefinitionOf,
) -> ItemCompletion:
    """``complete_item`` on PostgreSQL: one statement (``COMPLETE_PG``) counts the map
    down, ends the item and passes its slot on; the last item aggregates after it."""
    ms = map_statements(conn.dialect.name)
    assert ms.complete_pg is not None
    assert claim.map_index is not None
    step = workflow.steps[claim.step_name]
    spec = step.wait
    assert isinstance(spec, MapSpec)
    names = {"eid": claim.execution_id, "step": claim.step_name}
    params = {
        **names,
        "idx": claim.map_index,
        "att": claim.attempt,
        "out": output,
        "over": spec.over,
        "to": StepStatus.RUNNING.value if continue_as else StepStatus.QUEUED.value,
        "worker": continue_as,
    }
    row = conn.execute(ms.complete_pg, params).first()
    if row is None:
        return ItemCompletion(applied=False)
    if row.done_index is None:
        conn.execute(ms.count, {**names, "failed": 0, "left": -1})  # undo the count
        return ItemCompletion(applied=False)
    if row.map_left == 0:
        return _ended(conn, claim, row, workflow, 0, None, definition_of)
    result = ItemCompletion(applied=True)
    if row.next_status == StepStatus.RUNNING.value:
        result.continued = _item_claim(
            conn,
            claim.execution_id,
            step,
            row.next_index,
            row.next_attempt,
            row.next_recoveries,
            True,
            claim.route,
            claim.input_data,
            item=(row.item,),
        )
    elif row.next_index is not None:
        result.queued.append((claim.execution_id, claim.step_name, row.next_index))
    return result


def fail_item(
    conn: Connection,
    claim: Claim,
    error: dict[str, Any],
    workflow: Workflow,
    definition_of: DefinitionOf,
) -> ItemCompletion:
    """Record an item's failure for good: the map fails (its open items cancelled)
    when more items failed than it tolerates; else the item counts as ended (``None``
    at its index) and its slot passes on."""
    ms = map_statements(conn.dialect.name)
    counted = _record(conn, claim, 1, ms.fail, {"err": error})
    if counted is None:
        return ItemCompletion(applied=False)
    return _ended(conn, claim, counted, workflow, 1, None, definition_of, error)


def _record(
    conn: Connection, claim: Claim, failed: int, statement: Any, values: dict[str, Any]
) -> Row[Any] | None:
    """Count the map down, then end the item (running at its attempt -> succeeded or
    failed): the map's counters, or None when either is refused (the map no longer
    waits; the item no longer runs at this attempt: a duplicate or late end).

    The map row is locked first, by every transaction that ends one of its items and
    by every one that fails or cancels the map (which then cancels its open items): in
    that one order, a map failing while its other items end cannot deadlock."""
    ms = map_statements(conn.dialect.name)
    assert claim.map_index is not None
    names = {"eid": claim.execution_id, "step": claim.step_name}
    counted = conn.execute(ms.count, {**names, "failed": failed}).first()
    if counted is None:
        return None
    params = {**names, "idx": claim.map_index, "att": claim.attempt, **values}
    if conn.execute(statement, params).first() is None:
        conn.execute(ms.count, {**names, "failed": -failed, "left": -1})  # undo the count
        return None
    return counted


def retry_item(conn: Connection, claim: Claim, delay: float, error: dict[str, Any]) -> bool:
    """running -> queued at the next attempt, due after ``delay`` seconds; the item keeps
    its slot (queued counts toward ``max_parallel``). False: no longer running."""
    ms = map_statements(conn.dialect.name)
    assert claim.map_index is not None
    params = {
        "eid": claim.execution_id,
        "step": claim.step_name,
        "idx": claim.map_index,
        "att": claim.attempt,
        "err": error,
        "delay": delay,
    }
    row = conn.execute(ms.retry, params).first()
    if row is None:
        return False
    reason = f"item {claim.map_index}: retry in {delay:.1f}s after {error.get('type')}"
    _events(
        conn,
        [
            _event(
                claim.execution_id, claim.step_name, StepStatus.WAITING.value, claim.attempt, reason
            )
        ],
    )
    return True


def _ended(
    conn: Connection,
    claim: Claim,
    counted: Row[Any],
    workflow: Workflow,
    failed: int,
    continue_as: str | None,
    definition_of: DefinitionOf,
    error: dict[str, Any] | None = None,
) -> ItemCompletion:
    """After an item ended and counted the map down (``counted``; ``failed`` 1 when it
    failed for good): fail the map past its tolerance, end it at zero, or admit the
    next item."""
    ms = map_statements(conn.dialect.name)
    eid, name = claim.execution_id, claim.step_name
    index = claim.map_index
    result = ItemCompletion(applied=True)
    if failed and counted.map_failed > counted.map_max_failed:
        assert error is not None
        assert index is not None
        conn.execute(ms.cancel, {"eid": eid, "step": name})
        spec = workflow.steps[name].wait
        children = None
        if isinstance(spec, MapSpec) and spec.child is not None:
            from core.map_children import cancel_child_items

            children = cancel_child_items(conn, eid, name, spec.child.workflow.name)
        problem = MapItemsFailed(
            name, counted.map_failed, counted.map_max_failed, index, _described(error)
        )
        end = WaitEnd(
            eid,
            name,
            counted.attempt,
            StepStatus.FAILED.value,
            error={**wait_error(problem), "item": index, "item_error": error},
            reason=f"map failed: item {index} ({counted.map_failed} failed)",
            how="failed",
        )
        result.woken = _end_map(conn, end, workflow, definition_of)
        if children is not None:
            result.woken.merge(children)
        return result
    if counted.map_left == 0:
        rows = conn.execute(ms.outputs, {"eid": eid, "step": name}).all()
        output = [r.output_data if r.status == StepStatus.SUCCEEDED.value else None for r in rows]
        tolerated = counted.map_failed
        end = WaitEnd(
            eid,
            name,
            counted.attempt,
            StepStatus.SUCCEEDED.value,
            output=output,
            reason=f"map done: {counted.map_total} item(s)"
            + (f", {tolerated} failed (tolerated)" if tolerated else ""),
            how="map",
        )
        result.woken = _end_map(conn, end, workflow, definition_of)
        return result
    for row in _admit(conn, eid, name, 1, continue_as):
        if row.status == StepStatus.RUNNING.value:
            result.continued = _item_claim(
                conn,
                eid,
                workflow.steps[name],
                row.item_index,
                row.attempt,
                row.recoveries,
                True,
                claim.route,
                claim.input_data,
            )
        else:
            result.queued.append((eid, name, row.item_index))
    return result


def _described(error: Mapping[str, Any]) -> str:
    message = str(error.get("message", ""))
    first = message.strip().splitlines()[0] if message.strip() else ""
    return f"{error.get('type', 'an error')}: {first}" if first else str(error.get("type"))


def _end_map(
    conn: Connection, end: WaitEnd, workflow: Workflow, definition_of: DefinitionOf
) -> WaitOutcome:
    outcome = WaitOutcome()
    execution = read_execution(conn, end.execution_id, workflow)
    end_waits(conn, [end], {end.execution_id: execution}, definition_of, outcome)
    return outcome


# --- cancelling, heartbeats ---------------------------------------------------------


def item_status(conn: Connection, execution_id: str, step: str, index: int) -> str | None:
    """An item's status (None: no such item)."""
    ms = map_statements(conn.dialect.name)
    row = conn.execute(ms.item, {"eid": execution_id, "step": step, "idx": index}).first()
    return None if row is None else str(row.status)


def heartbeat_items(conn: Connection, worker: str, keys: Sequence[ItemKey]) -> int:
    """Refresh the heartbeats of the running items ``keys`` this worker holds."""
    if not keys:
        return 0
    result = conn.execute(
        update(MapItem)
        .where(
            MI.status == StepStatus.RUNNING.value,
            MI.worker == worker,
            tuple_(MI.execution_id, MI.step_name, MI.item_index).in_([tuple(k) for k in keys]),
        )
        .values(heartbeat_at=utcnow())
    )
    return int(result.rowcount)


def map_counts(conn: Connection, execution_id: str, step: str) -> dict[str, int]:
    """A map's items by status."""
    ms = map_statements(conn.dialect.name)
    return {r[0]: int(r[1]) for r in conn.execute(ms.counts, {"eid": execution_id, "step": step})}


__all__ = [
    "ItemCompletion",
    "claim_item",
    "complete_item",
    "expand",
    "fail_item",
    "heartbeat_items",
    "item_status",
    "map_counts",
    "retry_item",
    "running_item",
]


# --- reading (status, CLI, API, dashboard) ---------------------------------------------


def map_counts_of(conn: Connection, execution_id: str) -> dict[str, dict[str, int]]:
    """Each map step's items of an execution, by status: one GROUP BY over its items
    (the primary key's range)."""
    found: dict[str, dict[str, int]] = {}
    rows = conn.execute(
        select(MI.step_name, MI.status, func.count())
        .where(MI.execution_id == execution_id)
        .group_by(MI.step_name, MI.status)
    )
    for step, status, count in rows:
        found.setdefault(step, {})[status] = int(count)
    return found


@dataclass(frozen=True)
class ItemPage:
    """A page of a map's items in index order; ``next`` is the index to pass as
    ``after`` for the next page (None: the last page)."""

    items: list[Row[Any]]
    next: int | None


def item_page(
    conn: Connection,
    execution_id: str,
    step: str,
    *,
    status: str | None = None,
    after: int | None = None,
    limit: int = 50,
) -> ItemPage:
    """Items of one map, keyset-paged by index (the primary key), optionally of one
    status."""
    query = (
        select(
            MI.item_index,
            MI.status,
            MI.attempt,
            MI.recoveries,
            MI.attempt_base,
            MI.worker,
            MI.queued_at,
            MI.started_at,
            MI.finished_at,
            MI.error,
            MI.output_data,
        )
        .where(MI.execution_id == execution_id, MI.step_name == step)
        .order_by(MI.item_index)
        .limit(limit + 1)
    )
    if status is not None:
        query = query.where(MI.status == status)
    if after is not None:
        query = query.where(MI.item_index > after)
    rows: list[Row[Any]] = [cast(Row[Any], row) for row in conn.execute(query)]
    more = len(rows) > limit
    rows = rows[:limit]
    return ItemPage(rows, rows[-1].item_index if more and rows else None)
