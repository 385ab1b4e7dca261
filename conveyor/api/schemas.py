"""The API's request and response bodies (its OpenAPI schema is built from these).

Every string a request carries is refused (422) if it holds a NUL character: PostgreSQL
stores none in text or JSON, and the schema says so (``pattern``), so a client learns it
from the schema rather than from a 500.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, cast

from fastapi import Path
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

from core import limits
from core.limits import KeyState
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
    parent_execution_id: str | None = Field(
        description="The execution whose child node started this one (null: a top one)."
    )
    root_execution_id: str | None = Field(
        description="The top execution of this one's tree of children (null: a top one)."
    )
    depth: int = Field(description="Levels below its root: 0 for a top execution.")
    parked_at: datetime | None = Field(
        description=(
            "Since when every open step of this running execution waits (it then holds "
            "no max_concurrency slot); listed as status `waiting`."
        )
    )
    debounce_key: str | None = Field(
        default=None,
        description=(
            "The key of this pending execution's open debounce window: enqueues of its "
            "workflow with this key go into it (null: no window open)."
        ),
    )
    start_at: datetime | None = Field(
        default=None,
        description=(
            "A debounced execution's start: its window closes then (a period after the "
            "last enqueue, at most latest_start_at)."
        ),
    )
    latest_start_at: datetime | None = Field(
        default=None,
        description="The latest a debounced execution starts: the first enqueue + max_wait.",
    )

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
        "parent_execution_id": e.parent_execution_id,
        "root_execution_id": e.root_execution_id,
        "depth": e.depth,
        "parked_at": e.parked_at,
        "debounce_key": e.debounce_key,
        "start_at": e.start_at,
        "latest_start_at": e.latest_start_at,
    }


class MapOut(BaseModel):
    """A map step's items: how many, how many are left, failed and tolerated, and their
    counts by status (pending, queued, running, succeeded, failed, cancelled)."""

    total: int | None = Field(description="Items, once the map expanded (null before).")
    left: int | None = Field(description="Items not ended yet.")
    failed: int | None = Field(description="Items that failed after their retries.")
    max_failed: int | None = Field(description="Failed items its on_item_failure tolerates.")
    counts: dict[str, int] = Field(description="Items by status.")

    @classmethod
    def of(cls, step: StepExecution, counts: dict[str, int] | None) -> MapOut | None:
        """The map part of ``step`` (None for any other kind of step)."""
        if step.wait_kind != "map":
            return None
        return cls(
            total=step.map_total,
            left=step.map_left,
            failed=step.map_failed,
            max_failed=step.map_max_failed,
            counts=counts or {},
        )


class ItemOut(BaseModel):
    """One item of a map step."""

    index: int
    status: str
    attempt: int
    policy_attempt: int = Field(description="The try of its Retry policy.")
    worker: str | None
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None = Field(description="finished_at - started_at.")
    error: Any
    output: Any


class ItemPage(BaseModel):
    """A page of a map's items in index order; pass ``next`` as ``after`` for the next."""

    items: list[ItemOut]
    next: int | None


class RetryRequest(Strict):
    """How to retry: the whole execution's unfinished steps, or only the failed items of
    its failed map steps."""

    failed_items: bool = False


# The wait kind a task step behind limits records (core.limits), and one handed back
# for a worker with a compatible shape (core.shapes).
KEY_WAIT = "key"
VERSION_WAIT = "version"


