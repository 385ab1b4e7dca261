"""What a running step sees: its execution, attempt, input, heartbeat and cancellation."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from core import limits, maps, steps
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.errors import InputValidationError
from core.outcomes import Claim
from core.states import StepStatus
from core.workflows import Workflow
from worker.heartbeat import Heartbeat

# How long a cancellation answer is reused: steps may poll it in a tight loop.
CANCEL_CHECK_TTL = 0.5
_UNREAD = object()


class RunningStep:
    """The StepContext given to step functions."""

    def __init__(
        self,
        claim: Claim,
        workflow: Workflow,
        manager: SyncEnhancedExecutionStateManager,
        heartbeats: Heartbeat,
    ) -> None:
        self.execution_id = claim.execution_id
        self.step_name = claim.step_name
        self.attempt = claim.attempt
        self.map_index = claim.map_index
        self._stored_input = claim.input_data
        self._input: Any = _UNREAD
        self._workflow = workflow
        self._manager = manager
        self._heartbeats = heartbeats
        self._cancel_checked_at = 0.0
        self._cancelled = False

    def __repr__(self) -> str:
        return f"RunningStep({self.execution_id!r}, {self.step_name!r}, attempt={self.attempt})"

    @property
    def input(self) -> Any:
        """The execution's input (an instance of the workflow's ``input_model``).

        Parsed when first read: most steps of a chain never look at it. Stored input
        the model no longer accepts is a permanent error of the step.
        """
        if self._input is _UNREAD:
            try:
                self._input = self._workflow.parse_input(self._stored_input)
            except ValidationError as exc:
                raise InputValidationError(
                    f"stored input of workflow {self._workflow.name!r} no longer fits its "
                    f"input model: {exc}"
                ) from exc
        return self._input

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of this step (of this item, in a map): use it for
        external side effects."""
        if self.map_index is not None:
            return f"{self.execution_id}:{self.step_name}:{self.map_index}"
        return f"{self.execution_id}:{self.step_name}"

    def heartbeat(self) -> None:
        """Refresh this step's heartbeat now (the worker also does it periodically)."""
        worker = self._heartbeats.worker_id
        if self.map_index is not None:
            key = (self.execution_id, self.step_name, self.map_index)
            self._manager.run(maps.heartbeat_items, worker, [key])
            return
        self._manager.heartbeat(worker, [(self.execution_id, self.step_name)])

    def is_cancelled(self) -> bool:
        """Whether the execution was cancelled or timed out, or this step was cancelled.

        One read of the step's status suffices: cancelling or timing out an execution
        cancels its open steps, running ones included, in the same transaction.
        """
        now = time.monotonic()
        if self._cancelled or now - self._cancel_checked_at < CANCEL_CHECK_TTL:
            return self._cancelled
        self._cancel_checked_at = now
        if self.map_index is not None:
            # An item is cancelled with its map (it failed) and with its execution.
            status = self._manager.run(
                maps.item_status, self.execution_id, self.step_name, self.map_index
            )
        else:
            status = self._manager.run(steps.step_status, self.execution_id, self.step_name)
        self._cancelled = status in (StepStatus.CANCELLED, None)
        return self._cancelled

    def pause_key(self, key: str, *, until: datetime | timedelta) -> None:
        """Hold every start under ``key`` (a limit's key as stored: the text of a text
        key, such as ``"openai"``) until ``until`` (a timezone-aware datetime, or a
        delay from now), for example a 429's Retry-After. Steps released meanwhile wait
        as rows until then; steps already queued or running are not stopped."""
        if isinstance(until, timedelta):
            until = datetime.now(UTC) + until
        self._manager.run(limits.pause_key, key, until)
