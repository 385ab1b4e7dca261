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
- ``retry_failed_items`` re-runs only the failed (and cancelled) items of a failed map.

Publishing what a transaction set in motion is the caller's, after its commit
(``WaitOutcome.items``, ``ItemCompletion``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, Row, select, tuple_, update

from core.config import get_settings
from core.database import get_database
from core.errors import MapInputError, MapItemsFailed, NothingToRetry
from core.map_statements import (
    MI,
    due_items,
    map_statements,
    recover_items,
    republish_items,
    stalled_items,
)
from core.map_statements import cancel_items_of as cancel_items_statement
from core.models import MapItem, StepExecution
from core.outcomes import Claim, Route, TransitionResult, WaitOutcome
from core.sql import utcnow
from core.states import StepStatus
from core.step_statements import hot_path
from core.waits import (
    DefinitionOf,
    WaitEnd,
    WaitingExecution,
    end_waits,
    read_execution,
    upstream_outputs,
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
    map_ended: str | None = None


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
    items = upstream_outputs(conn, execution, _only_over(step, spec), known_outputs)[spec.over]
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


def _only_over(step: Step, spec: MapSpec) -> Step:
    """The map's item list is the ``over`` step's output alone."""
    return Step(name=step.name, fn=step.fn, depends_on=(spec.over,))


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
) -> Claim:
    spec = step.wait
    assert isinstance(spec, MapSpec)
    sql_ = hot_path(conn.dialect.name)
    ms = map_statements(conn.dialect.name)
    if route is None:
        found = conn.execute(sql_.execution, {"eid": execution_id}).one()
        route = Route(found.workflow_id, found.workflow_version, found.priority)
        input_data = found.input_data
    item = conn.execute(
        ms.item_input, {"eid": execution_id, "over": spec.over, "idx": index}
    ).scalar_one()
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
        item=item,
    )


def running_item(
    conn: Connection, execution_id: str, step: Step, index: int, task_id: str
) -> Claim | None:
    """The claim a delivery (``task_id``) holds on a running item, if it still does."""
    row = conn.execute(
        MapItem.__table__.select()
        .with_only_columns(MI.attempt, MI.recoveries)
        .where(
            MI.execution_id == execution_id,
            MI.step_name == step.name,
            MI.item_index == index,
            MI.status == StepStatus.RUNNING.value,
            MI.celery_task_id == task_id,
        )
    ).first()
    if row is None:
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
    counted = _record(conn, claim, 0, ms.succeed, {"out": output})
    if counted is None:
        return ItemCompletion(applied=False)
    return _ended(conn, claim, counted, workflow, 0, continue_as, definition_of)


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
            children = _cancel_child_items(conn, eid, name, spec.child.workflow.name)
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
        result.map_ended = StepStatus.FAILED.value
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
        result.map_ended = StepStatus.SUCCEEDED.value
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


def cancel_items_of(conn: Connection, execution_ids: Sequence[str]) -> int:
    """Cancel every open item of the executions' maps (cancelled or timed out with
    their execution): none is left queued to be claimed."""
    if not execution_ids:
        return 0
    return int(conn.execute(cancel_items_statement(execution_ids)).rowcount)


def item_status(conn: Connection, execution_id: str, step: str, index: int) -> str | None:
    """An item's status (None: no such item)."""
    return conn.execute(
        MapItem.__table__.select()
        .with_only_columns(MI.status)
        .where(MI.execution_id == execution_id, MI.step_name == step, MI.item_index == index)
    ).scalar()


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


# --- child maps: each item an execution of the child workflow ---------------------------


def child_item_id(execution_id: str, step_name: str, index: int, attempt: int) -> str:
    """The id of the child execution attempt ``attempt`` of item ``index`` starts: the
    same on every replay of the transaction that starts it."""
    from core.children import CHILD_NAMESPACE

    return str(uuid.uuid5(CHILD_NAMESPACE, f"{execution_id}/{step_name}[{index}]/{attempt}"))


