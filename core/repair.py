"""Repairing a failed execution by hand: ``resolve`` a failed step with an output an
operator supplies, or ``skip`` it; the execution then goes on from there.

Each is one transaction: the step's compare-and-set (failed -> succeeded with the
output, or failed -> skipped; retry edges of the state machine) with its event row
naming who did it and why, and the execution re-opened as an explicit retry re-opens it
(``core.executions.retry_execution``: back to pending, to be admitted like a new
execution; its other unfinished steps go back to pending too). The caller sends its
start after the commit. A resolved step counts as done for its dependents, which run
with its output; a skipped step's dependents follow their triggers: ``all_success``
ones are skipped (and theirs, on through the DAG), ``none_failed`` and ``all_done`` ones
run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, update

from core import statements as sql
from core.errors import FieldError, InputValidationError, InvalidTransition, StepNotFound
from core.executions import check_payload, retry_execution
from core.models import StepExecution
from core.sql import utcnow
from core.states import EXECUTIONS, ExecutionStatus, StepStatus
from core.transitions import transition_step, transition_steps
from core.workflows import MapSpec, Step, Workflow

log = logging.getLogger(__name__)

SE = StepExecution.__table__.c

# The executions a repair re-opens: those an explicit retry may re-open.
REOPENED = EXECUTIONS.sources_of(ExecutionStatus.PENDING, retry=True)


@dataclass(frozen=True)
class Repair:
    """A repair applied: the execution to start again (its workflow and priority), and
    the steps it skipped beyond the one repaired."""

    execution_id: str
    workflow: str
    priority: int
    skipped: tuple[str, ...] = ()


def checked_output(workflow: Workflow, step_name: str, output: Any, max_bytes: int) -> Any:
    """``output`` as the step's return annotation takes it, as stored JSON; an
    InputValidationError naming each bad field (``output.<path>``) otherwise."""
    step = workflow.steps.get(step_name)
    if step is None:
        raise InputValidationError(
            f"workflow {workflow.name!r} has no step {step_name!r}",
            [{"field": "step", "message": "no such step"}],
        )
    if isinstance(step.wait, MapSpec) and step.wait.child is None:
        # A map's output is the list of its items' outputs (None where a tolerated item
        # failed); its return annotation is an item's.
        if not isinstance(output, list):
            raise InputValidationError(
                f"output for map step {step_name!r} must be a list of its items' outputs",
                [{"field": "output", "message": "not a list"}],
            )
        tolerated = step.wait.tolerate.max_failed != 0
        output = [
            None
            if item is None and tolerated
            else _fitted(step, step_name, item, ["output", str(index)])
            for index, item in enumerate(output)
        ]
    else:
        output = _fitted(step, step_name, output, ["output"])
    # Storable JSON within CONVEYOR_MAX_PAYLOAD_BYTES, as a step's own output must be;
    # else InputValidationError naming the problem.
    check_payload("output", output, max_bytes)
    return output


def _fitted(step: Step, step_name: str, value: Any, where: list[str]) -> Any:
    """``value`` as the step's return annotation takes it, as JSON (any JSON without
    one); an InputValidationError naming each bad field under ``where``."""
    if step.output is None:
        return value
    try:
        fitted = step.output.validate_python(value)
    except ValidationError as error:
        fields: list[FieldError] = [
            {
                "field": ".".join([*where, *(str(p) for p in e["loc"])]),
                "message": e["msg"],
            }
            for e in error.errors(include_url=False, include_input=False)
        ]
        problems = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        raise InputValidationError(
            f"output for step {step_name!r} does not fit its return type: {problems}",
            fields,
        ) from None
    return step.to_json(fitted)


def _known(execution_id: str, step_name: str, definition: Workflow) -> None:
    """StepNotFound (404) for a step the execution's workflow does not have."""
    if step_name not in definition.steps:
        raise StepNotFound(execution_id, step_name)


def _who(actor: str, reason: str | None) -> str:
    return f"by {actor}" + (f": {reason}" if reason else "")


