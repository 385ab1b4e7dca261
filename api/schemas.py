"""The API's request and response bodies (its OpenAPI schema is built from these).

Every string a request carries is refused (422) if it holds a NUL character: PostgreSQL
stores none in text or JSON, and the schema says so (``pattern``), so a client learns it
from the schema rather than from a 500.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

from core.models import ExecutionEvent, StepExecution, User, UserSession, WorkflowExecution

# Any characters but NUL. Patterns name code points: JSON Schema's (ECMA 262) and
# pydantic's (Rust) regex dialects agree on those, not on what ``\s`` matches (U+0085).
NO_NUL = r"^[^\x00]*$"
# Not stripped: what the schema accepts, the server accepts, character for character.
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=NO_NUL)]
Email = Annotated[
    str,
    StringConstraints(
        min_length=3,
        max_length=320,
        pattern=r"^[^@\x00-\x20\x7f-\xa0]+@[^\x00-\x20\x7f-\xa0]+$",
    ),
]
Key = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=NO_NUL)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=36, pattern=NO_NUL)]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=NO_NUL)]
# An id in a path: ours are 36 characters; a longer one names nothing (422, not a lookup).
PathId = Annotated[str, Path(max_length=36, pattern=NO_NUL)]

_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _date_time_text(value: Any) -> Any:
    # pydantic reads a number as seconds since the epoch; the schema says RFC 3339 text.
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value)):
        raise ValueError("must be an RFC 3339 date-time with a timezone, e.g. 2030-01-01T00:00:00Z")
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_date_time_text)]


class Strict(BaseModel):
    """Request bodies refuse fields they do not know (a typo is an error, not a no-op)."""

    model_config = ConfigDict(extra="forbid")


# --- users and tokens -----------------------------------------------------------------


class UserCreate(Strict):
    """A user to add (admins only)."""

    email: Email
    first_name: Name | None = None
    last_name: Name | None = None
    role: Literal["member", "admin"] = "member"


class UserOut(BaseModel):
    """A user."""

    id: str
    email: str
    first_name: str | None
    last_name: str | None
    status: str
    role: str
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserOut:
        """The body of ``user``."""
        return cls(
            id=user.id,
            email=user.email,
            first_name=user.first_name,
            last_name=user.last_name,
            status=user.status,
            role=user.role,
            created_at=user.created_at,
        )


class TokenCreate(Strict):
    """A token to issue: for the caller, or (admins) for another user."""

    name: Name | None = None
    expires_in_days: Annotated[int, Field(ge=1, le=3650)] | None = Field(
        default=None, description="Days until it expires; at most CONVEYOR_API_TOKEN_TTL_DAYS."
    )
    user_id: Id | None = None


class TokenOut(BaseModel):
    """A token as listed: never its secret."""

    id: str
    user_id: str
    name: str | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, session: UserSession) -> TokenOut:
        """The body of a stored token."""
        return cls(
            id=session.id,
            user_id=session.user_id,
            name=session.name,
            created_at=session.created_at,
            expires_at=session.expires_at,
            last_used_at=session.last_used_at,
            revoked_at=session.revoked_at,
        )


class TokenIssued(TokenOut):
    """A token just issued: ``token`` is shown this once and stored only as a hash."""

    token: str


# --- executions -----------------------------------------------------------------------


class ExecutionCreate(Strict):
    """An execution to enqueue."""

    workflow: Name
    input: Any = Field(
        default=None, description="JSON checked against the workflow's input schema."
    )
    idempotency_key: Key | None = Field(
        default=None,
        description=(
            "Yours alone: the same key again returns your first execution (200). Keys "
            "beginning `schedule:` are reserved to schedules (422)."
        ),
    )
    priority: Annotated[int, Field(ge=0, le=9)] = Field(default=0, description="9 runs first.")
    deadline: Timestamp | None = Field(
        default=None, description="When it times out (default: the workflow's own deadline)."
    )


class ExecutionOut(BaseModel):
    """An execution."""

    execution_id: str
    workflow: str
    workflow_version: int
    status: str
    attempt: int
    priority: int
    input: Any
    output: Any
    error: Any
    idempotency_key: str | None
    triggered_by: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime | None

    @classmethod
    def of(cls, execution: WorkflowExecution) -> ExecutionOut:
        """The body of ``execution``."""
        return cls(**_execution_fields(execution))


def _execution_fields(e: WorkflowExecution) -> dict[str, Any]:
    return {
        "execution_id": e.execution_id,
        "workflow": e.workflow_id,
        "workflow_version": e.workflow_version,
        "status": e.status,
        "attempt": e.attempt,
        "priority": e.priority,
        "input": e.input_data,
        "output": e.output_data,
        "error": e.error,
        "idempotency_key": e.idempotency_key,
        "triggered_by": e.triggered_by,
        "created_at": e.created_at,
        "updated_at": e.updated_at,
        "started_at": e.started_at,
        "finished_at": e.finished_at,
        "deadline_at": e.deadline_at,
    }


class StepOut(BaseModel):
    """A step of an execution."""

    name: str
    status: str
    attempt: int
    # The try of its Retry policy (1..max_attempts); ``attempt`` counts on across crash
    # recoveries and execution retries.
    policy_attempt: int
    max_attempts: int
    recoveries: int
    output: Any
    error: Any
    worker: str | None
    celery_task_id: str | None
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    next_attempt_at: datetime | None

    @classmethod
    def of(cls, step: StepExecution) -> StepOut:
        """The body of ``step``."""
        return cls(
            name=step.step_name,
            status=step.status,
            attempt=step.attempt,
            policy_attempt=step.policy_attempt,
            max_attempts=step.max_attempts,
            recoveries=step.crash_recoveries,
            output=step.output_data,
            error=step.error,
            worker=step.worker,
            celery_task_id=step.celery_task_id,
            queued_at=step.queued_at,
            started_at=step.started_at,
            finished_at=step.finished_at,
            heartbeat_at=step.heartbeat_at,
            next_attempt_at=step.next_attempt_at,
        )


class EventOut(BaseModel):
    """One recorded transition (``step`` is null for the execution's own)."""

    id: int
    step: str | None
    from_status: str | None
    to_status: str
    attempt: int | None
    reason: str | None
    at: datetime

    @classmethod
    def of(cls, event: ExecutionEvent) -> EventOut:
        """The body of ``event``."""
        return cls(
            id=event.id,
            step=event.step_name,
            from_status=event.from_status,
            to_status=event.to_status,
            attempt=event.attempt,
            reason=event.reason,
            at=event.created_at,
        )


class ExecutionDetail(ExecutionOut):
    """An execution with its steps and its whole history."""

    steps: list[StepOut]
    events: list[EventOut]


class ExecutionPage(BaseModel):
    """A page of executions, newest first; pass ``next_cursor`` as ``cursor`` for the next."""

    items: list[ExecutionOut]
    next_cursor: str | None


class CancelRequest(Strict):
    """Why an execution is cancelled (recorded in its history)."""

    reason: Reason = "cancelled over HTTP"


# --- workflows ------------------------------------------------------------------------


class StepDefinition(BaseModel):
    """A step as declared."""

    name: str
    depends_on: list[str]
    max_attempts: int
    timeout: float | None
    soft_timeout: float | None


class ScheduleOut(BaseModel):
    """A declared schedule and its state."""

    name: str
    spec: str
    timezone: str
    paused: bool
    next_run_at: datetime | None
    last_run_at: datetime | None


class WorkflowOut(BaseModel):
    """A registered workflow."""

    name: str
    version: int
    description: str | None
    max_concurrency: int | None
    deadline_seconds: float | None
    input_schema: dict[str, Any] | None
    steps: list[StepDefinition]
    schedules: list[ScheduleOut]


# --- errors ---------------------------------------------------------------------------


class FieldProblem(BaseModel):
    """One refused field: where it is (``input.start``, ``cursor``) and what is wrong."""

    field: str
    message: str


class ProblemDetails(BaseModel):
    """An error as RFC 9457 problem details (``application/problem+json``)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldProblem] | None = Field(
        default=None, description="Each refused field (422 only)."
    )


# --- health ---------------------------------------------------------------------------


class Check(BaseModel):
    """One dependency's state."""

    status: Literal["ok", "error"]
    detail: str | None = None


class Health(BaseModel):
    """Whether the API can reach what it needs."""

    status: Literal["ok", "error"]
    database: Check
    broker: Check


class Ready(BaseModel):
    """Whether the API should get traffic: reachable, migrated, workflows loaded."""

    status: Literal["ok", "error"]
    database: Check
    migrations: Check
    workflows: Check
