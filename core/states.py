"""The state machines: one table of allowed transitions each for executions and steps.

Everything that writes a status asks this module: the state manager builds its
compare-and-set WHERE clauses from ``EXECUTIONS.sources_of()`` / ``STEPS.sources_of()``,
and the models refuse illegal assignments through ``.check()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from core.errors import InvalidStatus, InvalidTransition


class ExecutionStatus(StrEnum):
    """Where a workflow execution stands."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


class StepStatus(StrEnum):
    """Where one step of an execution stands."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    # A sleep, an event or signal, a child execution or a held slot: a row with what it
    # waits for (``wait_kind``) and when it gives up (``wake_at``); no message, no worker.
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


StatusT = TypeVar("StatusT", ExecutionStatus, StepStatus)

E = ExecutionStatus
S = StepStatus

# Forward progress: what any writer may do.
EXECUTION_TRANSITIONS: Mapping[ExecutionStatus, frozenset[ExecutionStatus]] = {
    E.PENDING: frozenset({E.RUNNING, E.FAILED, E.CANCELLED, E.TIMED_OUT}),
    E.RUNNING: frozenset({E.SUCCEEDED, E.FAILED, E.CANCELLED, E.TIMED_OUT}),
    E.SUCCEEDED: frozenset(),
    E.FAILED: frozenset(),
    E.CANCELLED: frozenset(),
    E.TIMED_OUT: frozenset(),
}

STEP_TRANSITIONS: Mapping[StepStatus, frozenset[StepStatus]] = {
    # pending -> skipped: an upstream step did not succeed as its trigger needs, or its
    # condition (``when``) was false; pending -> failed: its condition raised.
    S.PENDING: frozenset({S.QUEUED, S.WAITING, S.SKIPPED, S.FAILED, S.CANCELLED}),
    # queued -> queued is a republish (reconciler, due retry); queued -> failed is a
    # message that can never run (e.g. its workflow is no longer registered).
    # queued -> waiting: a stalled step behind limits recovered, to be admitted again.
    S.QUEUED: frozenset({S.QUEUED, S.RUNNING, S.WAITING, S.FAILED, S.SKIPPED, S.CANCELLED}),
    # running -> queued is a retry with backoff or a stalled step recovered; running ->
    # waiting is the retry of a step behind limits (admitted again when its backoff ends);
    # running -> skipped an optional step (``Retry(on_exhausted="skip")``) whose attempts
    # are spent.
    S.RUNNING: frozenset({S.QUEUED, S.WAITING, S.SUCCEEDED, S.FAILED, S.SKIPPED, S.CANCELLED}),
    # A wait ends by its own compare-and-set: succeeded (woken, event, child output),
    # failed (timed out, child failed), cancelled with its execution; waiting -> waiting
    # re-arms it for a retry, waiting -> queued admits a task step held for a slot. There
    # is no waiting -> running: a stray message can never claim a wait.
    S.WAITING: frozenset({S.WAITING, S.QUEUED, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.SKIPPED: frozenset(),
    S.CANCELLED: frozenset(),
}

# Only an explicit retry of a finished execution may leave a final state, and it goes
# back to pending: admitted again like a start (priority, max_concurrency).
EXECUTION_RETRY_TRANSITIONS: Mapping[ExecutionStatus, frozenset[ExecutionStatus]] = {
    E.FAILED: frozenset({E.PENDING}),
    E.CANCELLED: frozenset({E.PENDING}),
    E.TIMED_OUT: frozenset({E.PENDING}),
}
STEP_RETRY_TRANSITIONS: Mapping[StepStatus, frozenset[StepStatus]] = {
    # failed -> succeeded | skipped: an operator resolves a failed step with an output,
    # or skips it (core.repair), and its execution goes on from there.
    S.FAILED: frozenset({S.PENDING, S.QUEUED, S.SUCCEEDED, S.SKIPPED}),
    S.CANCELLED: frozenset({S.PENDING, S.QUEUED}),
    S.SKIPPED: frozenset({S.PENDING, S.QUEUED}),
}


@dataclass(frozen=True)
class StateMachine(Generic[StatusT]):
    """One status enum with its forward and retry transition tables."""

    kind: str
    enum: type[StatusT]
    forward: Mapping[StatusT, frozenset[StatusT]]
    retry: Mapping[StatusT, frozenset[StatusT]]
    initial: frozenset[StatusT]

    @property
    def final(self) -> frozenset[StatusT]:
        """Statuses that only an explicit retry may leave."""
        return frozenset(s for s, targets in self.forward.items() if not targets)

    @property
    def open(self) -> frozenset[StatusT]:
        """Statuses that are not final."""
        return frozenset(self.enum) - self.final

    def parse(self, value: object) -> StatusT:
        """The status named by ``value``, or InvalidStatus naming the bad value."""
        if isinstance(value, self.enum):
            return value
        if not isinstance(value, str):
            raise InvalidStatus(self.kind, value, [s.value for s in self.enum])
        try:
            return self.enum(value)
        except ValueError:
            raise InvalidStatus(self.kind, value, [s.value for s in self.enum]) from None

    def is_allowed(self, source: StatusT, target: StatusT, *, retry: bool = False) -> bool:
        """Whether ``source -> target`` is in the table (retry edges only when ``retry``)."""
        table = self.retry if retry else self.forward
        return target in table.get(source, frozenset())

    def sources_of(self, target: StatusT, *, retry: bool = False) -> frozenset[StatusT]:
        """Every status from which ``target`` may be reached: the WHERE of a compare-and-set."""
        table = self.retry if retry else self.forward
        return frozenset(source for source, targets in table.items() if target in targets)

    def check(self, source: StatusT | None, target: StatusT, *, retry: bool = False) -> None:
        """Raise InvalidTransition unless ``source -> target`` is allowed (None: a new row)."""
        if source is None:
            if target not in self.initial:
                starts = " or ".join(sorted(self.initial))
                raise InvalidTransition(self.kind, None, target, f"new rows start as {starts}")
            return
        if not self.is_allowed(source, target, retry=retry):
            raise InvalidTransition(self.kind, source, target)


EXECUTIONS: StateMachine[ExecutionStatus] = StateMachine(
    "execution",
    ExecutionStatus,
    EXECUTION_TRANSITIONS,
    EXECUTION_RETRY_TRANSITIONS,
    frozenset({E.PENDING}),
)
STEPS: StateMachine[StepStatus] = StateMachine(
    "step",
    StepStatus,
    STEP_TRANSITIONS,
    STEP_RETRY_TRANSITIONS,
    frozenset({S.PENDING, S.QUEUED}),
)

# A map step's items (``map_items``): the step statuses, a table of their own. pending
# -> running is the slot pass: the transaction that ends an item admits the next one
# straight to running for the same worker (no message ever names a pending item, so no
# delivery can take this edge); running -> queued is a retry or a stalled item recovered.
ITEM_TRANSITIONS: Mapping[StepStatus, frozenset[StepStatus]] = {
    S.PENDING: frozenset({S.QUEUED, S.RUNNING, S.CANCELLED}),
    S.QUEUED: frozenset({S.QUEUED, S.RUNNING, S.CANCELLED}),
    S.RUNNING: frozenset({S.QUEUED, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
# ``retry --failed-items``: failed and cancelled items run again; succeeded ones keep
# their outputs.
ITEM_RETRY_TRANSITIONS: Mapping[StepStatus, frozenset[StepStatus]] = {
    S.FAILED: frozenset({S.PENDING}),
    S.CANCELLED: frozenset({S.PENDING}),
}
ITEMS: StateMachine[StepStatus] = StateMachine(
    "map item",
    StepStatus,
    ITEM_TRANSITIONS,
    ITEM_RETRY_TRANSITIONS,
    frozenset({S.PENDING, S.QUEUED}),
)
