"""The ORM models: users and their sessions, workflow executions, their steps and events,
and the state of workflows' schedules.

JSON columns are JSONB on PostgreSQL; every timestamp is timezone-aware UTC and, when
a statement writes it, comes from the database's clock (``core.sql.utcnow``).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

import uuid6
from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
    inspect,
    text,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    InstanceState,
    Mapped,
    Session,
    UOWTransaction,
    mapped_column,
    relationship,
    validates,
)

from core.errors import InputValidationError
from core.schedules import refuse_reserved_key
from core.sql import utcnow
from core.states import EXECUTIONS, STEPS, ExecutionStatus, StepStatus
from core.types import UTCDateTime, json_type

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    """A new id: a time-ordered UUID (version 7), as a string.

    Ordered within a process even inside one millisecond, so that the executions of one
    ``enqueue_many`` (which share a ``created_at``) keep their order where FIFO
    matters, and new rows land at the right edge of the primary-key index.
    """
    return str(uuid6.uuid7())


def encode_json(field: str, value: Any) -> str:
    """``value`` as the JSON text both backends store, else InputValidationError naming
    ``field``, where in the value (``$.rows[2]``) and the problem: a value JSON has no
    form for (a set, bytes, any other object), NaN or Infinity, a key that is not a
    string (JSON would turn it into one), or a NUL character in a string or key
    (PostgreSQL's JSONB refuses ``\\u0000``). The one check of every stored JSON value."""
    text: str | None = None
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError as exc:
        if "ircular" in str(exc):  # the walk below would never end
            raise InputValidationError(
                f"{field} is not JSON-serializable: it contains itself"
            ) from None
    except RecursionError:
        raise InputValidationError(
            f"{field} is not JSON-serializable: it is nested too deeply"
        ) from None
    except TypeError:
        pass
    problem = _json_problem(value)
    if problem is not None or text is None:
        raise InputValidationError(f"{field} is not JSON-serializable: {problem or 'not JSON'}")
    return text


def check_json(field: str, value: Any) -> Any:
    """Return ``value`` if it is storable JSON (see ``encode_json``), else
    InputValidationError naming the field and the problem."""
    encode_json(field, value)
    return value


# A lone UTF-16 surrogate (from decoding with "surrogateescape", say) is no character:
# JSONB refuses it, SQLite would keep it.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_TEXT = "a lone UTF-16 surrogate, which is not text (JSONB refuses it)"

# Where a value sits in the JSON being checked: (parent, key or index), "$" at the root;
# built as the walk descends, spelled out only for the problem found.
JsonPath = tuple[Any, str | int] | str


def _spelled(path: JsonPath) -> str:
    parts: list[str] = []
    while not isinstance(path, str):
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return path + "".join(reversed(parts))


def _json_problem(value: Any) -> str | None:
    """The first thing in ``value`` that strict, storable JSON cannot hold, or None."""
    stack: list[tuple[Any, JsonPath]] = [(value, "$")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                where = _spelled(path)
                return f"the string at {where} holds a NUL character (\\u0000), which JSONB refuses"
            if _SURROGATE.search(item):
                return f"the string at {_spelled(path)} holds {_SURROGATE_TEXT}"
        elif item is None or isinstance(item, int):  # bool is an int
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{item!r} at {_spelled(path)} (JSON has no NaN or Infinity)"
        elif isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return (
                        f"the key {key!r} at {_spelled(path)} is of type {type(key).__name__}, "
                        "not a string"
                    )
                if "\x00" in key:
                    return f"the key {key!r} at {_spelled(path)} holds a NUL character (\\u0000)"
                if _SURROGATE.search(key):
                    return f"the key {key!r} at {_spelled(path)} holds {_SURROGATE_TEXT}"
                stack.append((child, (path, key)))
        elif isinstance(item, list | tuple):
            stack.extend((child, (path, index)) for index, child in enumerate(item))
        else:
            kind = type(item)
            name = kind.__name__ if kind.__module__ == "builtins" else kind.__qualname__
            return f"{_spelled(path)} is of type {name}, which JSON has no form for"
    return None


# Partial indexes' predicates, shared with migration 0006 (and matched exactly by the
# statements that must use them).
WAITING_WAKE = "status = 'waiting' AND wake_at IS NOT NULL"
WAITING_EVENT = "status = 'waiting' AND wait_event IS NOT NULL"
WAITING_KEY = "status = 'waiting' AND wait_kind = 'key'"
# The wait kinds of task steps (held for a key, handed back for a compatible worker);
# the others name wait nodes (sleep, event, child, map).
TASK_WAIT_KINDS = (None, "key", "version")
WAITING_VERSION = "status = 'waiting' AND wait_kind = 'version'"
FAILED_STEP = "status = 'failed'"
OPEN_SIGNAL = "consumed_at IS NULL AND target_execution_id IS NOT NULL"
# A debounced execution whose window is open: enqueues with its key collapse into it.
DEBOUNCE_OPEN = "status = 'pending' AND debounce_key IS NOT NULL"
UNWOKEN_CHILD = (
    "parent_execution_id IS NOT NULL AND parent_woken_at IS NULL "
    "AND status IN ('succeeded', 'failed', 'cancelled', 'timed_out')"
)


class Base(DeclarativeBase):
    """Declarative base with constraint names Alembic can rely on."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}  # noqa: RUF012 - SQLAlchemy's API


class Timestamped:
    """created_at / updated_at columns filled by the database's clock."""

    created_at: Mapped[datetime] = mapped_column(default=utcnow(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow(), onupdate=utcnow(), nullable=False
    )


class User(Timestamped, Base):
    """Someone who triggers executions (and, through sessions, calls the API)."""

    __tablename__ = "users"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True, nullable=False)
    first_name: Mapped[str | None] = mapped_column(String(200))
    last_name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="active", nullable=False)
    role: Mapped[str] = mapped_column(String(20), default="member", nullable=False)

    sessions: Mapped[list[UserSession]] = relationship(
        back_populates="user", cascade="all, delete-orphan", order_by="UserSession.created_at"
    )

    @validates("email")
    def _validate_email(self, _key: str, value: str) -> str:
        if not isinstance(value, str) or "@" not in value.strip():
            raise InputValidationError(f"{value!r} is not an email address")
        return value.strip()


class UserSession(Timestamped, Base):
    """A login or API token of a user; only the token's SHA-256 digest is stored."""

    __tablename__ = "user_sessions"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(back_populates="sessions")


class WorkflowExecution(Timestamped, Base):
    """One run of a workflow: its input, output, status and who asked for it."""

    __tablename__ = "workflow_executions"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    execution_id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workflow_id: Mapped[str] = mapped_column(String(200), nullable=False)
    workflow_version: Mapped[int] = mapped_column(Integer, default=1, nullable=False)
    input_data: Mapped[Any] = mapped_column(json_type(), nullable=True)
    output_data: Mapped[Any] = mapped_column(json_type(), nullable=True)
    error: Mapped[Any] = mapped_column(json_type(), nullable=True)
    status: Mapped[str] = mapped_column(
        String(20), default=ExecutionStatus.PENDING.value, nullable=False
    )
    previous_status: Mapped[str | None] = mapped_column(String(20))
    attempt: Mapped[int] = mapped_column(Integer, default=1, nullable=False)
    priority: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # Whose namespace the key lives in: the triggering user's id for keys sent through
    # the HTTP API, '' for producers (Python, CLI, schedules). Keys are unique per scope,
    # so one user can neither take nor probe another's keys.
    idempotency_scope: Mapped[str] = mapped_column(
        String(36), default="", server_default=text("''"), nullable=False
    )
    triggered_by: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime | None]
    # The reconciler's re-sends of this pending execution's start message: when it last
    # sent one and how many it sent since the execution (last) became pending, so an
    # execution waiting behind a deep backlog or a concurrency limit is not re-sent a
    # start every period.
    start_resent_at: Mapped[datetime | None]
    starts_resent: Mapped[int] = mapped_column(
        Integer, default=0, server_default=text("0"), nullable=False
    )
    # A child execution: the parent step waiting on it (at that step's attempt), the
    # root of its tree and its depth below it; ``parent_woken_at`` is set when the
    # parent step was told of the child's end (the reconciler's safety net finds
    # finished children without it).
    parent_execution_id: Mapped[str | None] = mapped_column(String(36))
    parent_step_name: Mapped[str | None] = mapped_column(String(200))
    parent_attempt: Mapped[int | None] = mapped_column(Integer)
    # The item of a child map (``wf.child(..., over=)``) this child runs.
    parent_item_index: Mapped[int | None] = mapped_column(Integer)
    root_execution_id: Mapped[str | None] = mapped_column(String(36))
    depth: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"), nullable=False)
    parent_woken_at: Mapped[datetime | None]
    # Running with every open step waiting (none queued or running): the execution holds
    # no max_concurrency slot meanwhile.
    parked_at: Mapped[datetime | None]
    # The key its pending execution takes turns under (core.limits): its workflow's
    # first per-input Concurrency key, written at creation; NULL for workflows without.
    limit_key: Mapped[str | None] = mapped_column(String(255))
    # A debounced execution (``Debounce``): its window's key while the window is open
    # (pending, collecting enqueues; set to NULL when the waker closes it at
    # ``start_at``), when it starts (the last enqueue's time + period, at most
    # ``latest_start_at``) and the latest start (the first enqueue's + max_wait).
    debounce_key: Mapped[str | None] = mapped_column(String(255))
    start_at: Mapped[datetime | None]
    latest_start_at: Mapped[datetime | None]
    # The workflow's shape (``workflow_shapes``) this execution started with: its steps,
    # edges and contracts. A worker runs a step of it only when the execution's
    # remaining steps are compatible with its own code (core.shapes); NULL for
    # executions created before shapes were recorded (any worker runs them).
    shape_hash: Mapped[str | None] = mapped_column(String(64))
    # When retention cleared its inputs, outputs and errors (``Retention(payloads=)``):
    # the skeleton (statuses, timings, history) stays; replay refuses it.
    payloads_cleared_at: Mapped[datetime | None]

    steps: Mapped[list[StepExecution]] = relationship(
        back_populates="execution", cascade="all, delete-orphan", order_by="StepExecution.step_name"
    )
    events: Mapped[list[ExecutionEvent]] = relationship(
        back_populates="execution",
        cascade="all, delete-orphan",
        order_by="ExecutionEvent.id",
        viewonly=False,
    )

    __table_args__ = (
        UniqueConstraint(
            "idempotency_scope", "idempotency_key", name="uq_workflow_executions_idempotency"
        ),
        # Listing by status (API, CLI) and the reconciler's "pending, never started".
        Index("ix_workflow_executions_status_created", "status", "created_at"),
        # Listing by workflow, and the per-workflow concurrency limit's count of running.
        Index("ix_workflow_executions_workflow_status", "workflow_id", "status", "created_at"),
        # The API's listings page by (created_at, execution_id): everyone's (admins) and
        # one user's own executions.
        Index("ix_workflow_executions_created", "created_at", "execution_id"),
        Index("ix_workflow_executions_triggered_by_created", "triggered_by", "created_at"),
        # The reconciler's "open executions past their deadline"; partial, so its cost
        # follows the open work, not the table.
        Index(
            "ix_workflow_executions_open_deadline",
            "deadline_at",
            postgresql_where=text("deadline_at IS NOT NULL AND status IN ('pending', 'running')"),
            sqlite_where=text("deadline_at IS NOT NULL AND status IN ('pending', 'running')"),
        ),
        # A parent's children (cascading a cancel, the API's links).
        Index(
            "ix_workflow_executions_parent",
            "parent_execution_id",
            postgresql_where=text("parent_execution_id IS NOT NULL"),
            sqlite_where=text("parent_execution_id IS NOT NULL"),
        ),
        # The reconciler's safety net: finished children whose parent was not told.
        Index(
            "ix_workflow_executions_unwoken_child",
            "finished_at",
            postgresql_where=text(UNWOKEN_CHILD),
            sqlite_where=text(UNWOKEN_CHILD),
        ),
        # One open debounce window per (workflow, scope, key): the enqueue's ON CONFLICT
        # target. The scope is the idempotency key's (the API caller's, '' for
        # producers), so one user's enqueues never land in another's execution.
        Index(
            "uq_workflow_executions_debounce",
            "workflow_id",
            "idempotency_scope",
            "debounce_key",
            unique=True,
            postgresql_where=text(DEBOUNCE_OPEN),
            sqlite_where=text(DEBOUNCE_OPEN),
        ),
        # The waker's scan for windows whose start is due.
        Index(
            "ix_workflow_executions_debounce_due",
            "start_at",
            postgresql_where=text(DEBOUNCE_OPEN),
            sqlite_where=text(DEBOUNCE_OPEN),
        ),
        # Retention's scan (core.retention): one workflow's finished executions of one
        # status, oldest first.
        Index(
            "ix_workflow_executions_workflow_finished",
            "workflow_id",
            "status",
            "finished_at",
        ),
    )

    @validates("status")
    def _validate_status(self, _key: str, value: object) -> str:
        target = EXECUTIONS.parse(value)
        current = self.__dict__.get("status")
        if current is None or current != target:
            EXECUTIONS.check(None if current is None else EXECUTIONS.parse(current), target)
        return target.value

    @validates("input_data", "output_data", "error")
    def _validate_json(self, key: str, value: Any) -> Any:
        return check_json(key, value)


