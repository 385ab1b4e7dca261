"""The step-level, history-aware state manager that the engine runs on.

Adds to ExecutionStateManager what a workflow engine needs per step: claiming a
queued step, recording its success together with the fan-in of its downstream
steps and the execution's end, bulk transitions and heartbeats over sets of steps,
stall recovery, and the execution's event history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.execution_state_manager import (
    ExecutionStateManager,
    Statuses,
    SyncExecutionStateManager,
)
from core.models import ExecutionEvent, StepExecution
from core.outcomes import StallRecovery, StepCompletion, TransitionResult
from core.states import StepStatus

StepKeys = Sequence[tuple[str, str]]


class EnhancedExecutionStateManager(ExecutionStateManager):
    """Async step-level operations and history (see module docstring)."""

    async def get_steps(self, execution_id: str) -> list[StepExecution]:
        """The execution's steps, by name (ExecutionNotFound for an unknown id)."""
        return await self.run(self.requests.get_steps(execution_id))

    async def get_history(self, execution_id: str) -> list[ExecutionEvent]:
        """Every transition recorded for the execution and its steps, oldest first."""
        return await self.run(self.requests.get_history(execution_id))

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
        return await self.run(
            self.requests.transition_step(
                execution_id, step_name, to, expected, reason, attempt, retry, values
            )
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
        return await self.run(
            self.requests.transition_steps(execution_id, step_names, to, expected, reason)
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
        return await self.run(
            self.requests.complete_step(
                execution_id, step_name, attempt, output_data, downstream, sinks
            )
        )

    async def heartbeat(self, worker: str, keys: StepKeys | None = None) -> int:
        """Refresh the heartbeat of all the worker's running steps in one statement."""
        return await self.run(self.requests.heartbeat(worker, keys))

    async def find_stalled_steps(
        self, stall_timeout_seconds: float, *, limit: int = 500
    ) -> list[tuple[str, str]]:
        """Running steps with no heartbeat for ``stall_timeout_seconds`` (oldest first)."""
        return await self.run(self.requests.find_stalled_steps(stall_timeout_seconds, limit))

    async def recover_stalled_steps(self, keys: StepKeys) -> StallRecovery:
        """Requeue the stalled steps that may be recovered again (attempt + 1), fail the
        others with StepCrashed (CONVEYOR_MAX_CRASH_RECOVERIES)."""
        return await self.run(self.requests.recover_stalled_steps(keys))


class SyncEnhancedExecutionStateManager(SyncExecutionStateManager):
    """The sync twin of EnhancedExecutionStateManager (Celery workers): same plans."""

    def get_steps(self, execution_id: str) -> list[StepExecution]:
        """See EnhancedExecutionStateManager.get_steps."""
        return self.run(self.requests.get_steps(execution_id))

    def get_history(self, execution_id: str) -> list[ExecutionEvent]:
        """See EnhancedExecutionStateManager.get_history."""
        return self.run(self.requests.get_history(execution_id))

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
        return self.run(
            self.requests.transition_step(
                execution_id, step_name, to, expected, reason, attempt, retry, values
            )
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
        return self.run(
            self.requests.transition_steps(execution_id, step_names, to, expected, reason)
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
        return self.run(
            self.requests.complete_step(
                execution_id, step_name, attempt, output_data, downstream, sinks
            )
        )

    def heartbeat(self, worker: str, keys: StepKeys | None = None) -> int:
        """See EnhancedExecutionStateManager.heartbeat."""
        return self.run(self.requests.heartbeat(worker, keys))

    def find_stalled_steps(
        self, stall_timeout_seconds: float, *, limit: int = 500
    ) -> list[tuple[str, str]]:
        """See EnhancedExecutionStateManager.find_stalled_steps."""
        return self.run(self.requests.find_stalled_steps(stall_timeout_seconds, limit))

    def recover_stalled_steps(self, keys: StepKeys) -> StallRecovery:
        """See EnhancedExecutionStateManager.recover_stalled_steps."""
        return self.run(self.requests.recover_stalled_steps(keys))
