"""What a Celery task reports when the step it ran failed: ``StepFailed``.

The engine records a step's failure (or schedules its retry) and publishes what that
released first; only then does it raise ``StepFailed``, so that Celery, its events and
Flower show the task as failed (or retried) instead of succeeded. Nothing about the
step depends on what Celery does with it: the message is acknowledged either way
(``task_acks_on_failure_or_timeout`` keeps its default, True), never redelivered.
"""

from __future__ import annotations


class StepFailed(Exception):
    """A step's error, recorded as its failure or as a retry to come.

    Its arguments are plain JSON values and it rebuilds from them, so Celery can pickle
    it back from a pool process and serialize it as JSON.
    """

    def __init__(
        self,
        execution_id: str,
        workflow: str,
        step: str,
        attempt: int,
        max_attempts: int,
        error_type: str,
        message: str,
        retry_in: float | None = None,
    ) -> None:
        super().__init__(
            execution_id, workflow, step, attempt, max_attempts, error_type, message, retry_in
        )
        self.execution_id = execution_id
        self.workflow = workflow
        self.step = step
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.error_type = error_type
        self.message = message
        self.retry_in = retry_in

    @classmethod
    def of(
        cls,
        error: BaseException,
        *,
        execution_id: str,
        workflow: str,
        step: str,
        attempt: int,
        max_attempts: int,
        retry_in: float | None = None,
    ) -> StepFailed:
        """The report of ``error``, which it keeps as ``__cause__`` (in this process)."""
        report = cls(
            execution_id,
            workflow,
            step,
            attempt,
            max_attempts,
            type(error).__name__,
            str(error),
            retry_in,
        )
        report.__cause__ = error
        return report

    @property
    def retrying(self) -> bool:
        """Whether another attempt was scheduled (Celery shows RETRY, not FAILURE)."""
        return self.retry_in is not None

    def __str__(self) -> str:
        text = (
            f"step {self.step} of execution {self.execution_id} (workflow {self.workflow}) "
            f"failed on attempt {self.attempt}/{self.max_attempts}: "
            f"{self.error_type}: {self.message}"
        )
        if self.retry_in is None:
            return text
        upcoming = f"attempt {self.attempt + 1}/{self.max_attempts}"
        return f"{text}; will retry, {upcoming} in {self.retry_in:.2f}s"

    def __repr__(self) -> str:
        # What Flower's exception column and Celery's task-failed event show.
        return f"StepFailed({str(self)!r})"