class StepExecution(Timestamped, Base):
    """One step of one execution: its status, attempts, fan-in counter and result."""

    __tablename__ = "execution_steps"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    execution_id: Mapped[str] = mapped_column(
        ForeignKey("workflow_executions.execution_id", ondelete="CASCADE"), primary_key=True
    )
    step_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(
        String(20), default=StepStatus.PENDING.value, nullable=False
    )
    previous_status: Mapped[str | None] = mapped_column(String(20))
    attempt: Mapped[int] = mapped_column(Integer, default=1, nullable=False)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1, nullable=False)
    # Attempts the step's retry policy does not count (it judges ``attempt - recoveries``):
    # each time the step was taken back from a worker that died (stall recovery), so a
    # deploy or an OOM kill does not spend its error retries, and, after an execution
    # retry, every attempt of the earlier runs.
    recoveries: Mapped[int] = mapped_column(
        Integer, default=0, server_default=text("0"), nullable=False
    )
    # The attempts this step took before its execution's latest retry (0 before any).
    # ``attempt`` counts on across retries, so that a late message of an earlier run's
    # attempt can never complete this run's; this run's crash recoveries are
    # ``recoveries - attempt_base`` (see ``crash_recoveries``).
    attempt_base: Mapped[int] = mapped_column(
        Integer, default=0, server_default=text("0"), nullable=False
    )
    # Upstream steps not yet succeeded; the transaction that brings it to zero queues
    # the step (an atomic decrement, never read-then-write).
    unmet_deps: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    output_data: Mapped[Any] = mapped_column(json_type(), nullable=True)
    error: Mapped[Any] = mapped_column(json_type(), nullable=True)
    celery_task_id: Mapped[str | None] = mapped_column(String(255))
    worker: Mapped[str | None] = mapped_column(String(255))
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    # The reconciler's re-sends of this queued step's message: when it last sent one and
    # how many it sent, so a step in a deep backlog is not re-sent every pass.
    republished_at: Mapped[datetime | None]
    republishes: Mapped[int] = mapped_column(
        Integer, default=0, server_default=text("0"), nullable=False
    )
    # What a wait node waits for: sleep, event, child or map (written when the step row
    # is created, from its definition), or key for a task step behind limits (its
    # ``wait_key`` names the key that refused it while it waits). NULL for a task step.
    # The rest is set when the wait is established (armed).
    wait_kind: Mapped[str | None] = mapped_column(String(10))
    waiting_since: Mapped[datetime | None]
    # When the waker acts on it: a sleep's end, an event's timeout, a retry's re-arm.
    wake_at: Mapped[datetime | None]
    wait_event: Mapped[str | None] = mapped_column(String(200))
    wait_key: Mapped[str | None] = mapped_column(String(255))
    child_execution_id: Mapped[str | None] = mapped_column(String(36))
    # A map step's items (``map_items``), set when it expands: how many, how many are
    # not ended yet (the atomic fan-in counter: the item that brings it to zero
    # aggregates), how many failed for good, and how many may (``Tolerate``).
    map_total: Mapped[int | None] = mapped_column(Integer)
    map_left: Mapped[int | None] = mapped_column(Integer)
    map_failed: Mapped[int | None] = mapped_column(Integer)
    map_max_failed: Mapped[int | None] = mapped_column(Integer)
    # A failed step's failure group (core.failures): a digest of (workflow, step, error
    # type, normalised message), written with the failure, so that "412 failures are one
    # ConnectionError in load" is one GROUP BY over an index.
    error_group: Mapped[str | None] = mapped_column(String(16))

    execution: Mapped[WorkflowExecution] = relationship(back_populates="steps")

    @property
    def crash_recoveries(self) -> int:
        """Times this run of the step was taken back from a worker that died."""
        return self.recoveries - self.attempt_base

    @property
    def policy_attempt(self) -> int:
        """The try of its ``Retry`` policy this step is on (1 to ``max_attempts``): what a
        reader compares with ``max_attempts``, whereas ``attempt`` counts every attempt."""
        return self.attempt - self.recoveries

    @property
    def kind(self) -> str:
        """What the step is: ``task`` (``wait_kind`` ``key``: a task step behind limits
        records the key holding it back there; ``version``: a task step handed back for
        a worker with a compatible shape), or its wait node's kind."""
        return "task" if self.wait_kind in TASK_WAIT_KINDS else str(self.wait_kind)

    __table_args__ = (
        # The reconciler's stalled-step scan: running steps by heartbeat age.
        Index(
            "ix_execution_steps_running_heartbeat",
            "heartbeat_at",
            postgresql_where=text("status = 'running'"),
            sqlite_where=text("status = 'running'"),
        ),
        # The reconciler's due-retry / never-picked-up scan over queued steps.
        Index(
            "ix_execution_steps_queued_due",
            "next_attempt_at",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        # A worker's bulk heartbeat of the steps it runs.
        Index(
            "ix_execution_steps_running_worker",
            "worker",
            postgresql_where=text("status = 'running'"),
            sqlite_where=text("status = 'running'"),
        ),
        # The waker's due scan: it names no execution, so it leads with wake_at (as the
        # stall scan leads with heartbeat_at); partial, so its cost follows the waits.
        Index(
            "ix_execution_steps_waiting_wake",
            "wake_at",
            postgresql_where=text(WAITING_WAKE),
            sqlite_where=text(WAITING_WAKE),
        ),
        # The open-steps gauge's waiting part (conveyor_steps_waiting), by kind.
        Index(
            "ix_execution_steps_waiting",
            "wait_kind",
            postgresql_where=text("status = 'waiting'"),
            sqlite_where=text("status = 'waiting'"),
        ),
        # send_event's oldest open wait for (name, key).
        Index(
            "ix_execution_steps_waiting_event",
            "wait_event",
            "wait_key",
            "waiting_since",
            postgresql_where=text(WAITING_EVENT),
            sqlite_where=text(WAITING_EVENT),
        ),
        # The steps waiting for a key's slot or rate, in arrival order (core.limits).
        Index(
            "ix_execution_steps_waiting_key",
            "wait_key",
            "waiting_since",
            postgresql_where=text(WAITING_KEY),
            sqlite_where=text(WAITING_KEY),
        ),
        # The steps handed back for a worker with a compatible shape (core.shapes).
        Index(
            "ix_execution_steps_waiting_version",
            "waiting_since",
            postgresql_where=text(WAITING_VERSION),
            sqlite_where=text(WAITING_VERSION),
        ),
        # The failure groups (core.failures): failed steps by group.
        Index(
            "ix_execution_steps_failed_group",
            "error_group",
            "finished_at",
            postgresql_where=text(FAILED_STEP),
            sqlite_where=text(FAILED_STEP),
        ),
    )

    @validates("status")
    def _validate_status(self, _key: str, value: object) -> str:
        target = STEPS.parse(value)
        current = self.__dict__.get("status")
        if current is None or current != target:
            STEPS.check(None if current is None else STEPS.parse(current), target)
        return target.value

    @validates("output_data", "error")
    def _validate_json(self, key: str, value: Any) -> Any:
        return check_json(key, value)


class MapItem(Base):
    """One item of a map step: its status, attempts and output. Its input is element
    ``item_index`` of the upstream step's stored output, read in place (never copied).

    Its transitions write no ``execution_events`` rows (the row is its record); the map
    step's own (expanded, ended) and each item's retry, recovery and failure do."""

    __tablename__ = "map_items"

    execution_id: Mapped[str] = mapped_column(
        ForeignKey("workflow_executions.execution_id", ondelete="CASCADE"), primary_key=True
    )
    step_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    item_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(
        String(20), default=StepStatus.PENDING.value, nullable=False
    )
    # As on steps: the policy's try is ``attempt - recoveries`` (crash recoveries and,
    # after a retry of failed items, the earlier runs' attempts do not count).
    attempt: Mapped[int] = mapped_column(Integer, default=1, nullable=False)
    recoveries: Mapped[int] = mapped_column(
        Integer, default=0, server_default=text("0"), nullable=False
    )
    # ``recoveries`` before this run of the item: this run's crash recoveries are
    # ``recoveries - attempt_base`` (held against CONVEYOR_MAX_CRASH_RECOVERIES).
    attempt_base: Mapped[int] = mapped_column(
        Integer, default=0, server_default=text("0"), nullable=False
    )
    output_data: Mapped[Any] = mapped_column(json_type(), nullable=True)
    error: Mapped[Any] = mapped_column(json_type(), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255))
    celery_task_id: Mapped[str | None] = mapped_column(String(255))
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    republished_at: Mapped[datetime | None]
    republishes: Mapped[int] = mapped_column(
        Integer, default=0, server_default=text("0"), nullable=False
    )

    __table_args__ = (
        # "Admit the lowest pending items": the first entries, however far the map got
        # (a walk of the primary key would pass every ended item).
        Index(
            "ix_map_items_pending",
            "execution_id",
            "step_name",
            "item_index",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # The reconciler's stalled-item scan, as its step twin.
        Index(
            "ix_map_items_running_heartbeat",
            "heartbeat_at",
            postgresql_where=text("status = 'running'"),
            sqlite_where=text("status = 'running'"),
        ),
        # The reconciler's due-retry / never-picked-up scan over queued items.
        Index(
            "ix_map_items_queued_due",
            "next_attempt_at",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        # A worker's bulk heartbeat of the items it runs.
        Index(
            "ix_map_items_running_worker",
            "worker",
            postgresql_where=text("status = 'running'"),
            sqlite_where=text("status = 'running'"),
        ),
    )


class ExecutionEvent(Base):
    """An append-only record of one transition, written in the transition's transaction."""

    __tablename__ = "execution_events"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    execution_id: Mapped[str] = mapped_column(
        ForeignKey("workflow_executions.execution_id", ondelete="CASCADE"), nullable=False
    )
    step_name: Mapped[str | None] = mapped_column(String(200))
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str] = mapped_column(String(20), nullable=False)
    attempt: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow(), nullable=False)

    execution: Mapped[WorkflowExecution] = relationship(back_populates="events")

    __table_args__ = (Index("ix_execution_events_execution", "execution_id", "id"),)


