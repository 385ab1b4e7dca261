"""The step-level, history-aware state manager.

Adds to ExecutionStateManager what a workflow engine needs per step: claiming a
queued step, recording its success together with the fan-in of its downstream
steps and the execution's end, bulk transitions and heartbeats over sets of steps,
stall recovery, and the execution's event history. The units of work are those of
``core.steps``, ``core.executions`` and ``core.reconciler``; the Celery engine calls
them directly on its own ``Transactions``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core import executions, reconciler, steps, transitions
from core.execution_state_manager import (
    ExecutionStateManager,
    StateManagerBase,
    Statuses,
    SyncExecutionStateManager,
)
from core.models import ExecutionEvent, StepExecution
from core.outcomes import Claim, Route, StallRecovery, StepCompletion, TransitionResult
from core.states import StepStatus

StepKeys = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class GivenDag:
    """A step's neighbourhood as a caller names it (no registered workflow needed)."""

    step_name: str
    downstream_steps: Sequence[str] = ()
    sink_steps: Sequence[str] = ()
    upstream_steps: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def sinks(self) -> list[str]:
        """The steps whose outputs make the execution's output."""
        return list(self.sink_steps)

    def upstream(self, name: str) -> tuple[str, ...]:
        """Unknown beyond the step itself: nothing."""
        return self.upstream_steps.get(name, ())

    def downstream(self, name: str) -> list[str]:
        """The given downstream steps of ``step_name``."""
        return list(self.downstream_steps) if name == self.step_name else []

    def descendants(self, name: str) -> list[str]:
        """The given downstream steps of ``step_name``."""
        return self.downstream(name)


class _StepArguments(StateManagerBase):
    def _transition_step_arguments(
        self, to: str, expected: Statuses, retry: bool, values: dict[str, Any]
    ) -> tuple[Any, frozenset[Any]]:
        limit = self.database.settings.max_payload_bytes
        for name in ("output_data", "error"):
            if name in values:
                executions.check_payload(name, values[name], limit)
        return self._step_move(to, expected, retry)

    def _completion(
        self,
        execution_id: str,
        step_name: str,
        attempt: int,
        output_data: Any,
        downstream: Sequence[str],
        sinks: Sequence[str],
    ) -> tuple[Claim, Any, str | None, GivenDag]:
        executions.check_payload(
            "output_data", output_data, self.database.settings.max_payload_bytes
        )
        step = Claim(execution_id, step_name, attempt, 0, Route("", 0, 0), None, {})
        encoded = None if output_data is None else json.dumps(output_data)
        return step, output_data, encoded, GivenDag(step_name, tuple(downstream), tuple(sinks))


class EnhancedExecutionStateManager(ExecutionStateManager, _StepArguments):
    """Async step-level operations and history (see module docstring)."""

    async def get_steps(self, execution_id: str) -> list[StepExecution]:
        """The execution's steps, by name (ExecutionNotFound for an unknown id)."""
        return await self.run(executions.get_steps, execution_id)

    async def get_history(self, execution_id: str) -> list[ExecutionEvent]:
        """Every transition recorded for the execution and its steps, oldest first."""
        return await self.run(executions.get_history, execution_id)

    async def transition_step(
        self,
        execution_id: str,
        step_name: str,
        to: str,
        *,
        expected: Statuses = None,
        reason: str | None = None,
        attempt: int | None = None,
        retry: bool = False,
        **values: Any,
    ) -> TransitionResult:
        """Compare-and-set one step (at ``attempt``, when given); see transition_execution."""
        target, sources = self._transition_step_arguments(to, expected, retry, values)
        return await self.run(
            transitions.transition_step,
            execution_id,
            step_name,
            target,
            sources,
            reason=reason,
            attempt=attempt,
            retry=retry,
            values=values,
        )

    async def transition_steps(
        self,
        execution_id: str,
        step_names: Sequence[str] | None,
        to: str,
        *,
        expected: Statuses = None,
        reason: str | None = None,
    ) -> list[TransitionResult]:
        """Move many steps in one statement; returns those that moved."""
        target, sources = self._step_move(to, expected, False)
        names = list(step_names) if step_names is not None else None
        return await self.run(
            transitions.transition_steps, execution_id, names, target, sources, reason=reason
        )

    async def cancel_open_steps(
        self, execution_id: str, *, reason: str | None = "cancelled"
    ) -> list[TransitionResult]:
        """Cancel every open step of the execution in one statement."""
        return await self.transition_steps(execution_id, None, StepStatus.CANCELLED, reason=reason)

    async def claim_step(
        self, execution_id: str, step_name: str, *, worker: str, celery_task_id: str | None
    ) -> TransitionResult:
        """queued -> running for this worker; not applied means a duplicate delivery."""
        return await self.transition_step(
            execution_id,
            step_name,
            StepStatus.RUNNING,
            expected=StepStatus.QUEUED,
            reason="claimed",
            worker=worker,
            celery_task_id=celery_task_id,
        )

    async def complete_step(
        self,
        execution_id: str,
        step_name: str,
        *,
        attempt: int,
        output_data: Any,
        downstream: Sequence[str] = (),
        sinks: Sequence[str] = (),
    ) -> StepCompletion:
        """Record success, queue downstream steps whose last upstream this was, and finish
        the execution if nothing is open: one transaction. A duplicate is not applied."""
        arguments = self._completion(
            execution_id, step_name, attempt, output_data, downstream, sinks
        )
        return await self.run(steps.complete, *arguments)

    async def heartbeat(self, worker: str, keys: StepKeys | None = None) -> int:
        """Refresh the heartbeat of the worker's running steps (``keys``: only those)."""
        return await self.run(steps.heartbeat, worker, list(keys) if keys is not None else None)

    async def find_stalled_steps(
        self, stall_timeout_seconds: float, *, limit: int = 500
    ) -> list[tuple[str, str]]:
        """Running steps with no heartbeat for ``stall_timeout_seconds`` (oldest first)."""
        return await self.run(reconciler.find_stalled_steps, stall_timeout_seconds, limit)

    async def recover_stalled_steps(self, keys: StepKeys) -> StallRecovery:
        """Requeue the stalled steps that may be recovered again (attempt + 1), fail the
        others with StepCrashed (CONVEYOR_MAX_CRASH_RECOVERIES)."""
        recoveries = self.database.settings.max_crash_recoveries
        return await self.run(reconciler.recover_stalled_steps, list(keys), recoveries)


