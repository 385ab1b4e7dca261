"""Requests to the state managers: validated arguments turned into plans.

Both managers (async and sync) call these, so argument checking and the choice of
plan live in one place; a manager method only runs what it gets back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, TypedDict

from core import operations as ops
from core.config import Settings
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from core.operations import NewExecution
from core.outcomes import CreatedExecution, StallRecovery, StepCompletion, TransitionResult
from core.registry import WorkflowRegistry
from core.states import EXECUTIONS, STEPS
from core.transactions import PlanFactory


class ExecutionOptions(TypedDict, total=False):
    """Optional arguments of ``create_execution``."""

    workflow_version: int
    idempotency_key: str | None
    triggered_by: str | None
    priority: int
    deadline_at: datetime | None


def _statuses(parse: Any, expected: object | Iterable[object] | None) -> frozenset[Any] | None:
    if expected is None:
        return None
    if isinstance(expected, str):
        return frozenset({parse(expected)})
    if isinstance(expected, Iterable):
        return frozenset(parse(value) for value in expected)
    return frozenset({parse(expected)})


@dataclass(frozen=True)
class StateRequests:
    """Builds the plan for each state-manager call, after checking its arguments."""

    settings: Settings
    dialect: str

    def create_execution(
        self,
        registry: WorkflowRegistry,
        workflow_id: str,
        input_data: Any,
        options: ExecutionOptions,
    ) -> tuple[NewExecution, PlanFactory[CreatedExecution]]:
        """An execution of a registered workflow: its input checked against the model,
        a row for each of its steps; WorkflowNotFound for a name nobody registered."""
        new = ops.execution_of(
            registry,
            workflow_id,
            input_data,
            max_payload_bytes=self.settings.max_payload_bytes,
            **options,
        )
        return new, partial(ops.create_execution, self.dialect, new)

    def get_execution(self, execution_id: str) -> PlanFactory[WorkflowExecution]:
        return partial(ops.get_execution, execution_id)

    def list_executions(
        self, status: str | None, workflow_id: str | None, limit: int
    ) -> PlanFactory[list[WorkflowExecution]]:
        parsed = EXECUTIONS.parse(status) if status is not None else None
        return partial(ops.list_executions, parsed, workflow_id, max(1, min(limit, 1000)))

    def transition_execution(
        self,
        execution_id: str,
        to: str,
        expected: object | Iterable[object] | None,
        reason: str | None,
        retry: bool,
    ) -> PlanFactory[TransitionResult]:
        target = EXECUTIONS.parse(to)
        sources = ops.execution_sources(target, _statuses(EXECUTIONS.parse, expected), retry)
        return partial(
            ops.transition_execution, execution_id, target, sources, reason=reason, retry=retry
        )

    def cancel_execution(
        self, execution_id: str, reason: str | None
    ) -> PlanFactory[TransitionResult]:
        return partial(ops.cancel_execution, execution_id, reason)

    def get_steps(self, execution_id: str) -> PlanFactory[list[StepExecution]]:
        return partial(ops.get_steps, execution_id)

    def get_history(self, execution_id: str) -> PlanFactory[list[ExecutionEvent]]:
        return partial(ops.get_history, execution_id)

    def transition_step(
        self,
        execution_id: str,
        step_name: str,
        to: str,
        expected: object | Iterable[object] | None,
        reason: str | None,
        attempt: int | None,
        retry: bool,
        values: dict[str, Any],
    ) -> PlanFactory[TransitionResult]:
        target = STEPS.parse(to)
        sources = ops.step_sources(target, _statuses(STEPS.parse, expected), retry)
        for field in ("output_data", "error"):
            if field in values:
                ops.check_payload(field, values[field], self.settings.max_payload_bytes)
        return partial(
            ops.transition_step,
            execution_id,
            step_name,
            target,
            sources,
            reason=reason,
            attempt=attempt,
            retry=retry,
            values=values,
        )

    def transition_steps(
        self,
        execution_id: str,
        step_names: Sequence[str] | None,
        to: str,
        expected: object | Iterable[object] | None,
        reason: str | None,
    ) -> PlanFactory[list[TransitionResult]]:
        target = STEPS.parse(to)
        sources = ops.step_sources(target, _statuses(STEPS.parse, expected), False)
        names = list(step_names) if step_names is not None else None
        return partial(ops.transition_steps, execution_id, names, target, sources, reason=reason)

    def complete_step(
        self,
        execution_id: str,
        step_name: str,
        attempt: int,
        output_data: Any,
        downstream: Sequence[str],
        sinks: Sequence[str] = (),
    ) -> PlanFactory[StepCompletion]:
        ops.check_payload("output_data", output_data, self.settings.max_payload_bytes)
        return partial(
            ops.complete_step,
            execution_id,
            step_name,
            attempt=attempt,
            output_data=output_data,
            downstream=list(downstream),
            sinks=list(sinks),
        )

    def heartbeat(self, worker: str, keys: Sequence[tuple[str, str]] | None) -> PlanFactory[int]:
        return partial(ops.heartbeat, worker, list(keys) if keys is not None else None)

    def find_stalled_steps(
        self, stall_timeout_seconds: float, limit: int
    ) -> PlanFactory[list[tuple[str, str]]]:
        return partial(ops.find_stalled_steps, stall_timeout_seconds, limit)

    def recover_stalled_steps(self, keys: Sequence[tuple[str, str]]) -> PlanFactory[StallRecovery]:
        return partial(ops.recover_stalled_steps, list(keys), self.settings.max_crash_recoveries)