class WorkflowSchedule(Timestamped, Base):
    """A declared schedule's state: paused or not, the last tick fired, the next one due.

    One row per (workflow, schedule name), created by the first firing pass (or a
    pause) that sees the schedule; the definition itself lives in code.
    """

    __tablename__ = "workflow_schedules"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    workflow: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    # When it fires, as deployed (cron and time zone, or interval): a change moves
    # next_tick_at to the new spec's first tick.
    spec: Mapped[str] = mapped_column(String(300), nullable=False)
    paused: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)
    next_tick_at: Mapped[datetime | None]
    last_tick_at: Mapped[datetime | None]
    # No foreign key: executions may be purged; the schedule's history stays.
    last_execution_id: Mapped[str | None] = mapped_column(String(36))


class InboxEvent(Base):
    """An event sent to waits by (name, key), or a signal to one execution's wait.

    Kept until a wait consumes it (``consumed_at``, once) or, unconsumed, until
    ``expires_at`` (``CONVEYOR_EVENT_TTL``). Consumed rows stay as the audit.
    """

    __tablename__ = "event_inbox"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    event_key: Mapped[str | None] = mapped_column(String(255))
    # A signal: meant for this execution's wait of this name only.
    target_execution_id: Mapped[str | None] = mapped_column(String(36))
    target_step: Mapped[str | None] = mapped_column(String(200))
    payload: Mapped[Any] = mapped_column(json_type(), nullable=True)
    idempotency_scope: Mapped[str] = mapped_column(
        String(36), default="", server_default=text("''"), nullable=False
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    sent_by: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    actor: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(default=utcnow(), nullable=False)
    expires_at: Mapped[datetime | None]
    consumed_at: Mapped[datetime | None]
    consumed_by_execution: Mapped[str | None] = mapped_column(String(36))
    consumed_by_step: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        UniqueConstraint("idempotency_scope", "idempotency_key", name="uq_event_inbox_idempotency"),
        # Establishing an event wait: the oldest open event for (name, key).
        Index(
            "ix_event_inbox_open",
            "name",
            "event_key",
            "id",
            postgresql_where=text("consumed_at IS NULL"),
            sqlite_where=text("consumed_at IS NULL"),
        ),
        # Establishing a wait: a signal sent to it before it existed.
        Index(
            "ix_event_inbox_signal",
            "target_execution_id",
            "target_step",
            "id",
            postgresql_where=text(OPEN_SIGNAL),
            sqlite_where=text(OPEN_SIGNAL),
        ),
        # The reconciler's expiry of events nobody consumed.
        Index(
            "ix_event_inbox_expiry",
            "expires_at",
            postgresql_where=text("consumed_at IS NULL"),
            sqlite_where=text("consumed_at IS NULL"),
        ),
    )