class WaitOut(BaseModel):
    """What a waiting step waits for."""

    kind: Literal["sleep", "event", "child", "map", "key", "version"] = Field(
        description="`key`: a task step held back by a concurrency or rate limit's key. "
        "`version`: a task step handed back by a worker whose code may not finish its "
        "execution (a rolling deploy), waiting for a worker with a compatible shape."
    )
    since: datetime | None = Field(description="When it began waiting.")
    wake_at: datetime | None = Field(
        description="A sleep: when it wakes. An event wait: when it times out (null: never). "
        "A key wait: when it is admitted again (a rate's next start, a pause's end; null: "
        "when a slot frees)."
    )
    event: str | None = Field(description="An event wait: the event's name.")
    key: str | None = Field(
        description="An event wait: the key the event must carry. A key wait: the key that "
        "holds it back (null: due to be admitted, as after a retry's backoff)."
    )
    child_execution_id: str | None = Field(description="A child node: the child execution.")
    why: limits.HeldFor | Literal["compatible_worker"] | None = Field(
        default=None,
        description="A key wait: no free slot under the key, its rate, or the key is "
        "paused. A version wait: `compatible_worker`.",
    )

    @classmethod
    def of(
        cls, step: StepExecution, paused: Mapping[str, datetime | None] | None = None
    ) -> WaitOut | None:
        """What ``step`` waits for, or None when it is not waiting on a wait node or a key
        (``paused``: the pause of each key holding a step, for ``why``)."""
        if step.wait_kind is None or step.status != "waiting":
            return None
        if step.wait_kind == VERSION_WAIT:
            return cls(
                kind=VERSION_WAIT,
                since=step.waiting_since,
                wake_at=None,
                event=None,
                key=None,
                child_execution_id=None,
                why="compatible_worker",
            )
        why: limits.HeldFor | Literal["compatible_worker"] | None = None
        if step.wait_kind == KEY_WAIT and step.wait_key is not None:
            paused_until = (paused or {}).get(step.wait_key)
            why = limits.why_held(step.wake_at, paused_until, datetime.now(UTC))
        return cls(
            kind=step.wait_kind,
            since=step.waiting_since,
            wake_at=step.wake_at,
            event=step.wait_event,
            key=step.wait_key,
            child_execution_id=step.child_execution_id,
            why=why,
        )


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
    kind: Literal["task", "sleep", "event", "child", "map"] = Field(
        description="A task runs code; a map runs its code once per item; the others are "
        "wait nodes (no worker held)."
    )
    wait: WaitOut | None = Field(
        description="What it waits for while waiting (else null): a wait node's wait, or "
        "the key holding back a task step behind limits."
    )
    map: MapOut | None = Field(default=None, description="A map step's items (else null).")
    queue: str | None = Field(
        default=None,
        description="The broker queue its messages go to (queue=; the default queue where "
        "its workflow names none); null where the API does not know its workflow.",
    )
    skip_reason: str | None = Field(
        default=None,
        description="Why a skipped step was skipped (its condition was false, an upstream "
        "step did not end as its trigger needs, its attempts were spent), else null.",
    )

    @classmethod
    def of(
        cls,
        step: StepExecution,
        items: dict[str, int] | None = None,
        queue: str | None = None,
        skip_reason: str | None = None,
        paused: Mapping[str, datetime | None] | None = None,
    ) -> StepOut:
        """The body of ``step`` (``queue``: the queue its workflow's definition names;
        ``skip_reason``: see ``core.conditions.skip_reasons``; ``paused``: as for
        ``WaitOut.of``)."""
        return cls(
            name=step.step_name,
            status=step.status,
            queue=queue,
            kind=cast(Any, step.kind),
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
            wait=WaitOut.of(step, paused),
            map=MapOut.of(step, items),
            skip_reason=skip_reason if step.status == "skipped" else None,
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


class ChildOut(BaseModel):
    """A child execution, started by one of this execution's child nodes."""

    execution_id: str
    workflow: str
    status: str
    step: str | None = Field(description="The parent's child node that started it.")


class ExecutionDetail(ExecutionOut):
    """An execution with its steps, its whole history and its child executions."""

    steps: list[StepOut]
    events: list[EventOut]
    children: list[ChildOut] = Field(default_factory=list)


class ExecutionPage(BaseModel):
    """A page of executions, newest first; pass ``next_cursor`` as ``cursor`` for the next."""

    items: list[ExecutionOut]
    next_cursor: str | None


class EventCreate(Strict):
    """An event to send: the oldest execution waiting for (name, key) takes it, else it
    is kept for a wait established later (CONVEYOR_EVENT_TTL)."""

    name: Name
    key: Annotated[str, StringConstraints(max_length=255, pattern=NO_NUL)] = Field(
        default="", description="The key the waits' expressions gave (empty: a wait with none)."
    )
    payload: Any = Field(
        default=None, description="JSON checked against the waits' schema for this event."
    )
    idempotency_key: Key | None = Field(
        default=None,
        description="Yours alone: the same key again returns your first event (200).",
    )


class EventReceiptOut(BaseModel):
    """A sent event (or signal): its id, and the wait that took it, if one did."""

    event_id: int
    consumed_by: str | None = Field(
        description="`execution_id/step` of the wait it completed; null: kept for one to come."
    )
    duplicate: bool = Field(description="An earlier send with this idempotency key stored it.")


class SignalCreate(Strict):
    """A payload for one execution's event wait."""

    payload: Any = Field(default=None, description="JSON checked against the wait's schema.")


class CancelRequest(Strict):
    """Why an execution is cancelled (recorded in its history)."""

    reason: Reason = "cancelled over HTTP"


# --- limits ---------------------------------------------------------------------------


class LimitOut(BaseModel):
    """A concurrency or rate-limit key: what it holds now and what it holds back."""

    key: str
    limit: int | None = Field(description="Concurrency limit (null: a rate limit's key only).")
    running: int = Field(description="Slots held now: steps (or executions) admitted, not ended.")
    waiting: int = Field(description="Steps waiting for this key (a slot, its rate, its pause).")
    rate_per_second: float | None = Field(description="A rate limit's steady rate (else null).")
    paused_until: datetime | None = Field(
        description="Nothing under the key starts before this (null, or past: not paused)."
    )

    @classmethod
    def of(cls, state: KeyState) -> LimitOut:
        """The body of a key's state."""
        return cls(
            key=state.key,
            limit=state.limit,
            running=state.running,
            waiting=state.waiting,
            rate_per_second=state.rate_per_second,
            paused_until=state.paused_until,
        )


class PauseRequest(Strict):
    """Until when a key holds every start under it."""

    until: Timestamp = Field(description="A moment in the future, with its timezone.")


# --- workflows ------------------------------------------------------------------------


class WaitDefinition(BaseModel):
    """A wait node (or a map step) as declared."""

    kind: Literal["sleep", "event", "child", "map"]
    duration_seconds: float | None = Field(description="A sleep of a fixed duration.")
    event: str | None = Field(description="An event wait: the event's name.")
    timeout_seconds: float | None = Field(description="An event wait: its timeout.")
    payload_schema: dict[str, Any] | None = Field(
        description="An event wait: its payload's JSON Schema (null: any JSON)."
    )
    workflow: str | None = Field(description="A child node (or child map): the workflow it starts.")
    over: str | None = Field(default=None, description="A map: the step whose list it maps.")
    max_parallel: int | None = Field(default=None, description="A map: items at a time.")
    max_items: int | None = Field(default=None, description="A map: the most items.")


class StepDefinition(BaseModel):
    """A step as declared."""

    name: str
    depends_on: list[str]
    max_attempts: int
    timeout: float | None
    soft_timeout: float | None
    kind: Literal["task", "sleep", "event", "child", "map"] = "task"
    wait: WaitDefinition | None = None
    queue: str = Field(description="The broker queue its messages go to (queue=).")
    trigger: Literal["all_success", "none_failed", "all_done"] = Field(
        default="all_success", description="Which upstream outcomes let it run."
    )
    condition: str | None = Field(
        default=None, description="Its when= condition's qualified name (null: none)."
    )
    on_exhausted: Literal["fail", "skip"] = Field(
        default="fail", description="What it ends as when its attempts are spent."
    )


class ScheduleOut(BaseModel):
    """A declared schedule and its state."""

    name: str
    spec: str
    timezone: str
    paused: bool
    next_run_at: datetime | None
    last_run_at: datetime | None


class RetentionOut(BaseModel):
    """How long a workflow's finished executions are kept, in seconds after they ended
    (null: forever): its ``Retention`` with the settings' defaults."""

    succeeded_seconds: float | None
    failed_seconds: float | None = Field(description="Failed, cancelled and timed out.")
    payloads_seconds: float | None = Field(
        description="After this, inputs, outputs and errors are cleared (null: never)."
    )


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
    retention: RetentionOut


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
