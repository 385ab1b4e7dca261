"""What the state manager's writes report back."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class TransitionResult:
    """The outcome of one compare-and-set transition.

    ``applied`` is False when the row was not in a status the transition may start
    from: a concurrent writer won the race, or the message is a duplicate delivery.
    Then ``current_status`` says what the row holds, and nothing was written.
    """

    applied: bool
    execution_id: str
    to_status: str
    step_name: str | None = None
    from_status: str | None = None
    current_status: str | None = None
    attempt: int | None = None
    # An execution's transition: the parent execution when it is a child.
    parent_execution_id: str | None = None

    def __bool__(self) -> bool:
        return self.applied


@dataclass(frozen=True)
class CreatedExecution:
    """An execution id, and whether this call created it (False: idempotency key reused,
    or an open debounce window took the input)."""

    execution_id: str
    created: bool
    # A debounced execution: it starts when its window closes (the waker sends its
    # start), not now.
    held: bool = False


@dataclass(frozen=True)
class StepCompletion:
    """A step's recorded success and what it set in motion, all in one transaction.

    When ``transition.applied`` is False the completion was a duplicate (or arrived
    after the step was cancelled or re-run): nothing advanced. ``queued`` are the
    released steps to publish; ``continued`` is the released step this worker claimed
    to run next itself, if it asked for one.
    """

    transition: TransitionResult
    queued: tuple[str, ...] = ()
    execution: TransitionResult | None = None
    continued: Claim | None = None
    # What wait nodes this released set in motion (None: it released none).
    woken: WaitOutcome | None = None


@dataclass(frozen=True)
class StepCrash:
    """A step failed because its worker was lost more often than recoveries allow."""

    execution_id: str
    step_name: str
    attempt: int
    message: str


@dataclass(frozen=True)
class StallRecovery:
    """Steps a stall sweep requeued for another attempt, and those it failed for good."""

    requeued: list[TransitionResult] = field(default_factory=list)
    failed: list[TransitionResult] = field(default_factory=list)
    crashes: list[StepCrash] = field(default_factory=list)


@dataclass(frozen=True)
class Admission:
    """Executions moved from pending to running, and their root steps now queued.

    ``first_run`` are the queued steps of executions started for the first time (not
    retried): true root steps, one of which the admitting worker may run itself. A
    retried execution's first steps may need their upstream steps' outputs and their
    own time limits: they are published.
    """

    started: list[str] = field(default_factory=list)
    queued: list[tuple[str, str]] = field(default_factory=list)
    routes: dict[str, Route] = field(default_factory=dict)
    first_run: list[tuple[str, str]] = field(default_factory=list)
    # Pending executions an ``on_limit`` cancel strategy cancelled, and when one a rate
    # limit held back may start (None: none was).
    cancelled: list[str] = field(default_factory=list)
    retry_at: datetime | None = None


@dataclass(frozen=True)
class Route:
    """What publishing a step of an execution needs: its workflow, version and priority;
    and the shape it started with (core.shapes; None where the reader did not ask, or
    for an execution older than shapes), which a worker compares with its own code."""

    workflow: str
    version: int
    priority: int
    shape: str | None = None


@dataclass(frozen=True)
class Claim:
    """A step claimed by a worker, with everything it needs to run.

    ``recoveries`` counts the attempts given back after a worker died: the retry
    policy judges ``attempt - recoveries``. ``continued`` is True for a step this
    worker claimed when it completed the step before (no broker message). ``waited``
    is how long the step was queued and due before this claim, in seconds (0 for a
    step claimed by the transaction that queued it).
    """

    execution_id: str
    step_name: str
    attempt: int
    recoveries: int
    route: Route
    input_data: Any
    upstream: dict[str, Any]
    continued: bool = False
    waited: float = 0.0
    # A map step's item: its index and its input (element ``map_index`` of the list).
    map_index: int | None = None
    item: Any = None


@dataclass(frozen=True)
class StepFailure:
    """A step's recorded failure: the steps skipped because of it and the execution's end."""

    transition: TransitionResult
    skipped: list[str] = field(default_factory=list)
    execution: TransitionResult | None = None
    # What the execution's end set in motion when it was a child (its parent told).
    woken: WaitOutcome | None = None


@dataclass(frozen=True)
class ReconcileReport:
    """What one reconciler pass found and did."""

    requeued: list[tuple[str, str]] = field(default_factory=list)
    stalled_failed: list[tuple[str, str]] = field(default_factory=list)
    # The error each of those steps now holds (what the worker logs a WARNING about).
    crashes: list[StepCrash] = field(default_factory=list)
    republish: list[tuple[str, str]] = field(default_factory=list)
    # (execution, workflow, priority) of pending executions whose start is sent again.
    start: list[tuple[str, str, int]] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    # Workflows with an execution that ended in this pass: a concurrency slot is free.
    freed: list[str] = field(default_factory=list)
    # (workflow, seconds) of each sleep the waker woke: how late after its wake time.
    lags: list[tuple[str, float]] = field(default_factory=list)
    # Workflows with an execution pending longer than the start delay: if a concurrency
    # limit holds it, a slot may have freed unseen (the finishing process died before
    # admitting). Not what the pass did: left out of the report's text and equality.
    waiting: list[str] = field(default_factory=list, repr=False, compare=False)
    # The workflow of each execution named above, and the final status of each one
    # this pass ended (finished or timed out): what metrics are labelled with.
    workflows: dict[str, str] = field(default_factory=dict)
    ended: dict[str, str] = field(default_factory=dict)
    # For each step in ``republish``: the parameters that make it due again at the next
    # pass should its message fail to publish (``reconciler.restore_unsent``).
    unsent: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict, repr=False)
    # The same for each execution in ``start`` (``reconciler.restore_unsent_starts``).
    unsent_starts: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    # Events nobody consumed before they expired, dropped by this pass.
    events_expired: int = 0
    # Child executions whose end this pass told their parent (or found the parent no
    # longer waiting): those it timed out or finished, and the safety net's. A parent
    # that ended so tells its own parent in turn (in ``woken.finished``).
    parents_woken: list[str] = field(default_factory=list)
    # What telling those parents set in motion (steps queued, children started,
    # executions ended), and executions cancelled below those timed out: to publish
    # after the commit (``Engine.publish_outcome``).
    woken: WaitOutcome | None = field(default=None, repr=False, compare=False)
    # Map items to send (recovered from a lost worker, due, or never claimed), and how
    # many were recovered, failed for crashing too often, or re-sent.
    items: list[tuple[str, str, int]] = field(default_factory=list)
    items_recovered: int = 0
    items_crashed: int = 0
    items_republished: int = 0
    # Slots under concurrency keys whose holder had ended without freeing them (drift).
    slots_freed: int = 0


@dataclass
class WaitOutcome:
    """What a wait transaction set in motion, for its caller to publish after commit."""

    queued: list[tuple[str, str]] = field(default_factory=list)
    routes: dict[str, Route] = field(default_factory=dict)
    # Child executions created: (execution id, workflow, priority), to start.
    starts: list[tuple[str, str, int]] = field(default_factory=list)
    # Executions this ended, each with its workflow's name (metrics, freed slots).
    finished: list[tuple[TransitionResult, str]] = field(default_factory=list)
    # (workflow, kind, how) per wait ended: due, early, event, signal, child, timeout.
    woken: list[tuple[str, str, str]] = field(default_factory=list)
    # The waker's: due rows it took, and the earliest wake time left after it.
    taken: int = 0
    next_due: datetime | None = None
    # Workflows with an execution parked here (all its open steps wait): a
    # max_concurrency slot is free, to admit the next pending execution.
    freed: list[str] = field(default_factory=list)
    # (workflow, seconds) of each sleep the waker woke: how late after its wake time.
    lags: list[tuple[str, float]] = field(default_factory=list)
    # Map items queued (execution id, map step, item index), to publish.
    items: list[tuple[str, str, int]] = field(default_factory=list)
    # (workflow, step, result, n): map items counted (expanded, succeeded, failed, ...).
    item_counts: list[tuple[str, str, str, int]] = field(default_factory=list)
    # (workflow, key, what) per admission under limits: "admitted", or why it was held
    # ("concurrency", "rate", "paused"), for metrics.
    limited: list[tuple[str, str, str]] = field(default_factory=list)
    # The earliest wake time this set on a wait (a retry's backoff, a rate limit): the
    # publisher asks the waker for that moment when it is near.
    wake_hint: datetime | None = None
    # Steps skipped (workflow, step, why: condition | upstream | exhausted), for the
    # metric conveyor_steps_skipped_total.
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def merge(self, other: WaitOutcome) -> None:
        self.queued += other.queued
        self.routes.update(other.routes)
        self.starts += other.starts
        self.finished += other.finished
        self.woken += other.woken
        self.freed += other.freed
        self.lags += other.lags
        self.items += other.items
        self.item_counts += other.item_counts
        self.limited += other.limited
        self.skipped += other.skipped
        self.hint(other.wake_hint)

    def hint(self, at: datetime | None) -> None:
        """Keep ``at`` as the wake hint when it is the earliest."""
        if at is not None and (self.wake_hint is None or at < self.wake_hint):
            self.wake_hint = at