def start_child_item(
    conn: Connection,
    execution_id: str,
    workflow: Workflow,
    step: Step,
    index: int,
    task_id: str | None,
    definition_of: DefinitionOf,
) -> WaitOutcome | None:
    """Claim a queued item of a child map and start its child execution in the same
    transaction (its start goes to the outcome); the item stays running, with no
    heartbeat (its work is the child's), until the child's end ends it
    (``child_item_ended``). None when the claim loses. An input that raises, that the
    child refuses, or nesting too deep fails the item (then its map, by its tolerance)."""
    from core.children import _deadline
    from core.errors import DefinitionError, InputValidationError
    from core.executions import create_child_execution, new_execution, step_specs
    from core.waits import NotEstablished, call_user, context_of

    spec = step.wait
    assert isinstance(spec, MapSpec)
    assert spec.child is not None
    ms = map_statements(conn.dialect.name)
    key = {"eid": execution_id, "step": step.name, "idx": index}
    row = conn.execute(ms.claim, {**key, "worker": None, "task_id": task_id}).first()
    if row is None:
        return None
    # Its work is the child's: the stall scan, which reads heartbeats, leaves it alone.
    conn.execute(
        update(MapItem)
        .where(MI.execution_id == execution_id, MI.step_name == step.name)
        .where(MI.item_index == index)
        .values(heartbeat_at=None)
    )
    claim = _item_claim(conn, execution_id, step, index, row.attempt, row.recoveries, False)
    execution = read_execution(conn, execution_id, workflow)
    parent = execution.row
    outcome = WaitOutcome()
    identifier = child_item_id(execution_id, step.name, index, row.attempt)
    child = spec.child.workflow
    try:
        depth = int(parent.depth or 0) + 1
        limit = get_settings().max_child_depth
        if depth > limit:
            raise NotEstablished(
                DefinitionError(
                    f"child map {step.name!r} of execution {execution_id} would nest {depth} "
                    f"levels below its root execution; the limit is {limit}"
                )
            )
        data = claim.item
        if spec.child.input is not None:
            context = replace(context_of(execution, step, row.attempt), map_index=index)
            data = call_user(spec.child.input, context, claim.item, **claim.upstream)
        new = new_execution(
            child.name,
            child.validate_input(data),
            max_payload_bytes=get_database().settings.max_payload_bytes,
            workflow_version=child.version,
            triggered_by=parent.triggered_by,
            priority=parent.priority,
            deadline_at=_deadline(child, parent.deadline_at),
            steps=step_specs(child),
        )
    except (NotEstablished, InputValidationError) as refused:
        error = refused.error if isinstance(refused, NotEstablished) else refused
        ended = fail_item(conn, claim, wait_error(error), workflow, definition_of)
        outcome.items += ended.queued
        outcome.routes[execution_id] = execution.route
        if ended.woken is not None:
            outcome.merge(ended.woken)
        outcome.item_counts.append((workflow.name, step.name, "failed", 1))
        return outcome
    new = replace(
        new,
        execution_id=identifier,
        parent_execution_id=execution_id,
        parent_step_name=step.name,
        parent_attempt=row.attempt,
        parent_item_index=index,
        root_execution_id=parent.root_execution_id or execution_id,
        depth=depth,
    )
    if create_child_execution(conn, new):
        outcome.starts.append((identifier, child.name, parent.priority))
    return outcome