class DatabaseLiveness(Base):
    """One row: when a reconciler pass last reached the database, and since when it has
    reached it without a gap.

    A running step is judged stalled only when its heartbeat is older than the stall
    timeout counted from ``reachable_since``: after any outage (a restart, crash
    recovery, a hung server or a partition) every worker gets a whole timeout of
    reachable database to beat again before its steps are taken for lost.
    """

    __tablename__ = "database_liveness"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_seen_at: Mapped[datetime] = mapped_column(nullable=False)
    reachable_since: Mapped[datetime] = mapped_column(nullable=False)


class FlowKey(Base):
    """One row per concurrency or rate-limit key (core.limits): locked by every admission
    under the key, so admissions of one key are serial and exact across workers.

    The running count is not stored: it is the ``key_slots`` rows whose holder still
    holds (a step queued or running at that attempt, an execution running and not
    parked), counted under this row's lock, so no crash, timeout or cancel can leak a
    slot. The limit is the one the last admission's definition gave.
    """

    __tablename__ = "flow_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    concurrency_limit: Mapped[int | None] = mapped_column(Integer)
    # A rate limit (GCRA): seconds between starts, how many may start at once, and the
    # theoretical arrival time of the next start at the steady rate.
    rate_interval: Mapped[float | None] = mapped_column(Float)
    rate_burst: Mapped[int | None] = mapped_column(Integer)
    rate_tat: Mapped[datetime | None]
    # ctx.pause_key: nothing under the key starts before this time.
    paused_until: Mapped[datetime | None]
    last_admitted_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow(), onupdate=utcnow(), nullable=False
    )


