"""Compare-and-set transitions of one execution or of steps, each with its event rows.

The general form the state managers expose (``transition_execution``, ``transition_step``,
``transition_steps``) and the helpers every unit of work uses to turn the rows a
transition returned into results and event rows. Allowed sources come from
``core.states``: a request for an edge the table does not have raises InvalidTransition
before anything is sent; a row elsewhere is *not applied*, never an error.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Row

from core import statements as sql
from core.errors import ExecutionNotFound, StepNotFound
from core.models import ExecutionEvent
from core.outcomes import TransitionResult
from core.states import EXECUTIONS, STEPS, ExecutionStatus, StepStatus

log = logging.getLogger(__name__)


def event_dict(
    execution_id: str,
    step_name: str | None,
    source: str | None,
    target: str,
    attempt: int | None,
    reason: str | None,
) -> dict[str, Any]:
    """One event row: a transition of an execution (``step_name`` None) or of a step."""
    return {
        "execution_id": execution_id,
        "step_name": step_name,
        "from_status": source,
        "to_status": target,
        "attempt": attempt,
        "reason": reason,
    }


def transition_of(row: Row[Any], step: bool) -> TransitionResult:
    return TransitionResult(
        applied=True,
        execution_id=row.execution_id,
        step_name=row.step_name if step else None,
        from_status=row.previous_status,
        to_status=row.status,
        attempt=row.attempt,
        parent_execution_id=None if step else row._mapping.get("parent_execution_id"),
    )


def event_rows(results: Sequence[TransitionResult], reason: str | None) -> list[dict[str, Any]]:
    return [
        event_dict(r.execution_id, r.step_name, r.from_status, r.to_status, r.attempt, reason)
        for r in results
    ]


def execution_sources(
    target: ExecutionStatus, expected: Collection[ExecutionStatus] | None, retry: bool
) -> frozenset[ExecutionStatus]:
    """The statuses a transition to ``target`` may start from, refusing illegal requests."""
    allowed = EXECUTIONS.sources_of(target, retry=retry)
    if expected is None:
        if not allowed:
            EXECUTIONS.check(target, target, retry=retry)  # raises: nothing leads there
        return allowed
    for source in expected:
        EXECUTIONS.check(source, target, retry=retry)
    return frozenset(expected)


def step_sources(
    target: StepStatus, expected: Collection[StepStatus] | None, retry: bool
) -> frozenset[StepStatus]:
    """The statuses a step transition to ``target`` may start from."""
    allowed = STEPS.sources_of(target, retry=retry)
    if expected is None:
        if not allowed:
            STEPS.check(target, target, retry=retry)
        return allowed
    for source in expected:
        STEPS.check(source, target, retry=retry)
    return frozenset(expected)


def transition_execution(
    conn: Connection,
    execution_id: str,
    target: ExecutionStatus,
    sources: frozenset[ExecutionStatus],
    *,
    reason: str | None,
    retry: bool = False,
    values: Mapping[str, Any] | None = None,
) -> TransitionResult:
    """Move one execution to ``target`` if it is in one of ``sources``; log the event."""
    update = sql.transition_execution(execution_id, target, sources, retry=retry, values=values)
    row = conn.execute(update).first()
    if row is None:
        current = conn.execute(sql.select_execution_status(execution_id)).scalar_one_or_none()
        if current is None:
            raise ExecutionNotFound(execution_id)
        log.info("execution %s -> %s not applied: it is %s", execution_id, target.value, current)
        return TransitionResult(
            applied=False,
            execution_id=execution_id,
            to_status=target.value,
            current_status=current,
        )
    result = transition_of(row, step=False)
    conn.execute(sql.insert_rows(ExecutionEvent), event_rows([result], reason))
    return result


def transition_step(
    conn: Connection,
    execution_id: str,
    step_name: str,
    target: StepStatus,
    sources: frozenset[StepStatus],
    *,
    reason: str | None,
    attempt: int | None = None,
    retry: bool = False,
    values: Mapping[str, Any] | None = None,
) -> TransitionResult:
    """Move one step to ``target`` if it is in one of ``sources`` (and at ``attempt``)."""
    update = sql.transition_steps(
        execution_id, [step_name], target, sources, attempt=attempt, retry=retry, values=values
    )
    row = conn.execute(update).first()
    if row is None:
        current = conn.execute(sql.select_step_status(execution_id, step_name)).first()
        if current is None:
            if conn.execute(sql.select_execution_status(execution_id)).first() is None:
                raise ExecutionNotFound(execution_id)
            raise StepNotFound(execution_id, step_name)
        log.info(
            "step %s/%s -> %s not applied: it is %s (attempt %s)",
            execution_id,
            step_name,
            target.value,
            current.status,
            current.attempt,
        )
        return TransitionResult(
            applied=False,
            execution_id=execution_id,
            step_name=step_name,
            to_status=target.value,
            current_status=current.status,
            attempt=current.attempt,
        )
    result = transition_of(row, step=True)
    conn.execute(sql.insert_rows(ExecutionEvent), event_rows([result], reason))
    return result


def transition_steps(
    conn: Connection,
    execution_id: str,
    step_names: Sequence[str] | None,
    target: StepStatus,
    sources: frozenset[StepStatus],
    *,
    reason: str | None,
) -> list[TransitionResult]:
    """Move every named step (None: all) that is in ``sources``; one statement, one insert."""
    rows = conn.execute(sql.transition_steps(execution_id, step_names, target, sources)).all()
    results = [transition_of(row, step=True) for row in rows]
    if results:
        conn.execute(sql.insert_rows(ExecutionEvent), event_rows(results, reason))
    return results
