"""The ``--json`` output: executions, steps and workflows as plain JSON documents.

Timestamps are ISO 8601 in UTC, statuses their lowercase values, durations seconds;
every key is always present (null when unset), so scripts need no existence checks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import typer
from pydantic_core import to_jsonable_python

from core.conditions import condition_label
from core.limits import why_held
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from core.schedules import Schedule
from core.shapes import VERSION_WAIT
from core.workflows import Workflow

Document = dict[str, Any]


def emit(document: Any) -> None:
    """Write ``document`` to stdout as one JSON document, with no markup or colour."""
    # to_jsonable_python: schedule inputs are user data (dates, models) checked but kept.
    text = json.dumps(document, indent=2, ensure_ascii=False, default=to_jsonable_python)
    typer.echo(text)


def timestamp(value: datetime | None) -> str | None:
    """ISO 8601 in UTC, or None."""
    return value.astimezone(UTC).isoformat() if value is not None else None


def execution(row: WorkflowExecution) -> Document:
    """An execution's own fields."""
    return {
        "execution_id": row.execution_id,
        "workflow": row.workflow_id,
        "workflow_version": row.workflow_version,
        "status": row.status,
        "attempt": row.attempt,
        "priority": row.priority,
        "idempotency_key": row.idempotency_key,
        "triggered_by": row.triggered_by,
        "input": row.input_data,
        "output": row.output_data,
        "error": row.error,
        "created_at": timestamp(row.created_at),
        "started_at": timestamp(row.started_at),
        "finished_at": timestamp(row.finished_at),
        "deadline_at": timestamp(row.deadline_at),
        "updated_at": timestamp(row.updated_at),
        "parent_execution_id": row.parent_execution_id,
        "root_execution_id": row.root_execution_id,
        "depth": row.depth,
        "parked_at": timestamp(row.parked_at),
        "debounce_key": row.debounce_key,
        "start_at": timestamp(row.start_at),
        "latest_start_at": timestamp(row.latest_start_at),
    }


def wait(
    row: StepExecution, pauses: Mapping[str, datetime | None] | None = None
) -> Document | None:
    """What a waiting wait node, or a step held by its key, waits for (None for any other
    step); ``pauses``: the pause of each key holding a step, for ``why``."""
    if row.wait_kind is None or row.status != "waiting":
        return None
    if row.wait_kind == VERSION_WAIT:
        return {
            "kind": row.wait_kind,
            "since": timestamp(row.waiting_since),
            "wake_at": None,
            "event": None,
            "key": None,
            "child_execution_id": None,
            "why": "compatible_worker",
        }
    why = None
    if row.wait_kind == "key" and row.wait_key is not None:
        why = why_held(row.wake_at, (pauses or {}).get(row.wait_key), datetime.now(UTC))
    return {
        "kind": row.wait_kind,
        "since": timestamp(row.waiting_since),
        "wake_at": timestamp(row.wake_at),
        "event": row.wait_event,
        "key": row.wait_key,
        "child_execution_id": row.child_execution_id,
        "why": why,
    }


def step(
    row: StepExecution,
    depends_on: Sequence[str] | None,
    queue: str | None = None,
    skip_reason: str | None = None,
    pauses: Mapping[str, datetime | None] | None = None,
) -> Document:
    """A step's row; ``depends_on`` and ``queue`` are None where the workflow's
    definition is unknown; ``skip_reason`` why a skipped step was skipped; ``pauses``:
    the pause of each key holding a step back."""
    return {
        "name": row.step_name,
        "status": row.status,
        "kind": row.kind,
        "depends_on": list(depends_on) if depends_on is not None else None,
        "queue": queue,
        "attempt": row.attempt,
        "policy_attempt": row.policy_attempt,
        "max_attempts": row.max_attempts,
        "recoveries": row.crash_recoveries,
        "output": row.output_data,
        "error": row.error,
        "worker": row.worker,
        "celery_task_id": row.celery_task_id,
        "queued_at": timestamp(row.queued_at),
        "started_at": timestamp(row.started_at),
        "finished_at": timestamp(row.finished_at),
        "heartbeat_at": timestamp(row.heartbeat_at),
        "next_attempt_at": timestamp(row.next_attempt_at),
        "wait": wait(row, pauses),
        "skip_reason": skip_reason if row.status == "skipped" else None,
    }


def event(row: ExecutionEvent) -> Document:
    """One recorded transition."""
    return {
        "at": timestamp(row.created_at),
        "step": row.step_name,
        "from": row.from_status,
        "to": row.to_status,
        "attempt": row.attempt,
        "reason": row.reason,
    }


def execution_with_steps(
    row: WorkflowExecution,
    steps: Sequence[StepExecution],
    workflow: Workflow | None,
    history: Iterable[ExecutionEvent] | None = None,
    skip_reasons: Mapping[str, str] | None = None,
    pauses: Mapping[str, datetime | None] | None = None,
) -> Document:
    """``conveyor status --json``: the execution, its steps in DAG order (a skipped one
    with why), and its history when asked (the key is left out otherwise)."""
    order = list(workflow.order()) if workflow is not None else []
    position = {name: index for index, name in enumerate(order)}
    ranked = sorted(steps, key=lambda s: (position.get(s.step_name, len(position)), s.step_name))
    document = execution(row)
    document["steps"] = [
        step(
            s,
            workflow.steps[s.step_name].depends_on
            if workflow is not None and s.step_name in workflow.steps
            else None,
            workflow.queue_of(s.step_name)
            if workflow is not None and s.step_name in workflow.steps
            else None,
            (skip_reasons or {}).get(s.step_name),
            pauses,
        )
        for s in ranked
    ]
    if history is not None:
        document["history"] = [event(e) for e in history]
    return document


def schedule(declared: Schedule) -> Document:
    """A schedule as declared: its name, cron or interval, time zone and input."""
    return {
        "name": declared.label,
        "cron": " ".join(declared.cron.split()) if declared.cron is not None else None,
        "every_seconds": int(declared.every.total_seconds()) if declared.every else None,
        "timezone": declared.timezone,
        "input": declared.input,
    }


def workflow(definition: Workflow) -> Document:
    """A registered workflow version: its steps and dependencies, input schema, schedules."""
    model = definition.input_model
    deadline = definition.deadline
    return {
        "name": definition.name,
        "version": definition.version,
        "description": definition.description,
        "max_concurrency": definition.max_concurrency,
        "deadline_seconds": deadline.total_seconds() if deadline is not None else None,
        "input_schema": model.model_json_schema() if model is not None else None,
        "steps": [
            {
                "name": name,
                "kind": definition.steps[name].kind,
                "depends_on": list(definition.steps[name].depends_on),
                "queue": definition.queue_of(name),
                "max_attempts": definition.steps[name].retry.max_attempts,
                "soft_timeout": definition.steps[name].soft_timeout,
                "timeout": definition.steps[name].timeout,
                "trigger": definition.steps[name].trigger,
                "condition": condition_label(definition.steps[name].when),
                "on_exhausted": definition.steps[name].retry.on_exhausted,
            }
            for name in definition.order()
        ],
        "schedules": [schedule(s) for s in definition.schedules],
    }