class KeySlot(Base):
    """A slot held under a concurrency key by a step attempt (``step_name``, ``attempt``)
    or by an execution (``step_name`` empty). Written by the admission; a row whose
    holder no longer holds counts for nothing, and is deleted by the transaction that
    ends the hold or, failing that, by the reconciler (which logs it as drift)."""

    __tablename__ = "key_slots"

    execution_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    step_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow(), nullable=False)

    __table_args__ = (Index("ix_key_slots_key", "key"),)


class WorkflowShape(Base):
    """A workflow's shape as some process's code defined it (core.shapes): its steps,
    their edges, node kinds and contracts, by digest. Written once per shape, by the
    first process that creates an execution of it or starts a worker with it; read to
    judge whether a worker's code may run an execution's remaining steps."""

    __tablename__ = "workflow_shapes"

    shape_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    workflow: Mapped[str] = mapped_column(String(200), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    shape: Mapped[Any] = mapped_column(json_type(), nullable=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow(), nullable=False)

    __table_args__ = (Index("ix_workflow_shapes_workflow", "workflow", "created_at"),)


class WorkerShape(Base):
    """A live worker's shapes: one row per (worker, shape) it can run, refreshed while
    it lives (``seen_at``) and deleted when it stops, so that a step handed back for a
    compatible worker is sent to one that is up (queue ``conveyor.shape.<hash>``)."""

    __tablename__ = "worker_shapes"

    worker: Mapped[str] = mapped_column(String(255), primary_key=True)
    shape_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    workflow: Mapped[str] = mapped_column(String(200), nullable=False)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow(), nullable=False)

    __table_args__ = (Index("ix_worker_shapes_shape", "shape_hash", "seen_at"),)


