"""Child workflows: a wait node that starts an execution of another workflow and waits
for its end (``wf.child``).

- *Starting* (``start_child``, inside the transaction that establishes the node): the
  child's input is ``input(ctx, **upstream)`` checked against the child's input model;
  its id derives from (parent, step, attempt), so a replay of that transaction finds the
  child it inserted instead of starting another; it is inserted pending with its steps,
  and the parent step is armed with its id in the same transaction. The child's start is
  published after the commit (``WaitOutcome.starts``; the reconciler resends starts of
  pending executions that were never started).
- *Waking* (``wake_parents``, in the transaction that ends the child, whichever path
  ends it): the parent step succeeds with the child's output, or fails with ChildFailed
  and follows its ``Retry`` (a retry starts a new child: the id derives from the
  attempt). ``parent_woken_at`` records that the parent was told; the reconciler's
  safety net (``wake_unwoken``) tells those a finish had to skip.
- *Cancelling* a parent cancels its open descendants in the same transaction
  (``core.executions.end_trees``); ``cancel_tree`` also names the running tasks of the
  whole tree, for the engine to revoke.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, select

from core import statements as sql
from core.config import get_settings
from core.database import get_database
from core.errors import ChildFailed, DefinitionError
from core.executions import (
    DefinitionOf,
    NewExecution,
    create_child_execution,
    end_execution,
    new_execution,
    step_specs,
)
from core.models import StepExecution
from core.outcomes import TransitionResult, WaitOutcome
from core.states import EXECUTIONS, ExecutionStatus, StepStatus
from core.wait_statements import wait_statements
from core.waits import (
    NotEstablished,
    WaitEnd,
    WaitingExecution,
    call_user,
    context_of,
    end_waits,
    execution_of,
    fail_or_retry,
    upstream_outputs,
)
from core.workflows import ChildWait, Step, Workflow

log = logging.getLogger(__name__)

# The namespace of child execution ids: uuid5(CHILD_NAMESPACE, "<parent>/<step>/<attempt>").
CHILD_NAMESPACE = uuid.UUID("6c0f5a9e-3b1d-5d7e-9a4c-c0c4117d0c11")
FINAL = frozenset(s.value for s in EXECUTIONS.final)


def child_id(parent_id: str, step_name: str, attempt: int) -> str:
    """The id of the child that attempt ``attempt`` of step ``step_name`` starts: the
    same on every replay of the transaction that starts it, another at the next attempt."""
    return str(uuid.uuid5(CHILD_NAMESPACE, f"{parent_id}/{step_name}/{attempt}"))


def start_child(
    conn: Connection,
    execution: WaitingExecution,
    step: Step,
    attempt: int,
    wait: ChildWait,
    known_outputs: Mapping[str, Any],
    outcome: WaitOutcome,
) -> WaitEnd | None:
    """Insert the child execution of this attempt of ``step`` (pending, with its steps)
    unless it exists, and arm the parent step with its id; its start goes to
    ``outcome.starts``. A child found already ended (a replay after its end) ends the
    parent step at once: the end is returned. NotEstablished or InputValidationError
    (the node fails) for an input that cannot be computed or that the child refuses,
    and for nesting deeper than CONVEYOR_MAX_CHILD_DEPTH."""
    parent = execution.row
    child = wait.workflow
    parent_id = execution.execution_id
    identifier = child_id(parent_id, step.name, attempt)
    found = conn.execute(sql.select_child(identifier)).first()
    if found is None:
        data = None
        if wait.input is not None:
            data = call_user(
                wait.input,
                context_of(execution, step, attempt),
                **upstream_outputs(conn, execution, step, known_outputs),
            )
        new = child_execution(execution, step.name, attempt, child, data, identifier)
        if create_child_execution(conn, new):
            outcome.starts.append((identifier, child.name, parent.priority))
    arm = {"eid": parent_id, "step": step.name, "att": attempt}
    none = {"wake_at": None, "event": None, "key": None}
    conn.execute(wait_statements().arm, {**arm, **none, "child": identifier})
    if found is not None and found.status in FINAL:
        # Replayed after the child ended: the parent step ends now, as its wake would
        # have ended it.
        conn.execute(sql.mark_parent_woken([identifier]))
        if found.status == ExecutionStatus.SUCCEEDED.value:
            return WaitEnd(
                parent_id,
                step.name,
                attempt,
                StepStatus.SUCCEEDED.value,
                output=found.output_data,
                reason=f"child {identifier} succeeded",
                how="child",
            )
        message = _failure(identifier, found.workflow_id, found.status, found.error)
        return WaitEnd(
            parent_id,
            step.name,
            attempt,
            StepStatus.FAILED.value,
            error={"type": ChildFailed.__name__, "message": message},
            reason=f"failed: {ChildFailed.__name__}",
            how="child",
        )
    return None


def child_execution(
    execution: WaitingExecution,
    step_name: str,
    attempt: int,
    child: Workflow,
    data: Any,
    identifier: str,
    item_index: int | None = None,
) -> NewExecution:
    """The child execution ``identifier`` that attempt ``attempt`` of the parent's step
    ``step_name`` (item ``item_index`` of a child map) starts, with input ``data``: the
    parent's priority, triggering user and tree, a deadline no later than the parent's.
    NotEstablished when it would nest deeper than CONVEYOR_MAX_CHILD_DEPTH;
    InputValidationError when the child's input model refuses ``data``."""
    parent, parent_id = execution.row, execution.execution_id
    depth = int(parent.depth or 0) + 1
    limit = get_settings().max_child_depth
    if depth > limit:
        raise NotEstablished(
            DefinitionError(
                f"child {step_name!r} of execution {parent_id} would nest {depth} levels "
                f"below its root execution; the limit is {limit} (CONVEYOR_MAX_CHILD_DEPTH)"
            )
        )
    new = new_execution(
        child.name,
        child.validate_input(data),
        max_payload_bytes=get_database().settings.max_payload_bytes,
        workflow_version=child.version,
        # Whoever may see the parent sees its children (members see their own).
        triggered_by=parent.triggered_by,
        priority=parent.priority,
        deadline_at=_deadline(child, parent.deadline_at),
        steps=step_specs(child),
    )
    from core.limits import partition_key
    from core.shapes import shape_of

    return replace(
        new,
        limit_key=partition_key(child, new.input_data),
        shape=shape_of(child),
        execution_id=identifier,
        parent_execution_id=parent_id,
        parent_step_name=step_name,
        parent_attempt=attempt,
        parent_item_index=item_index,
        root_execution_id=parent.root_execution_id or parent_id,
        depth=depth,
    )


