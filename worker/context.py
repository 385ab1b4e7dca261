"""What a running step sees: its execution, attempt, input, heartbeat and cancellation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from core import scheduling
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.states import StepStatus
from worker.heartbeat import Heartbeat

# How long a cancellation answer is reused: steps may poll it in a tight loop.
CANCEL_CHECK_TTL = 0.5


@dataclass
class RunningStep:
    """The StepContext given to step functions."""

    execution_id: str
    step_name: str
    attempt: int
    input: Any
    manager: SyncEnhancedExecutionStateManager = field(repr=False)
    heartbeats: Heartbeat = field(repr=False)
    _cancel_checked_at: float = field(default=0.0, repr=False)
    _cancelled: bool = field(default=False, repr=False)

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of this step: use it for external side effects."""
        return f"{self.execution_id}:{self.step_name}"

    def heartbeat(self) -> None:
        """Refresh this step's heartbeat now (the worker also does it periodically)."""
        self.manager.heartbeat(self.heartbeats.worker_id, [(self.execution_id, self.step_name)])

    def is_cancelled(self) -> bool:
        """Whether the execution was cancelled or timed out, or this step was cancelled.

        One read of the step's status suffices: cancelling or timing out an execution
        cancels its open steps, running ones included, in the same transaction.
        """
        now = time.monotonic()
        if self._cancelled or now - self._cancel_checked_at < CANCEL_CHECK_TTL:
            return self._cancelled
        self._cancel_checked_at = now
        step = self.manager.run(partial(scheduling.step_status, self.execution_id, self.step_name))
        self._cancelled = step in (StepStatus.CANCELLED, None)
        return self._cancelled
