"""Workflows: what is registered, each with its steps, input schema and schedules."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy import Connection

from conveyor.api import problems
from conveyor.api.auth import Caller
from conveyor.api.schemas import (
    NO_NUL,
    RetentionOut,
    ScheduleOut,
    StepDefinition,
    WaitDefinition,
    WorkflowOut,
)
from conveyor.api.services import Conveyor
from core import schedule_state, schedules
from core.conditions import condition_label
from core.config import Settings
from core.retention import described, policy_of
from core.schedule_state import ScheduleState
from core.workflows import ChildWait, EventWait, MapSpec, Sleep, Step, Workflow

router = APIRouter(prefix="/workflows", tags=["workflows"], responses=problems.responses(401, 503))


def _schedules(conn: Connection, workflows: list[Workflow]) -> dict[tuple[str, str], ScheduleState]:
    return schedule_state.read_rows(conn, schedules.declared(workflows))


def _wait(step: Step) -> WaitDefinition | None:
    wait = step.wait
    if wait is None:
        return None
    sleep = wait if isinstance(wait, Sleep) else None
    event = wait if isinstance(wait, EventWait) else None
    return WaitDefinition(
        kind=wait.kind,
        duration_seconds=sleep.duration.total_seconds() if sleep and sleep.duration else None,
        event=event.event if event else None,
        timeout_seconds=event.timeout.total_seconds() if event and event.timeout else None,
        # What a form (the dashboard's approval form) builds its fields from.
        payload_schema=event.schema.model_json_schema() if event and event.schema else None,
        workflow=(
            wait.workflow.name
            if isinstance(wait, ChildWait)
            else wait.child.workflow.name
            if isinstance(wait, MapSpec) and wait.child is not None
            else None
        ),
        over=wait.over if isinstance(wait, MapSpec) else None,
        max_parallel=wait.max_parallel if isinstance(wait, MapSpec) else None,
        max_items=wait.max_items if isinstance(wait, MapSpec) else None,
    )


def _body(
    workflow: Workflow, rows: dict[tuple[str, str], ScheduleState], settings: Settings
) -> WorkflowOut:
    default_queue = settings.default_queue
    kept = described(policy_of(workflow.retention, settings))
    declared: list[ScheduleOut] = []
    for schedule in workflow.schedules:
        row = rows.get((workflow.name, schedule.label))
        declared.append(
            ScheduleOut(
                name=schedule.label,
                spec=schedule.when,
                timezone=schedule.timezone,
                paused=row is not None and row.paused,
                next_run_at=row.next_tick_at if row is not None else None,
                last_run_at=row.last_tick_at if row is not None else None,
            )
        )
    return WorkflowOut(
        name=workflow.name,
        version=workflow.version,
        description=workflow.description or None,
        max_concurrency=workflow.max_concurrency,
        deadline_seconds=workflow.deadline.total_seconds() if workflow.deadline else None,
        input_schema=workflow.input_model.model_json_schema() if workflow.input_model else None,
        steps=[
            StepDefinition(
                name=step.name,
                depends_on=list(step.depends_on),
                max_attempts=step.retry.max_attempts,
                timeout=step.timeout,
                soft_timeout=step.soft_timeout,
                kind=step.kind,
                wait=_wait(step),
                queue=workflow.queue_of(step.name, default_queue),
                trigger=step.trigger,
                condition=condition_label(step.when),
                on_exhausted=step.retry.on_exhausted,
            )
            for step in workflow.steps.values()
        ],
        schedules=declared,
        retention=RetentionOut(
            succeeded_seconds=kept["succeeded"],
            failed_seconds=kept["failed"],
            payloads_seconds=kept["payloads"],
        ),
    )


@router.get("", response_model=list[WorkflowOut])
def list_workflows(_: Caller, conveyor: Conveyor) -> list[WorkflowOut]:
    """Every registered workflow (each version), by name."""
    workflows = sorted(conveyor.engine.registry, key=lambda w: (w.name, w.version))
    rows = conveyor.engine.manager.run(_schedules, workflows)
    return [_body(w, rows, conveyor.engine.settings) for w in workflows]


@router.get("/{name}", response_model=WorkflowOut, responses=problems.responses(404, 422))
def read_workflow(
    name: Annotated[str, Path(max_length=200, pattern=NO_NUL)], _: Caller, conveyor: Conveyor
) -> WorkflowOut:
    """The newest version of a workflow (404 when none is registered by that name)."""
    workflow = conveyor.engine.registry.get(name)
    rows = conveyor.engine.manager.run(_schedules, [workflow])
    return _body(workflow, rows, conveyor.engine.settings)