@event.listens_for(Session, "before_flush")
def _record_orm_transitions(session: Session, _flush: UOWTransaction, _instances: Any) -> None:
    """Give status changes made through the ORM (the guide's load-modify-commit) an event row.

    The state manager writes its events itself, next to its compare-and-set statements;
    this covers user code that adds or modifies objects, in the same flush.
    """
    new_steps = {obj.execution_id for obj in session.new if isinstance(obj, StepExecution)}
    for obj in list(session.new):
        if isinstance(obj, WorkflowExecution):
            # A producer path like any other: ticks' keys are the schedules' own.
            refuse_reserved_key(obj.idempotency_key)
            obj.status = obj.status or ExecutionStatus.PENDING.value
            if obj.execution_id is None:
                obj.execution_id = new_id()
            session.add(_event_for(obj.execution_id, None, None, obj.status, obj.attempt))
            if obj.status == ExecutionStatus.PENDING.value and obj.execution_id not in new_steps:
                _add_steps(session, obj)
        elif isinstance(obj, StepExecution):
            obj.status = obj.status or StepStatus.PENDING.value
            session.add(_event_for(obj.execution_id, obj.step_name, None, obj.status, obj.attempt))
    for obj in list(session.dirty):
        if not isinstance(obj, WorkflowExecution | StepExecution):
            continue
        state: InstanceState[Any] = inspect(obj)
        history = state.attrs.status.history
        if not history.has_changes() or not history.deleted:
            continue
        old = history.deleted[0]
        if old == obj.status:
            continue
        obj.previous_status = old
        step_name = obj.step_name if isinstance(obj, StepExecution) else None
        session.add(_event_for(obj.execution_id, step_name, old, obj.status, obj.attempt))