def _deadline(child: Workflow, parent_deadline: datetime | None) -> datetime | None:
    """The child's deadline: its workflow's, never past its parent's (either may be
    None)."""
    own = None if child.deadline is None else datetime.now(UTC) + child.deadline
    if own is None or parent_deadline is None:
        return own or parent_deadline
    return min(own, parent_deadline)


def _failure(identifier: str, workflow: str, status: str, error: Any) -> str:
    """What ChildFailed says: the child, how it ended, and its own error."""
    message = f"child execution {identifier} of workflow {workflow!r} ended {status}"
    if isinstance(error, dict) and error:
        where = f" in step {error['step']}" if error.get("step") else ""
        kind = error.get("type", "error")
        return f"{message}: {kind}{where}: {error.get('message', '')}"
    return message


# --- telling parents ------------------------------------------------------------------


def wake_parents(conn: Connection, outcome: WaitOutcome, definition_of: DefinitionOf) -> None:
    """Executions in ``outcome.finished`` that are children wake their parent step."""
    wake_parents_of(conn, (), outcome, definition_of)


def wake_parents_of(
    conn: Connection,
    execution_ids: Iterable[str],
    outcome: WaitOutcome,
    definition_of: DefinitionOf,
) -> list[str]:
    """The executions ``execution_ids`` (ended in this transaction) and those in
    ``outcome.finished`` that are children wake their parent step: succeeded with the
    child's output, or failed with ChildFailed (its Retry decides). A parent that ends
    so is added to ``outcome.finished`` and wakes its own parent in turn (bounded by the
    depth). One primary-key probe per round when none is a child. The children whose
    parents were told (or no longer wait on them)."""
    told: list[str] = []
    seen: set[str] = set()
    candidates = [*execution_ids, *(result.execution_id for result, _ in outcome.finished)]
    while True:
        new = sorted({c for c in candidates if c not in seen})
        if not new:
            return told
        seen.update(new)
        rows = conn.execute(sql.unwoken_children(new)).all()
        if rows:
            told += _tell_parents(conn, rows, outcome, definition_of)
        candidates = [result.execution_id for result, _ in outcome.finished]


def wake_unwoken(
    conn: Connection, limit: int, outcome: WaitOutcome, definition_of: DefinitionOf
) -> list[str]:
    """The reconciler's safety net: up to ``limit`` ended children whose parent was not
    told (its step was held by another transaction, or the process that ended the child
    did not know the parent's workflow) tell it now. The children handled."""
    rows = conn.execute(sql.unwoken_children_due(limit)).all()
    if not rows:
        return []
    told = _tell_parents(conn, rows, outcome, definition_of)
    wake_parents(conn, outcome, definition_of)
    return told