class SyncEnhancedExecutionStateManager(SyncExecutionStateManager, _StepArguments):
    """EnhancedExecutionStateManager for sync code: the same units of work."""

    def get_steps(self, execution_id: str) -> list[StepExecution]:
        """See EnhancedExecutionStateManager.get_steps."""
        return self.run(executions.get_steps, execution_id)

    def get_history(self, execution_id: str) -> list[ExecutionEvent]:
        """See EnhancedExecutionStateManager.get_history."""
        return self.run(executions.get_history, execution_id)

    def transition_step(
        self,
        execution_id: str,
        step_name: str,
        to: str,
        *,
        expected: Statuses = None,
        reason: str | None = None,
        attempt: int | None = None,
        retry: bool = False,
        **values: Any,
    ) -> TransitionResult:
        """See EnhancedExecutionStateManager.transition_step."""
        target, sources = self._transition_step_arguments(to, expected, retry, values)
        return self.run(
            transitions.transition_step,
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
        *,
        expected: Statuses = None,
        reason: str | None = None,
    ) -> list[TransitionResult]:
        """See EnhancedExecutionStateManager.transition_steps."""
        target, sources = self._step_move(to, expected, False)
        names = list(step_names) if step_names is not None else None
        return self.run(
            transitions.transition_steps, execution_id, names, target, sources, reason=reason
        )

    def cancel_open_steps(
        self, execution_id: str, *, reason: str | None = "cancelled"
    ) -> list[TransitionResult]:
        """See EnhancedExecutionStateManager.cancel_open_steps."""
        return self.transition_steps(execution_id, None, StepStatus.CANCELLED, reason=reason)

    def claim_step(
        self, execution_id: str, step_name: str, *, worker: str, celery_task_id: str | None
    ) -> TransitionResult:
        """See EnhancedExecutionStateManager.claim_step."""
        return self.transition_step(
            execution_id,
            step_name,
            StepStatus.RUNNING,
            expected=StepStatus.QUEUED,
            reason="claimed",
            worker=worker,
            celery_task_id=celery_task_id,
        )

    def complete_step(
        self,
        execution_id: str,
        step_name: str,
        *,
        attempt: int,
        output_data: Any,
        downstream: Sequence[str] = (),
        sinks: Sequence[str] = (),
    ) -> StepCompletion:
        """See EnhancedExecutionStateManager.complete_step."""
        arguments = self._completion(
            execution_id, step_name, attempt, output_data, downstream, sinks
        )
        return self.run(steps.complete, *arguments)

    def heartbeat(self, worker: str, keys: StepKeys | None = None) -> int:
        """See EnhancedExecutionStateManager.heartbeat."""
        return self.run(steps.heartbeat, worker, list(keys) if keys is not None else None)

    def find_stalled_steps(
        self, stall_timeout_seconds: float, *, limit: int = 500
    ) -> list[tuple[str, str]]:
        """See EnhancedExecutionStateManager.find_stalled_steps."""
        return self.run(reconciler.find_stalled_steps, stall_timeout_seconds, limit)

    def recover_stalled_steps(self, keys: StepKeys) -> StallRecovery:
        """See EnhancedExecutionStateManager.recover_stalled_steps."""
        recoveries = self.database.settings.max_crash_recoveries
        return self.run(reconciler.recover_stalled_steps, list(keys), recoveries)