def _event_for(
    execution_id: str, step_name: str | None, old: str | None, new: str, attempt: int | None
) -> ExecutionEvent:
    reason = "created" if old is None else "updated through the ORM"
    return ExecutionEvent(
        execution_id=execution_id,
        step_name=step_name,
        from_status=old,
        to_status=new,
        attempt=attempt,
        reason=reason,
    )


def _add_steps(session: Session, execution: WorkflowExecution) -> None:
    """Give an execution added through the ORM what ``create_execution`` gives it: its
    workflow looked up (WorkflowNotFound), its input checked, one row per step, and a
    start dispatched to the workers once the session commits."""
    from core.registry import get_registry  # the registry imports workflow modules

    definition = get_registry().get(execution.workflow_id, execution.workflow_version)
    if definition.debounce is not None:
        # A row added here could only be inserted, never collapsed into an open window.
        raise InputValidationError(
            f"workflow {definition.name!r} is debounced: create its executions with "
            "enqueue or ExecutionStateManager.create_execution, which collapse them into "
            "the open window of their key, not with session.add"
        )
    execution.workflow_version = definition.version
    from core.shapes import shape_of

    execution.shape_hash = shape_of(definition).hash
    execution.input_data = definition.validate_input(execution.input_data)
    execution.priority = execution.priority or 0
    if execution.deadline_at is None and definition.deadline is not None:
        execution.deadline_at = datetime.now(UTC) + definition.deadline
    for step in definition.steps.values():
        session.add(
            StepExecution(
                execution_id=execution.execution_id,
                step_name=step.name,
                status=StepStatus.PENDING.value,
                unmet_deps=len(step.depends_on),
                max_attempts=step.retry.max_attempts,
                wait_kind=step.wait_kind,
            )
        )
    starts: list[tuple[str, str, int]] = session.info.setdefault(_STARTS, [])
    starts.append((execution.execution_id, definition.name, execution.priority))


_STARTS = "conveyor_starts"


@event.listens_for(Session, "after_commit")
def _dispatch_orm_starts(session: Session) -> None:
    starts = session.info.pop(_STARTS, None)
    if starts:
        from core.dispatch import dispatch_starts

        dispatch_starts(starts)


@event.listens_for(Session, "after_rollback")
def _forget_orm_starts(session: Session) -> None:
    session.info.pop(_STARTS, None)
