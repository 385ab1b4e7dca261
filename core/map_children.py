"""Child maps (``wf.child(..., over=)``): each item of the map is an execution of the
child workflow instead of a function call.

- *Starting* (``start_child_item``): the item's message claims it (queued -> running)
  and, in the same transaction, inserts its child execution (pending, with its steps),
  whose id derives from (parent, step, index, attempt): a replay finds the child it made.
  The item has no heartbeat: its work is the child's.
- *Ending* (``child_item_ended``, in the transaction that ends the child, from
  ``core.children``): the item succeeds with the child's output, or fails with
  ChildFailed and follows the map's ``Retry`` (a retry starts a new child when due).
- A child map that fails cancels its open children (``cancel_child_items``).
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection, Row, update

from core.config import get_settings
from core.database import get_database
from core.map_statements import MI, map_statements
from core.maps import _item_claim, complete_item, fail_item, retry_item
from core.models import MapItem
from core.outcomes import Claim, WaitOutcome
from core.states import StepStatus
from core.waits import DefinitionOf, read_execution, wait_error
from core.workflows import MapSpec, Step, Workflow


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
        map_statements(conn.dialect.name).item, {"eid": parent_id, "step": name, "idx": index}
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


def cancel_child_items(
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