def child_item_ended(
    conn: Connection, child: Row[Any], outcome: WaitOutcome, definition_of: DefinitionOf
) -> bool:
    """A child of a child map ended (in this transaction): its item ends with the
    child's output, or fails with ChildFailed (its ``Retry`` decides: a retry starts a
    new child when due). False when this process does not know the parent's workflow
    (the reconciler's safety net tells it later)."""
    from core.children import _failure
    from core.errors import ChildFailed
    from core.statements import mark_parent_woken
    from core.waits import execution_of

    parent_id, name, index = (
        child.parent_execution_id,
        child.parent_step_name,
        child.parent_item_index,
    )
    execution = execution_of(conn, parent_id, definition_of)
    step = None if execution is None else execution.workflow.steps.get(name)
    if execution is None or step is None:
        return False
    conn.execute(mark_parent_woken([child.execution_id]))
    item = conn.execute(
        MapItem.__table__.select()
        .with_only_columns(MI.status, MI.attempt, MI.recoveries)
        .where(MI.execution_id == parent_id, MI.step_name == name, MI.item_index == index)
    ).first()
    if (
        item is None
        or item.status != StepStatus.RUNNING.value
        or item.attempt != child.parent_attempt
    ):
        return True  # the item moved on (cancelled, its map ended): nothing to end
    workflow = execution.workflow
    claim = Claim(
        parent_id,
        name,
        item.attempt,
        item.recoveries,
        execution.route,
        execution.row.input_data,
        {},
        map_index=index,
    )
    if child.status == StepStatus.SUCCEEDED.value:
        ended = complete_item(conn, claim, child.output_data, workflow, None, definition_of)
        result = "succeeded"
    else:
        error = ChildFailed(
            _failure(child.execution_id, child.workflow_id, child.status, child.error)
        )
        record = wait_error(error)
        tries = item.attempt - item.recoveries
        if step.retry.should_retry(error, tries):
            # Queued again, due after the backoff: the reconciler sends it when due.
            retry_item(conn, claim, step.retry.delay(tries), record)
            outcome.item_counts.append((workflow.name, name, "retried", 1))
            return True
        ended = fail_item(conn, claim, record, workflow, definition_of)
        result = "failed"
    if ended.applied:
        outcome.item_counts.append((workflow.name, name, result, 1))
    outcome.items += ended.queued
    outcome.routes[parent_id] = execution.route
    if ended.woken is not None:
        outcome.merge(ended.woken)
    return True


def _cancel_child_items(
    conn: Connection, execution_id: str, step: str, child_workflow: str
) -> WaitOutcome:
    """Cancel the open child executions of a child map that failed (each with its own
    tree, as ``conveyor cancel`` would)."""
    from core.children import cancel_tree
    from core.statements import open_children_of_step

    outcome = WaitOutcome()
    for child in conn.execute(open_children_of_step(execution_id, step)).scalars():
        cancelled = cancel_tree(conn, child, f"map {step} failed")
        outcome.merge(cancelled.woken)
        if cancelled.result.applied:
            outcome.finished.append((cancelled.result, child_workflow))
    return outcome


# --- re-running the failed items -------------------------------------------------------


def retry_failed_items(
    conn: Connection,
    execution_id: str,
    graph: Mapping[str, Sequence[str]],
    deadline: timedelta | None,
) -> tuple[TransitionResult, dict[str, int]]:
    """Retry a failed execution keeping what its failed maps' items did: the execution
    goes back to pending (``core.executions.retry_execution``), and the failed and
    cancelled items of each failed map step go pending at their next attempt (their
    retry policy whole again); succeeded items keep their outputs. When the map runs
    again (``expand``) it runs those items only, and aggregates every item's output.
    How many items each map runs again. NothingToRetry when no map step failed with
    items to run again."""
    from core.executions import retry_execution

    failed_maps = list(
        conn.execute(
            select(SE_TABLE.c.step_name).where(
                SE_TABLE.c.execution_id == execution_id,
                SE_TABLE.c.status == StepStatus.FAILED.value,
                SE_TABLE.c.wait_kind == "map",
            )
        ).scalars()
    )
    again = (StepStatus.FAILED.value, StepStatus.CANCELLED.value)
    counts = {
        name: sum(
            n for status, n in map_counts(conn, execution_id, name).items() if status in again
        )
        for name in failed_maps
    }
    counts = {name: n for name, n in counts.items() if n}
    if not counts:
        raise NothingToRetry(
            execution_id,
            "no map step failed with items to run again (retry the execution whole instead)",
        )
    result = retry_execution(conn, execution_id, graph, deadline, reason="retry failed items")
    if not result.applied:
        return result, {}
    conn.execute(
        update(MapItem)
        .where(
            MI.execution_id == execution_id,
            MI.step_name.in_(list(counts)),
            MI.status.in_(again),
        )
        .values(
            status=StepStatus.PENDING.value,
            # SET reads the old values: the attempts so far are this run's base.
            attempt=MI.attempt + 1,
            recoveries=MI.attempt,
            attempt_base=MI.attempt,
            worker=None,
            celery_task_id=None,
            queued_at=None,
            started_at=None,
            finished_at=None,
            heartbeat_at=None,
            next_attempt_at=None,
            republished_at=None,
            republishes=0,
        )
    )
    return result, counts