def _reopen(
    conn: Connection,
    execution_id: str,
    workflow: Workflow,
    why: str,
    keep: tuple[str, ...] = (),
) -> Repair:
    current = conn.execute(sql.select_execution_status(execution_id)).first()
    result = retry_execution(
        conn,
        execution_id,
        workflow.upstream_map(),
        workflow.deadline,
        reason=why,
        sources=REOPENED,
        keep=keep,
    )
    if not result.applied:
        status = current.status if current is not None else "gone"
        raise InvalidTransition(
            "execution",
            status,
            ExecutionStatus.PENDING.value,
            "a step is repaired only once its execution ended failed, cancelled or timed "
            "out (cancel a running one first, or let it end)",
        )
    row = conn.execute(sql.execution_routes([execution_id])).one()
    return Repair(execution_id, row.workflow_id, row.priority)


def _lock_execution(conn: Connection, execution_id: str) -> None:
    """Lock the execution's row before the step's, in the order a retry takes them
    (execution, then its steps), so that a repair racing a retry waits for it rather
    than deadlocking (PostgreSQL; SQLite's writers are serial)."""
    conn.execute(sql.select_execution_status(execution_id).with_for_update())


def _failed_step(
    conn: Connection,
    execution_id: str,
    step_name: str,
    target: StepStatus,
    why: str,
    values: dict[str, Any] | None = None,
) -> None:
    moved = transition_step(
        conn,
        execution_id,
        step_name,
        target,
        frozenset({StepStatus.FAILED}),
        reason=why,
        retry=True,
        values=values,
    )
    if not moved.applied:
        raise InvalidTransition(
            "step",
            moved.current_status,
            target.value,
            f"only a failed step is resolved or skipped; step {step_name!r} is "
            f"{moved.current_status}",
        )


def resolve_step(
    conn: Connection,
    execution_id: str,
    step_name: str,
    output: Any,
    *,
    actor: str,
    reason: str | None,
    definition: Workflow,
    max_payload_bytes: int,
) -> Repair:
    """Complete failed step ``step_name`` with ``output`` (checked against its return
    annotation and ``max_payload_bytes``: InputValidationError naming the field, nothing
    changed) and re-open its
    execution, whose dependents then run with that output. InvalidTransition (nothing
    changed) when the step is not failed or the execution has not ended."""
    _known(execution_id, step_name, definition)
    stored = checked_output(definition, step_name, output, max_payload_bytes)
    why = f"resolved {_who(actor, reason)}"
    _lock_execution(conn, execution_id)
    _failed_step(
        conn,
        execution_id,
        step_name,
        StepStatus.SUCCEEDED,
        why,
        {"output_data": stored, "error": None, "finished_at": utcnow()},
    )
    return _reopen(conn, execution_id, definition, why)


def skip_step(
    conn: Connection,
    execution_id: str,
    step_name: str,
    *,
    actor: str,
    reason: str | None,
    definition: Workflow,
) -> Repair:
    """Skip failed step ``step_name`` and re-open its execution: its ``all_success``
    dependents are skipped (on through the DAG), the others run by their triggers."""
    _known(execution_id, step_name, definition)
    why = f"skipped {_who(actor, reason)}"
    _lock_execution(conn, execution_id)
    _failed_step(conn, execution_id, step_name, StepStatus.SKIPPED, why)
    repair = _reopen(conn, execution_id, definition, why, keep=(step_name,))
    skipped: list[str] = []
    frontier = [step_name]
    while frontier:
        name = frontier.pop(0)
        plain = [d for d in definition.downstream(name) if d not in definition.gated]
        if not plain:
            continue
        moved = transition_steps(
            conn,
            execution_id,
            plain,
            StepStatus.SKIPPED,
            frozenset({StepStatus.PENDING}),
            reason=f"upstream step {name} skipped",
        )
        for row in moved:
            name_skipped = row.step_name or ""
            skipped.append(name_skipped)
            frontier.append(name_skipped)
            # The re-open counted it as not done for its gated dependents (a none_failed
            # or all_done step waits for every upstream step to end): it has ended now.
            gated = definition.gated_downstream(name_skipped)
            if gated:
                conn.execute(
                    update(StepExecution)
                    .where(
                        SE.execution_id == execution_id,
                        SE.step_name.in_(gated),
                        SE.status == StepStatus.PENDING.value,
                    )
                    .values(unmet_deps=SE.unmet_deps - 1)
                )
    return Repair(repair.execution_id, repair.workflow, repair.priority, tuple(skipped))
