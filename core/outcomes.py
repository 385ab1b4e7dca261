"""What the state manager's writes report back."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def __bool__(self) -> bool:
        return self.applied


@dataclass(frozen=True)
class CreatedExecution:
    """An execution id, and whether this call created it (False: idempotency key reused)."""

    execution_id: str
    created: bool


@dataclass(frozen=True)
class StepCompletion:
    """A step's recorded success and what it set in motion, all in one transaction.

    When ``transition.applied`` is False the completion was a duplicate (or arrived
    after the step was cancelled or re-run): nothing advanced.
    """

    transition: TransitionResult
    queued: tuple[str, ...] = ()
    execution: TransitionResult | None = None


@dataclass(frozen=True)
class StallRecovery:
    """Steps a stall sweep requeued for another attempt, and those it failed for good."""

    requeued: list[TransitionResult] = field(default_factory=list)
    failed: list[TransitionResult] = field(default_factory=list)
