"""conveyor: durable workflows (DAGs of Python steps) on Celery, their state in SQL.

One import for users' code::

    from conveyor import Workflow, StepContext, Retry, enqueue

    etl = Workflow("etl")

    @etl.step(retry=Retry(max_attempts=3))
    def extract(ctx: StepContext) -> list[int]:
        return [1, 2, 3]

    enqueue("etl")

Importing it builds nothing: the Celery app, the database engines and the registry of
workflows are made when first used.
"""

from core.errors import (
    ConveyorError,
    DefinitionError,
    ExecutionNotFound,
    IdempotencyConflict,
    InputValidationError,
    InvalidTransition,
    WorkflowNotFound,
)
from core.schedules import Schedule
from core.workflows import (
    Concurrency,
    Debounce,
    RateLimit,
    Retention,
    Retry,
    StepContext,
    Tolerate,
    Workflow,
)
from worker.producer import (
    enqueue,
    enqueue_many,
    resolve,
    send_event,
    signal,
    skip,
    wake,
)

__all__ = [
    "Concurrency",
    "ConveyorError",
    "Debounce",
    "DefinitionError",
    "ExecutionNotFound",
    "IdempotencyConflict",
    "InputValidationError",
    "InvalidTransition",
    "RateLimit",
    "Retention",
    "Retry",
    "Schedule",
    "StepContext",
    "Tolerate",
    "Workflow",
    "WorkflowNotFound",
    "enqueue",
    "enqueue_many",
    "resolve",
    "send_event",
    "signal",
    "skip",
    "wake",
]