# --- the reconciler's part -----------------------------------------------------------


@dataclass
class ItemRepair:
    """What a reconciler pass did to map items: those to (re)publish, and counts."""

    publish: list[ItemKey] = field(default_factory=list)
    recovered: int = 0
    crashed: int = 0
    republished: int = 0


def reconcile_items(
    conn: Connection,
    *,
    stall_timeout: float,
    republish_after: float,
    limit: int,
    max_recoveries: int,
    gap: float,
    definition_of: DefinitionOf,
    outcome: WaitOutcome,
) -> ItemRepair:
    """The reconciler's pass over map items, as over steps: running items whose worker
    is gone (old heartbeat, on the evidence of a reachable database) are queued again
    at the next attempt, or failed (StepCrashed) when this run's crash recoveries are
    spent; queued items that are due (a retry's backoff over) or whose message went
    unclaimed (``republish_after``, doubling per re-send) are sent again."""
    from core.errors import StepCrashed

    repair = ItemRepair()
    stalled = conn.execute(stalled_items(stall_timeout, gap, limit)).all()
    give_up = [r for r in stalled if r.recoveries - r.attempt_base >= max_recoveries]
    again = [r for r in stalled if r.recoveries - r.attempt_base < max_recoveries]
    if again:
        keys = [(r.execution_id, r.step_name, r.item_index) for r in again]
        requeued = conn.execute(recover_items(keys)).all()
        repair.recovered = len(requeued)
        repair.publish += [(r.execution_id, r.step_name, r.item_index) for r in requeued]
        _events(
            conn,
            [
                _event(
                    r.execution_id,
                    r.step_name,
                    StepStatus.WAITING.value,
                    r.attempt,
                    f"item {r.item_index}: worker lost, queued again",
                )
                for r in requeued
            ],
        )
    for row in give_up:
        route_row = conn.execute(
            hot_path(conn.dialect.name).execution, {"eid": row.execution_id}
        ).one()
        workflow = definition_of(route_row.workflow_id, route_row.workflow_version)
        step = workflow.steps.get(row.step_name) if workflow else None
        if workflow is None or step is None:
            continue  # a worker that knows the workflow fails it
        claim = _item_claim(
            conn, row.execution_id, step, row.item_index, row.attempt, row.recoveries, False
        )
        crash = StepCrashed(
            f"{row.step_name}[{row.item_index}]",
            row.worker,
            row.attempt - row.attempt_base,
            row.recoveries - row.attempt_base,
        )
        ended = fail_item(conn, claim, wait_error(crash), workflow, definition_of)
        if ended.applied:
            repair.crashed += 1
            repair.publish += ended.queued
            if ended.woken is not None:
                outcome.merge(ended.woken)
    due = conn.execute(due_items(republish_after, limit)).all()
    if due:
        keys = [(r.execution_id, r.step_name, r.item_index) for r in due]
        sent = conn.execute(republish_items(keys)).all()
        repair.republished = len(sent)
        repair.publish += [(r.execution_id, r.step_name, r.item_index) for r in sent]
    return repair


def map_counts(conn: Connection, execution_id: str, step: str) -> dict[str, int]:
    """A map's items by status."""
    ms = map_statements(conn.dialect.name)
    return {r[0]: int(r[1]) for r in conn.execute(ms.counts, {"eid": execution_id, "step": step})}


__all__ = [
    "ItemCompletion",
    "cancel_items_of",
    "claim_item",
    "complete_item",
    "expand",
    "fail_item",
    "heartbeat_items",
    "item_status",
    "map_counts",
    "reconcile_items",
    "retry_failed_items",
    "retry_item",
    "running_item",
]