def _tell_parents(
    conn: Connection,
    children: Sequence[Row[Any]],
    outcome: WaitOutcome,
    definition_of: DefinitionOf,
) -> list[str]:
    told: list[str] = []
    for child in children:
        parent_id, step_name = child.parent_execution_id, child.parent_step_name
        if child.parent_item_index is not None:
            # An item of a child map: its item ends (core.maps).
            from core.map_children import child_item_ended

            if child_item_ended(conn, child, outcome, definition_of):
                told.append(child.execution_id)
            else:
                log.warning(
                    "child execution %s ended, but this process does not know the workflow "
                    "of its parent %s; the reconciler tells it",
                    child.execution_id,
                    parent_id,
                )
            continue
        row = conn.execute(sql.parent_step(parent_id, step_name)).first()
        if row is None and _step_exists(conn, parent_id, step_name):
            # Held by another transaction: whoever holds a waiting step is ending it (a
            # cancel of the parent). Left for the safety net, which finds it ended.
            continue
        waits_on_it = (
            row is not None
            and row.status == StepStatus.WAITING.value
            and row.attempt == child.parent_attempt
            and row.child_execution_id == child.execution_id
        )
        if not waits_on_it:
            # The parent moved on (cancelled, timed out, retried): nothing to wake.
            conn.execute(sql.mark_parent_woken([child.execution_id]))
            told.append(child.execution_id)
            continue
        assert row is not None
        execution = execution_of(conn, parent_id, definition_of)
        step = None if execution is None else execution.workflow.steps.get(step_name)
        if execution is None or step is None:
            log.warning(
                "child execution %s ended, but this process does not know the workflow of "
                "its parent %s; the reconciler tells it",
                child.execution_id,
                parent_id,
            )
            continue
        conn.execute(sql.mark_parent_woken([child.execution_id]))
        told.append(child.execution_id)
        if child.status == ExecutionStatus.SUCCEEDED.value:
            end = WaitEnd(
                parent_id,
                step_name,
                child.parent_attempt,
                StepStatus.SUCCEEDED.value,
                output=child.output_data,
                reason=f"child {child.execution_id} succeeded",
                how="child",
            )
            end_waits(conn, [end], {parent_id: execution}, definition_of, outcome)
        else:
            error = ChildFailed(
                _failure(child.execution_id, child.workflow_id, child.status, child.error)
            )
            fail_or_retry(
                conn,
                execution,
                step,
                child.parent_attempt,
                row.recoveries,
                error,
                "child",
                definition_of,
                outcome,
            )
    return told


def _step_exists(conn: Connection, execution_id: str, step_name: str) -> bool:
    """Whether the step row exists (read without waiting for its lock)."""
    if conn.dialect.name != "postgresql":
        return False  # SQLite takes no row locks: a missing row is missing
    found = conn.execute(
        select(StepExecution.step_name).where(
            StepExecution.execution_id == execution_id, StepExecution.step_name == step_name
        )
    ).first()
    return found is not None


# --- cancelling a tree ----------------------------------------------------------------


@dataclass(frozen=True)
class TreeCancel:
    """An execution cancelled with everything below it: its own transition, the Celery
    task ids of the steps that were running in the tree (to revoke), and what the
    cancel set in motion (descendants ended, a parent told)."""

    result: TransitionResult
    running: list[str] = field(default_factory=list)
    woken: WaitOutcome = field(default_factory=WaitOutcome)


def cancel_tree(
    conn: Connection,
    execution_id: str,
    reason: str | None,
    definition_of: DefinitionOf | None = None,
) -> TreeCancel:
    """Cancel an open execution, its open steps and its open descendants with theirs,
    in one transaction (``core.executions.end_execution``)."""
    running = [t for t in conn.execute(sql.running_tasks_of_tree(execution_id)).scalars() if t]
    sources = EXECUTIONS.sources_of(ExecutionStatus.CANCELLED)
    result, woken = end_execution(
        conn, execution_id, ExecutionStatus.CANCELLED, sources, reason, definition_of
    )
    if result.applied:
        from core.limits import free_executions
        from core.waits import registered

        # Its steps' slots freed with the cancel: their keys' next waiters start now, in
        # this transaction (one probe of key_slots' primary key when it held none).
        woken.merge(free_executions(conn, [execution_id], definition_of or registered))
    return TreeCancel(result, running if result.applied else [], woken)
