"""Statement builders: pure functions returning the SQLAlchemy statements of every write.

Each transition is one ``UPDATE ... WHERE status IN (<allowed sources>) RETURNING``:
the database decides who wins a race, and an empty result means "not applied".
``previous_status = status`` in the SET clause records the source status (SET
expressions read the row's old values), so RETURNING can report where a row came from.
Nothing here executes anything; ``core.operations`` yields these to a runner.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Insert,
    Select,
    Update,
    case,
    exists,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from core.sql import utcnow
from core.states import EXECUTIONS, STEPS, ExecutionStatus, StepStatus

WE = WorkflowExecution
SE = StepExecution

# Plans run on fresh sessions with nothing loaded: there is no identity map to keep
# in step with a bulk UPDATE, so skip the ORM's synchronisation work.
_BULK = {"synchronize_session": False}

EXECUTION_RETURNING = (WE.execution_id, WE.previous_status, WE.status, WE.attempt)
STEP_RETURNING = (SE.execution_id, SE.step_name, SE.previous_status, SE.status, SE.attempt)


def insert_execution(dialect: str, values: Mapping[str, Any], *, idempotent: bool) -> Insert:
    """INSERT one execution; with ``idempotent``, a reused idempotency key inserts nothing."""
    if not idempotent:
        return insert(WE).values(**values).returning(WE.execution_id)
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        dialect_insert(WE)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[WE.idempotency_key])
        .returning(WE.execution_id)
    )


def select_by_idempotency_key(key: str) -> Select[Any]:
    """The execution already holding ``key``, with what a reuse is compared on."""
    return select(WE.execution_id, WE.workflow_id, WE.input_data).where(WE.idempotency_key == key)


def insert_rows(model: type[StepExecution] | type[ExecutionEvent]) -> Insert:
    """A bulk INSERT of ``model`` rows, given its parameter sets at execution."""
    return insert(model)


def select_execution(execution_id: str) -> Select[WorkflowExecution]:
    """One execution by id."""
    return select(WE).where(WE.execution_id == execution_id)


def select_execution_status(execution_id: str) -> Select[str]:
    """The status of one execution (what a lost compare-and-set reports)."""
    return select(WE.status).where(WE.execution_id == execution_id)


def select_step_status(execution_id: str, step_name: str) -> Select[str, int]:
    """The status and attempt of one step."""
    return select(SE.status, SE.attempt).where(
        SE.execution_id == execution_id, SE.step_name == step_name
    )


def select_steps(execution_id: str) -> Select[StepExecution]:
    """Every step of an execution, by name."""
    return select(SE).where(SE.execution_id == execution_id).order_by(SE.step_name)


def select_history(execution_id: str) -> Select[ExecutionEvent]:
    """The event log of an execution, oldest first."""
    return (
        select(ExecutionEvent)
        .where(ExecutionEvent.execution_id == execution_id)
        .order_by(ExecutionEvent.id)
    )


def select_executions(
    *,
    status: ExecutionStatus | None,
    workflow_id: str | None,
    limit: int,
) -> Select[WorkflowExecution]:
    """Executions, newest first, filtered by status and workflow (index-backed)."""
    query = select(WE).order_by(WE.created_at.desc(), WE.execution_id).limit(limit)
    if status is not None:
        query = query.where(WE.status == status.value)
    if workflow_id is not None:
        query = query.where(WE.workflow_id == workflow_id)
    return query


def _status_timestamps_execution(target: ExecutionStatus, retry: bool) -> dict[str, Any]:
    now = utcnow()
    values: dict[str, Any] = {}
    if target is ExecutionStatus.RUNNING:
        values["started_at"] = func.coalesce(WE.started_at, now)
        values["finished_at"] = None
    if target in EXECUTIONS.final:
        values["finished_at"] = now
    if retry:
        values["attempt"] = WE.attempt + 1
        values["error"] = None
    return values


def transition_execution(
    execution_id: str,
    target: ExecutionStatus,
    sources: Collection[ExecutionStatus],
    *,
    retry: bool = False,
    values: Mapping[str, Any] | None = None,
) -> Update:
    """Compare-and-set one execution from any of ``sources`` to ``target``."""
    return (
        update(WE)
        .where(WE.execution_id == execution_id, WE.status.in_(sorted(sources)))
        .values(
            status=target.value,
            previous_status=WE.status,
            **_status_timestamps_execution(target, retry),
            **(values or {}),
        )
        .returning(*EXECUTION_RETURNING)
        .execution_options(**_BULK)
    )


def _status_timestamps_step(target: StepStatus, retry: bool) -> dict[str, Any]:
    now = utcnow()
    values: dict[str, Any] = {}
    if target is StepStatus.QUEUED:
        values["queued_at"] = now
    elif target is StepStatus.RUNNING:
        values["started_at"] = now
        values["heartbeat_at"] = now
        values["finished_at"] = None
    elif target in STEPS.final:
        values["finished_at"] = now
    if retry:
        values["error"] = None
        values["finished_at"] = None
    return values


def transition_steps(
    execution_id: str,
    step_names: Sequence[str] | None,
    target: StepStatus,
    sources: Collection[StepStatus],
    *,
    attempt: int | None = None,
    retry: bool = False,
    values: Mapping[str, Any] | None = None,
) -> Update:
    """Compare-and-set steps of one execution (``None``: all of them) into ``target``.

    With ``attempt``, only that attempt of the step may move: a late message from an
    attempt that was since recovered or re-run changes nothing.
    """
    conditions: list[ColumnElement[bool]] = [
        SE.execution_id == execution_id,
        SE.status.in_(sorted(sources)),
    ]
    if step_names is not None:
        conditions.append(SE.step_name.in_(list(step_names)))
    if attempt is not None:
        conditions.append(SE.attempt == attempt)
    return (
        update(SE)
        .where(*conditions)
        .values(
            status=target.value,
            previous_status=SE.status,
            **_status_timestamps_step(target, retry),
            **(values or {}),
        )
        .returning(*STEP_RETURNING)
        .execution_options(**_BULK)
    )


def release_downstream(execution_id: str, step_names: Sequence[str]) -> Update:
    """Count one more upstream success for each named step; queue those that reach zero.

    One atomic decrement per row (never read-then-write): of any number of upstream
    steps finishing at once, exactly one transaction sees the count go from 1 to 0,
    and that transaction queues the step.
    """
    reaches_zero = SE.unmet_deps == 1
    return (
        update(SE)
        .where(
            SE.execution_id == execution_id,
            SE.step_name.in_(list(step_names)),
            SE.status == StepStatus.PENDING.value,
            SE.unmet_deps > 0,
        )
        .values(
            unmet_deps=SE.unmet_deps - 1,
            status=case((reaches_zero, StepStatus.QUEUED.value), else_=SE.status),
            previous_status=case((reaches_zero, SE.status), else_=SE.previous_status),
            queued_at=case((reaches_zero, utcnow()), else_=SE.queued_at),
        )
        .returning(*STEP_RETURNING)
        .execution_options(**_BULK)
    )


def finish_execution_if_done(execution_id: str) -> Update:
    """Finalize a running execution once every step is final, in one guarded statement.

    Failed if any step failed, cancelled if any was cancelled, else succeeded.
    """

    def any_step(statuses: Iterable[StepStatus]) -> ColumnElement[bool]:
        return exists().where(
            SE.execution_id == execution_id, SE.status.in_(sorted(s.value for s in statuses))
        )

    outcome = case(
        (any_step([StepStatus.FAILED]), ExecutionStatus.FAILED.value),
        (any_step([StepStatus.CANCELLED]), ExecutionStatus.CANCELLED.value),
        else_=ExecutionStatus.SUCCEEDED.value,
    )
    return (
        update(WE)
        .where(
            WE.execution_id == execution_id,
            WE.status == ExecutionStatus.RUNNING.value,
            ~any_step(STEPS.open),
        )
        .values(status=outcome, previous_status=WE.status, finished_at=utcnow())
        .returning(*EXECUTION_RETURNING)
        .execution_options(**_BULK)
    )


def stalled_steps(stall_timeout_seconds: float, limit: int) -> Select[str, str]:
    """Running steps whose last heartbeat is older than the timeout (bounded, oldest first)."""
    return (
        select(SE.execution_id, SE.step_name)
        .where(
            SE.status == StepStatus.RUNNING.value,
            SE.heartbeat_at < utcnow(-stall_timeout_seconds),
        )
        .order_by(SE.heartbeat_at)
        .limit(limit)
    )


def recover_stalled(
    keys: Sequence[tuple[str, str]], *, retry: bool, error: Mapping[str, Any] | None = None
) -> Update:
    """Requeue (attempt + 1) the named running steps that have attempts left, or fail
    those that have none: one statement each way over the whole set."""
    key_match = _key_match(keys)
    has_attempts_left = SE.attempt < SE.max_attempts
    if retry:
        return (
            update(SE)
            .where(SE.status == StepStatus.RUNNING.value, key_match, has_attempts_left)
            .values(
                status=StepStatus.QUEUED.value,
                previous_status=SE.status,
                attempt=SE.attempt + 1,
                queued_at=utcnow(),
                worker=None,
                error=error,
            )
            .returning(*STEP_RETURNING)
            .execution_options(**_BULK)
        )
    return (
        update(SE)
        .where(SE.status == StepStatus.RUNNING.value, key_match, ~has_attempts_left)
        .values(
            status=StepStatus.FAILED.value,
            previous_status=SE.status,
            finished_at=utcnow(),
            error=error,
        )
        .returning(*STEP_RETURNING)
        .execution_options(**_BULK)
    )


def _key_match(keys: Sequence[tuple[str, str]]) -> ColumnElement[bool]:
    return tuple_(SE.execution_id, SE.step_name).in_([tuple(k) for k in keys])


def heartbeat(worker: str, keys: Sequence[tuple[str, str]] | None = None) -> Update:
    """Refresh the heartbeat of every running step of ``worker`` (or just ``keys``)."""
    conditions: list[ColumnElement[bool]] = [
        SE.status == StepStatus.RUNNING.value,
        SE.worker == worker,
    ]
    if keys is not None:
        conditions.append(_key_match(keys))
    return update(SE).where(*conditions).values(heartbeat_at=utcnow()).execution_options(**_BULK)
