"""Statement builders: pure functions returning the SQLAlchemy statements of every write.

Each transition is one ``UPDATE ... WHERE status IN (<allowed sources>) RETURNING``:
the database decides who wins a race, and an empty result means "not applied".
``previous_status = status`` in the SET clause records the source status (SET
expressions read the row's old values), so RETURNING can report where a row came from.
Nothing here executes anything; the units of work in ``core.executions``,
``core.steps`` and ``core.reconciler`` run them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    Insert,
    Select,
    String,
    Table,
    Update,
    and_,
    bindparam,
    case,
    column,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
    values,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from core.models import (
    UNWOKEN_CHILD,
    DatabaseLiveness,
    ExecutionEvent,
    StepExecution,
    WorkflowExecution,
)
from core.sql import clock_now, utcnow
from core.states import EXECUTIONS, STEPS, ExecutionStatus, StepStatus

WE = WorkflowExecution
SE = StepExecution

# Plans run on fresh sessions with nothing loaded: there is no identity map to keep
# in step with a bulk UPDATE, so skip the ORM's synchronisation work.
_BULK = {"synchronize_session": False}

# parent_execution_id: an execution that ends tells its parent step only when it is a
# child (core.children), known from the row the transition returned.
EXECUTION_RETURNING = (
    WE.execution_id,
    WE.previous_status,
    WE.status,
    WE.attempt,
    WE.parent_execution_id,
)
STEP_RETURNING = (
    SE.execution_id,
    SE.step_name,
    SE.previous_status,
    SE.status,
    SE.attempt,
    SE.recoveries,
    SE.worker,
)


def insert_executions(
    dialect: str, rows: Sequence[Mapping[str, Any]], *, idempotent: bool
) -> Insert:
    """One multi-row INSERT of executions; with ``idempotent``, rows whose idempotency
    key is taken are skipped (ON CONFLICT DO NOTHING) and missing from RETURNING."""
    if not idempotent:
        return insert(WE).values(list(rows)).returning(WE.execution_id)
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        dialect_insert(WE)
        .values(list(rows))
        .on_conflict_do_nothing(index_elements=[WE.idempotency_scope, WE.idempotency_key])
        .returning(WE.execution_id)
    )


def select_by_idempotency_key(scope: str, key: str) -> Select[Any]:
    """The execution already holding ``key`` in ``scope``, with what a reuse is compared
    on (keys are unique per scope: the API user's id, or '' for producers)."""
    return select(WE.execution_id, WE.workflow_id, WE.input_data, WE.triggered_by).where(
        WE.idempotency_scope == scope, WE.idempotency_key == key
    )


def insert_rows(model: type[StepExecution] | type[ExecutionEvent]) -> Insert:
    """A bulk INSERT of ``model`` rows, given its parameter sets at execution.

    A Core insert on the table: one executemany, without the ORM's RETURNING of
    generated keys that nothing reads.
    """
    return insert(cast(Table, model.__table__))


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


def select_running_claim(execution_id: str, step_name: str, task_id: str) -> Select[int, int]:
    """Attempt and recoveries of a step running under Celery delivery ``task_id``."""
    return select(SE.attempt, SE.recoveries).where(
        SE.execution_id == execution_id,
        SE.step_name == step_name,
        SE.status == StepStatus.RUNNING.value,
        SE.celery_task_id == task_id,
    )


def select_steps(execution_id: str) -> Select[StepExecution]:
    """Every step of an execution, by name."""
    return select(SE).where(SE.execution_id == execution_id).order_by(SE.step_name)


def open_steps_of(execution_id: str) -> Select[str]:
    """The names of an execution's steps that are not final, by name."""
    return (
        select(SE.step_name)
        .where(SE.execution_id == execution_id, SE.status.in_(sorted(STEPS.open)))
        .order_by(SE.step_name)
    )


def select_history(execution_id: str) -> Select[ExecutionEvent]:
    """The event log of an execution, oldest first."""
    return (
        select(ExecutionEvent)
        .where(ExecutionEvent.execution_id == execution_id)
        .order_by(ExecutionEvent.id)
    )


def page_executions(
    *,
    statuses: Collection[ExecutionStatus] | None,
    workflow_id: str | None,
    triggered_by: str | None,
    created_after: datetime | None,
    created_before: datetime | None,
    limit: int,
    after: tuple[datetime, str] | None,
    waiting: bool = False,
) -> Select[WorkflowExecution]:
    """Executions newest first, strictly after the keyset position ``after``; ``waiting``
    adds the running executions that are parked (every open step waiting) to
    ``statuses`` (or takes only those when ``statuses`` is None)."""
    query = select(WE).order_by(WE.created_at.desc(), WE.execution_id.desc()).limit(limit)
    if after is not None:
        query = query.where(tuple_(WE.created_at, WE.execution_id) < tuple_(*after))
    wanted: list[ColumnElement[bool]] = []
    if statuses is not None:
        wanted.append(WE.status.in_(sorted(s.value for s in statuses)))
    if waiting:
        wanted.append(and_(WE.status == ExecutionStatus.RUNNING.value, WE.parked_at.is_not(None)))
    if wanted:
        query = query.where(or_(*wanted))
    if workflow_id is not None:
        query = query.where(WE.workflow_id == workflow_id)
    if triggered_by is not None:
        query = query.where(WE.triggered_by == triggered_by)
    if created_after is not None:
        query = query.where(WE.created_at >= created_after)
    if created_before is not None:
        query = query.where(WE.created_at < created_before)
    return query


# An execution pending anew (a retry) has had no start re-sent yet: the reconciler's
# start backoff starts again from the time it became pending (its updated_at).
FRESH_PENDING: Mapping[str, Any] = {"start_resent_at": None, "starts_resent": 0}


def _status_timestamps_execution(target: ExecutionStatus, retry: bool) -> dict[str, Any]:
    now = utcnow()
    values: dict[str, Any] = {}
    if target is ExecutionStatus.PENDING:
        values.update(FRESH_PENDING)
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
    execution_id: str | Sequence[str],
    target: ExecutionStatus,
    sources: Collection[ExecutionStatus],
    *,
    retry: bool = False,
    values: Mapping[str, Any] | None = None,
) -> Update:
    """Compare-and-set one execution (or a set of them) from ``sources`` to ``target``."""
    ids = [execution_id] if isinstance(execution_id, str) else list(execution_id)
    return (
        update(WE)
        .where(WE.execution_id.in_(ids), WE.status.in_(sorted(sources)))
        .values(
            status=target.value,
            previous_status=WE.status,
            **_status_timestamps_execution(target, retry),
            **(values or {}),
        )
        .returning(*EXECUTION_RETURNING)
        .execution_options(**_BULK)
    )


# A step queued anew (a retry, a stall recovery, an execution retry) has had no message
# re-sent yet: the reconciler's republish backoff starts again from its queued_at.
FRESH_QUEUE: Mapping[str, Any] = {"republished_at": None, "republishes": 0}


def _status_timestamps_step(target: StepStatus, retry: bool) -> dict[str, Any]:
    now = utcnow()
    values: dict[str, Any] = {}
    if target is StepStatus.QUEUED:
        values["queued_at"] = now
    if target is StepStatus.QUEUED or retry:
        values.update(FRESH_QUEUE)
    elif target is StepStatus.RUNNING:
        values["started_at"] = now
        values["heartbeat_at"] = now
        values["finished_at"] = None
    elif target in STEPS.final:
        values["finished_at"] = now
    if retry:
        values["error"] = None
        # Its failure group goes with its error: a new failure is grouped afresh.
        values["error_group"] = None
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
            {
                "status": target.value,
                "previous_status": SE.status,
                **_status_timestamps_step(target, retry),
                **(values or {}),  # may override a timestamp
            }
        )
        .returning(*STEP_RETURNING)
        .execution_options(**_BULK)
    )


def any_step_of_execution(statuses: Iterable[StepStatus]) -> ColumnElement[bool]:
    """Some step of the execution row being written has one of ``statuses`` (each status
    its own bind: no list re-rendered per execution)."""
    return exists().where(
        SE.execution_id == WE.execution_id,
        SE.status.in_([literal(value) for value in sorted(s.value for s in statuses)]),
    )


def final_outcome() -> ColumnElement[str]:
    """What an execution whose steps are all final ends as: failed if any step failed,
    cancelled if any was cancelled, else succeeded."""
    return case(
        (any_step_of_execution([StepStatus.FAILED]), literal(ExecutionStatus.FAILED.value)),
        (any_step_of_execution([StepStatus.CANCELLED]), literal(ExecutionStatus.CANCELLED.value)),
        else_=literal(ExecutionStatus.SUCCEEDED.value),
    )


def unlocked_executions(execution_ids: Any) -> Select[str]:
    """Those of the executions (ids, or a statement's bind of one) whose row nobody else
    holds, locked for this transaction (FOR NO KEY UPDATE SKIP LOCKED).

    A finish checks only these: whoever else holds an execution's row is ending it (a
    cancel, a time-out, a manual final transition: each updates the row, then cancels
    the open steps, so it may be waiting for the finishing transaction's step row);
    the finish leaves the end to it instead of waiting, and no deadlock cycle forms.
    """
    held = WE.__table__.alias("held")
    ids = held.c.execution_id
    match = (
        ids.in_(list(execution_ids)) if isinstance(execution_ids, list) else ids == execution_ids
    )
    return select(ids).where(match).with_for_update(key_share=True, skip_locked=True)


def finish_executions_if_done(execution_ids: Sequence[str]) -> Update:
    """Finalize the given running executions whose steps are all final: one guarded
    statement over the set, to ``final_outcome()``."""
    return (
        update(WE)
        .where(
            WE.execution_id.in_(unlocked_executions(list(execution_ids))),
            WE.status == ExecutionStatus.RUNNING.value,
            ~any_step_of_execution(STEPS.open),
        )
        .values(status=final_outcome(), previous_status=WE.status, finished_at=utcnow())
        .returning(*EXECUTION_RETURNING, WE.workflow_id, WE.workflow_version)
        .execution_options(**_BULK)
    )


LIVENESS_ROW = 1
DL = DatabaseLiveness


def database_seen(dialect: str, gap_seconds: float) -> Insert:
    """Record that a reconciler pass reached the database now (one row, upserted).

        INSERT INTO database_liveness VALUES (1, clock_timestamp(), clock_timestamp())
        ON CONFLICT (id) DO UPDATE SET
          reachable_since = CASE WHEN last_seen_at < clock_timestamp() - gap
                                 THEN clock_timestamp() ELSE reachable_since END,
          last_seen_at = clock_timestamp()

    A previous sighting older than ``gap_seconds`` means the database was out of reach
    (down, in crash recovery, hung, partitioned) or no pass ran: either way nobody can
    tell whether workers could beat, so ``reachable_since`` starts again. The clock is
    read when the row is written (``clock_timestamp()``), not when the statement began:
    a pass that waited on another pass's lock, or on a hung server, sees the gap it
    waited through. The first pass ever inserts the row: reachable since now.
    """
    now = clock_now()
    insert_row = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(DL)
    statement = insert_row.values(id=LIVENESS_ROW, last_seen_at=now, reachable_since=now)
    return statement.on_conflict_do_update(
        index_elements=[DL.id],
        set_={
            "reachable_since": case(
                (DL.last_seen_at < clock_now(-gap_seconds), now), else_=DL.reachable_since
            ),
            "last_seen_at": now,
        },
    )


def stalled_steps(stall_timeout_seconds: float, gap_seconds: float, limit: int) -> Select[str, str]:
    """Running steps stalled on the evidence of a reachable database (bounded, oldest first).

    A step is stalled when its heartbeat is older than the timeout AND the database has
    been reachable (``database_liveness.reachable_since``, see database_seen) for longer
    than the timeout: ``greatest(heartbeat_at, reachable_since) < now - timeout``. So
    after an outage of any kind every live worker has a whole timeout of reachable
    database to beat again. The liveness row counts only if this pass saw it within
    ``gap_seconds`` of this statement's clock: a pass held up (a hung server) between
    its sighting and this scan judges nothing. No row, or a stale one: nothing stalled.
    """
    cutoff = utcnow(-stall_timeout_seconds)
    reachable_since = (
        select(DL.reachable_since)
        .where(DL.id == LIVENESS_ROW, DL.last_seen_at > utcnow(-gap_seconds))
        .scalar_subquery()
    )
    return (
        select(SE.execution_id, SE.step_name)
        .where(
            SE.status == StepStatus.RUNNING.value,
            SE.heartbeat_at < cutoff,
            reachable_since < cutoff,
        )
        .order_by(SE.heartbeat_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def recover_stalled(
    keys: Sequence[tuple[str, str]], *, requeue: bool, max_recoveries: int
) -> Update:
    """Requeue (attempt + 1, recoveries + 1) the named running steps that may be recovered
    again, or fail those that may not: one statement each way over the whole set.

    Crash recoveries are counted apart from the step's error retries: a deploy or an
    OOM kill does not spend the attempts its retry policy allows. Only this run's count
    (``recoveries - attempt_base``: an execution retry gives every step its recoveries
    back) is held against ``max_recoveries``.
    """
    key_match = _key_match(keys)
    may_recover = SE.recoveries - SE.attempt_base < max_recoveries
    if requeue:
        return (
            update(SE)
            .where(SE.status == StepStatus.RUNNING.value, key_match, may_recover)
            .values(
                status=StepStatus.QUEUED.value,
                previous_status=SE.status,
                attempt=SE.attempt + 1,
                recoveries=SE.recoveries + 1,
                queued_at=utcnow(),
                next_attempt_at=None,
                **FRESH_QUEUE,
                worker=None,
                error={"type": "StepStalled", "message": "no heartbeat within the stall timeout"},
            )
            .returning(*STEP_RETURNING, SE.attempt_base)
            .execution_options(**_BULK)
        )
    return (
        update(SE)
        .where(SE.status == StepStatus.RUNNING.value, key_match, ~may_recover)
        .values(status=StepStatus.FAILED.value, previous_status=SE.status, finished_at=utcnow())
        .returning(*STEP_RETURNING, SE.attempt_base)
        .execution_options(**_BULK)
    )


def set_step_errors() -> Update:
    """Set ``error`` of one step per parameter set (executemany: eid, name, error)."""
    table = cast(Table, SE.__table__)
    return (
        update(table)
        .where(table.c.execution_id == bindparam("eid"), table.c.step_name == bindparam("name"))
        .values(error=bindparam("err"))
    )


def set_execution_results() -> Update:
    """Set ``output_data`` and ``error`` of one execution per parameter set (executemany)."""
    table = cast(Table, WE.__table__)
    return (
        update(table)
        .where(table.c.execution_id == bindparam("eid"))
        .values(output_data=bindparam("out"), error=bindparam("err"))
    )


def steps_of(keys: Sequence[tuple[str, str]]) -> Select[str, str, Any]:
    """Outputs of the named (execution, step) pairs."""
    return select(SE.execution_id, SE.step_name, SE.output_data).where(_key_match(keys))


def failed_steps_of(execution_ids: Sequence[str]) -> Select[str, str, Any]:
    """The failed steps of the given executions, earliest failure first."""
    return (
        select(SE.execution_id, SE.step_name, SE.error)
        .where(SE.execution_id.in_(list(execution_ids)), SE.status == StepStatus.FAILED.value)
        .order_by(SE.finished_at, SE.step_name)
    )


def _execution_is(status: ExecutionStatus) -> ColumnElement[bool]:
    """The execution of the step row being read is in ``status``."""
    return exists().where(WE.execution_id == SE.execution_id, WE.status == status.value)


def _key_match(keys: Sequence[tuple[str, str]]) -> ColumnElement[bool]:
    return tuple_(SE.execution_id, SE.step_name).in_([tuple(k) for k in keys])


def heartbeat(worker: str, keys: Sequence[tuple[str, str]] | None = None) -> Update:
    """Refresh the heartbeat of ``keys``, running steps held by ``worker`` (None: all of
    the worker's running steps; the worker itself always names the steps it holds)."""
    conditions: list[ColumnElement[bool]] = [
        SE.status == StepStatus.RUNNING.value,
        SE.worker == worker,
    ]
    if keys is not None:
        conditions.append(_key_match(keys))
    return update(SE).where(*conditions).values(heartbeat_at=utcnow()).execution_options(**_BULK)


# --- scheduling: admission, claims, reconciler scans --------------------------------


# The class of the per-execution advisory lock that whoever may end an execution's last
# open step takes before the finish check (``core.executions.finish_if_done`` and
# ``finish_executions``): the two-key form, whose key space is apart from the one-key
# workflow admission locks.
FINISH_LOCK = 0x66696E  # "fin"


def lock_executions(execution_ids: Sequence[str]) -> Select[Any]:
    """Take the finish lock of each execution (PostgreSQL, held to commit), in the
    order of the lock keys, so that overlapping passes cannot deadlock on them."""
    ids = values(column("execution_id", String), name="ids").data(
        [(execution_id,) for execution_id in sorted(set(execution_ids))]
    )
    key = func.hashtext(ids.c.execution_id)
    # A volatile function in the select list runs after ORDER BY: in key order.
    return select(func.pg_advisory_xact_lock(literal(FINISH_LOCK), key)).order_by(key)


def lock_workflow(dialect: str, workflow_id: str) -> Select[Any] | None:
    """Serialise admissions of one workflow (PostgreSQL advisory lock, held to commit).

    SQLite needs none: its write transactions begin IMMEDIATE and so are serial.
    """
    if dialect != "postgresql":
        return None
    return select(func.pg_advisory_xact_lock(func.hashtext(workflow_id)))


def queue_roots(execution_ids: Sequence[str]) -> Update:
    """Queue every pending step with no unmet upstream of the given executions."""
    return (
        update(SE)
        .where(
            SE.execution_id.in_(list(execution_ids)),
            SE.status == StepStatus.PENDING.value,
            SE.unmet_deps == 0,
            # Wait nodes enter waiting instead (core.waits.arm_root_waits).
            SE.wait_kind.is_(None),
        )
        .values(status=StepStatus.QUEUED.value, previous_status=SE.status, queued_at=utcnow())
        .returning(*STEP_RETURNING)
        .execution_options(**_BULK)
    )


# The republish delay doubles with each re-send of a step's message, up to this many
# times ``republish_after``: a step waiting behind a deep backlog (its message is in the
# broker) gets a handful of duplicates, not one every pass, and a message the broker
# truly lost is still re-sent within 8 x republish_after (16 min at the defaults).
REPUBLISH_BACKOFF_MAX = 8
_BACKOFF = case(
    *((SE.republishes == n, 2**n) for n in range(REPUBLISH_BACKOFF_MAX.bit_length() - 1)),
    else_=REPUBLISH_BACKOFF_MAX,
)


def due_queued_steps(
    republish_after: float, limit: int
) -> Select[str, str, datetime | None, int, datetime | None]:
    """Queued steps that are due (a retry's backoff elapsed), or whose last message went
    unclaimed for ``republish_after * 2**republishes`` seconds (capped); with what a
    failed publish restores (see restore_unsent).

    The last message is the latest re-send (``republished_at``), else the one the step
    was queued with (``queued_at``).
    """
    now = utcnow()
    last_sent = func.coalesce(SE.republished_at, SE.queued_at)
    return (
        select(
            SE.execution_id,
            SE.step_name,
            SE.republished_at,
            SE.republishes,
            SE.next_attempt_at,
        )
        .where(
            SE.status == StepStatus.QUEUED.value,
            (SE.next_attempt_at.is_(None) & (last_sent < utcnow(-republish_after * _BACKOFF)))
            | (SE.next_attempt_at <= now),
            # Only a running execution's step can be claimed: never re-send the others.
            _execution_is(ExecutionStatus.RUNNING),
        )
        .order_by(SE.queued_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def republish(keys: Sequence[tuple[str, str]]) -> Update:
    """queued -> queued for steps about to be published again.

    ``queued_at`` stays when the step was queued (the queue-wait metric reads it); the
    time of this message is ``republished_at``. A due retry's first message is no
    re-send: only a step whose message went unclaimed counts in ``republishes``.
    """
    return (
        update(SE)
        .where(SE.status == StepStatus.QUEUED.value, _key_match(keys))
        .values(
            previous_status=SE.status,
            republished_at=utcnow(),
            republishes=case(
                (SE.next_attempt_at.is_(None), SE.republishes + 1), else_=SE.republishes
            ),
            next_attempt_at=None,
        )
        .returning(*STEP_RETURNING, SE.republishes)
        .execution_options(**_BULK)
    )


def restore_unsent() -> Update:
    """Undo, for one step per parameter set (executemany), a re-send that was committed
    but whose publish failed: the step is due again at the next pass, not after a
    backoff, since no message was sent.

    Parameters: ``eid``, ``name``, ``att`` (the attempt), ``sent_count`` (``republishes`` as the
    pass left it: the guard that nothing moved the step since), ``prev_at``,
    ``prev_count``, ``prev_next`` (as they were before), and ``due_now`` (no earlier
    state to restore: a stall-recovered step's first message; it is marked due now).
    Zero rows for a step claimed or sent again meanwhile.
    """
    table = cast(Table, SE.__table__)
    return (
        update(table)
        .where(
            table.c.execution_id == bindparam("eid"),
            table.c.step_name == bindparam("name"),
            table.c.status == StepStatus.QUEUED.value,
            table.c.attempt == bindparam("att"),
            table.c.republishes == bindparam("sent_count"),
            table.c.next_attempt_at.is_(None),
        )
        .values(
            republished_at=bindparam("prev_at", type_=table.c.republished_at.type),
            republishes=bindparam("prev_count"),
            next_attempt_at=case(
                (bindparam("due_now", type_=Boolean()), utcnow()),
                else_=bindparam("prev_next", type_=table.c.next_attempt_at.type),
            ),
        )
    )


# The start re-send delay doubles as the republish delay does (REPUBLISH_BACKOFF_MAX): an
# execution pending behind a deep backlog or a concurrency limit (its start message is
# in the broker, or was taken and left it waiting) gets a handful of duplicate starts,
# not one every period; a start the broker truly lost is still re-sent within
# 8 x start_after (4 min at the defaults).
START_BACKOFF_MAX = 8
_START_BACKOFF = case(
    *((WE.starts_resent == n, 2**n) for n in range(START_BACKOFF_MAX.bit_length() - 1)),
    else_=START_BACKOFF_MAX,
)


def due_starts(older_than: float, limit: int) -> Select[str, str, int, datetime | None, int]:
    """Pending executions (open debounce windows aside) whose last start message is
    older than ``older_than * 2**starts_resent`` seconds (capped; the message may be
    lost, or still queued behind other work), highest priority and oldest first; with
    what a failed publish restores (see restore_unsent_starts).

    The last start message is the latest re-send (``start_resent_at``), else the one
    sent when the execution became pending (its ``updated_at``: created or retried).
    """
    last_sent = func.coalesce(WE.start_resent_at, WE.updated_at)
    return (
        select(WE.execution_id, WE.workflow_id, WE.priority, WE.start_resent_at, WE.starts_resent)
        .where(
            WE.status == ExecutionStatus.PENDING.value,
            last_sent < utcnow(-older_than * _START_BACKOFF),
            # An open debounce window was sent no start: the waker sends it when due.
            WE.debounce_key.is_(None),
        )
        .order_by(WE.priority.desc(), WE.created_at, WE.execution_id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def resend_starts(execution_ids: Sequence[str]) -> Update:
    """Count a start re-send on pending executions about to get their start message
    again. ``updated_at`` is left as it was: it keeps saying when the execution last
    changed, and a restored re-send is due from it again (restore_unsent_starts)."""
    return (
        update(WE)
        .where(WE.execution_id.in_(list(execution_ids)), WE.status == ExecutionStatus.PENDING.value)
        .values(
            start_resent_at=utcnow(), starts_resent=WE.starts_resent + 1, updated_at=WE.updated_at
        )
        .returning(WE.execution_id, WE.workflow_id, WE.priority, WE.starts_resent)
        .execution_options(**_BULK)
    )


def waiting_workflows(older_than: float, limit: int) -> Select[str]:
    """Workflows with an execution pending for more than ``older_than`` seconds (open
    debounce windows aside: they are not waiting for a slot)."""
    return (
        select(WE.workflow_id)
        .where(
            WE.status == ExecutionStatus.PENDING.value,
            WE.updated_at < utcnow(-older_than),
            WE.debounce_key.is_(None),
        )
        .distinct()
        .order_by(WE.workflow_id)
        .limit(limit)
    )


def restore_unsent_starts() -> Update:
    """Undo, for one execution per parameter set (executemany), a start re-send that was
    committed but whose publish failed: it is due again at the next pass, not after a
    backoff, since no message was sent.

    Parameters: ``eid``, ``sent_count`` (``starts_resent`` as the pass left it: the guard
    that nothing moved the execution since), ``prev_at`` and ``prev_count`` (as they were
    before). Zero rows for an execution admitted, retried or sent again meanwhile.
    """
    table = cast(Table, WE.__table__)
    return (
        update(table)
        .where(
            table.c.execution_id == bindparam("eid"),
            table.c.status == ExecutionStatus.PENDING.value,
            table.c.starts_resent == bindparam("sent_count"),
        )
        .values(
            start_resent_at=bindparam("prev_at", type_=table.c.start_resent_at.type),
            starts_resent=bindparam("prev_count"),
            updated_at=table.c.updated_at,
        )
    )


def overdue_executions(limit: int) -> Select[str]:
    """Open executions past their deadline (served by the partial deadline index)."""
    return (
        select(WE.execution_id)
        .where(
            WE.deadline_at.is_not(None),
            WE.status.in_([ExecutionStatus.PENDING.value, ExecutionStatus.RUNNING.value]),
            WE.deadline_at < utcnow(),
        )
        .order_by(WE.deadline_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def finishable_executions(limit: int) -> Select[str]:
    """Running executions none of whose steps is still open."""
    open_step = exists().where(
        SE.execution_id == WE.execution_id, SE.status.in_(sorted(s.value for s in STEPS.open))
    )
    return (
        select(WE.execution_id)
        .where(WE.status == ExecutionStatus.RUNNING.value, ~open_step)
        .limit(limit)
    )


def cancel_steps_of(execution_ids: Sequence[str]) -> Update:
    """Cancel every open step of the given executions in one statement."""
    return (
        update(SE)
        .where(
            SE.execution_id.in_(list(execution_ids)),
            SE.status.in_(sorted(STEPS.sources_of(StepStatus.CANCELLED))),
        )
        .values(status=StepStatus.CANCELLED.value, previous_status=SE.status, finished_at=utcnow())
        .returning(*STEP_RETURNING)
        .execution_options(**_BULK)
    )


def late_output(execution_id: str, step_name: str, attempt: int, output: Any) -> Update:
    """Store the output of a cancelled step's attempt that completed anyway."""
    return (
        update(SE)
        .where(
            SE.execution_id == execution_id,
            SE.step_name == step_name,
            SE.attempt == attempt,
            SE.status == StepStatus.CANCELLED.value,
        )
        .values(output_data=output)
        .execution_options(**_BULK)
    )


def execution_routes(execution_ids: Sequence[str]) -> Select[str, str, int, int, str | None]:
    """Workflow, version, priority and shape of executions."""
    return select(
        WE.execution_id, WE.workflow_id, WE.workflow_version, WE.priority, WE.shape_hash
    ).where(WE.execution_id.in_(list(execution_ids)))


# --- child executions (core.children) -------------------------------------------------


def insert_child_execution(dialect: str, row: Mapping[str, Any]) -> Insert:
    """Insert a child execution whose id derives from its parent step and attempt: a
    replay of the transaction that starts it inserts nothing (ON CONFLICT DO NOTHING)
    and RETURNING is empty."""
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        dialect_insert(WE)
        .values(dict(row))
        .on_conflict_do_nothing(index_elements=[WE.execution_id])
        .returning(WE.execution_id)
    )


def select_child(execution_id: str) -> Select[Any]:
    """A child execution's status and result (a replayed start finds it)."""
    return select(WE.status, WE.output_data, WE.error, WE.workflow_id).where(
        WE.execution_id == execution_id
    )


_CHILD_COLUMNS = (
    WE.execution_id,
    WE.workflow_id,
    WE.status,
    WE.output_data,
    WE.error,
    WE.parent_execution_id,
    WE.parent_step_name,
    WE.parent_attempt,
    WE.parent_item_index,
)


def unwoken_children(execution_ids: Sequence[str]) -> Select[Any]:
    """Those of the given (final) executions that are children whose parent was not told
    of their end yet: by primary key, so an execution that is no child costs one probe."""
    return select(*_CHILD_COLUMNS).where(
        WE.execution_id.in_(list(execution_ids)),
        WE.parent_execution_id.is_not(None),
        WE.parent_woken_at.is_(None),
        WE.status.in_(sorted(s.value for s in EXECUTIONS.final)),
    )


def unwoken_children_due(limit: int) -> Select[Any]:
    """The reconciler's safety net: up to ``limit`` final children whose parent was not
    told (a finish that skipped a locked parent step, a process that did not know the
    parent's workflow). Exactly the predicate of ix_workflow_executions_unwoken_child."""
    return (
        select(*_CHILD_COLUMNS)
        .where(text(UNWOKEN_CHILD))
        .order_by(WE.finished_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def parent_step(execution_id: str, step_name: str) -> Select[str, int, int, str | None, str | None]:
    """A parent's child step, locked (PostgreSQL) unless someone holds it: whoever holds
    a waiting step's row is ending it (a cancel or time-out of the parent cancels its
    steps, then its children: waiting for it here would close a deadlock cycle with the
    child's finish). None then, and the safety net looks again."""
    return (
        select(SE.status, SE.attempt, SE.recoveries, SE.child_execution_id, SE.wait_kind)
        .where(SE.execution_id == execution_id, SE.step_name == step_name)
        .with_for_update(skip_locked=True)
    )


def mark_parent_woken(execution_ids: Sequence[str]) -> Update:
    """Record that the parents of these children were told of their end."""
    return (
        update(WE)
        .where(WE.execution_id.in_(list(execution_ids)), WE.parent_woken_at.is_(None))
        .values(parent_woken_at=utcnow())
        .execution_options(**_BULK)
    )


def _tree_below(execution_ids: Sequence[str]) -> Any:
    """Every execution below the given ones (children, their children, ...), walking
    ix_workflow_executions_parent: a recursive CTE of execution ids."""
    top = WE.__table__.alias("top")
    below = WE.__table__.alias("below")
    tree = (
        select(top.c.execution_id)
        .where(top.c.parent_execution_id.in_(list(execution_ids)))
        .cte("tree", recursive=True)
    )
    return tree.union_all(
        select(below.c.execution_id).where(below.c.parent_execution_id == tree.c.execution_id)
    )


def descendants_of(execution_ids: Sequence[str]) -> Select[str]:
    """The ids of every execution below the given ones."""
    tree = _tree_below(execution_ids)
    return select(tree.c.execution_id)


def cancel_executions(execution_ids: Sequence[str]) -> Update:
    """Cancel the open ones of the given executions (a cascade from their ended
    ancestor, which has no step left to wake: their parent_woken_at is set too)."""
    sources = sorted(s.value for s in EXECUTIONS.sources_of(ExecutionStatus.CANCELLED))
    return (
        update(WE)
        .where(WE.execution_id.in_(list(execution_ids)), WE.status.in_(sources))
        .values(
            status=ExecutionStatus.CANCELLED.value,
            previous_status=WE.status,
            finished_at=utcnow(),
            parent_woken_at=utcnow(),
        )
        .returning(*EXECUTION_RETURNING, WE.workflow_id)
        .execution_options(**_BULK)
    )


def running_tasks_of_tree(execution_id: str) -> Select[str | None]:
    """The Celery task ids of the running steps of an execution and its descendants."""
    tree = _tree_below([execution_id])
    return select(SE.celery_task_id).where(
        or_(SE.execution_id == execution_id, SE.execution_id.in_(select(tree.c.execution_id))),
        SE.status == StepStatus.RUNNING.value,
        SE.celery_task_id.is_not(None),
    )


def open_children_of_step(execution_id: str, step_name: str) -> Select[str]:
    """The open child executions a step of ``execution_id`` started (a child map's
    items): ix_workflow_executions_parent."""
    return select(WE.execution_id).where(
        WE.parent_execution_id == execution_id,
        WE.parent_step_name == step_name,
        WE.status.in_(sorted(s.value for s in EXECUTIONS.open)),
    )


# --- bulk creation on PostgreSQL: one statement per table, one array per column -------
#
# enqueue_many's rows as arrays (``unnest``): constant text psycopg prepares once, however
# many executions, and no per-row parameters to bind or dicts to build; the step rows
# of executions of one workflow are the cross product of the new ids and its steps.

INSERT_EXECUTIONS_PG = """
INSERT INTO workflow_executions (execution_id, workflow_id, workflow_version, input_data,
       status, attempt, priority, idempotency_key, idempotency_scope, triggered_by,
       deadline_at, shape_hash, starts_resent, depth, created_at, updated_at)
SELECT t.id, t.wf, t.ver, CAST(t.input AS jsonb), 'pending', 1, t.prio, t.key, t.scope,
       t.by, t.deadline, t.shape, 0, 0, statement_timestamp(), statement_timestamp()
  FROM unnest(CAST(:ids AS varchar[]), CAST(:wfs AS varchar[]), CAST(:vers AS int[]),
              CAST(:inputs AS text[]), CAST(:prios AS int[]), CAST(:keys AS varchar[]),
              CAST(:scopes AS varchar[]), CAST(:bys AS varchar[]),
              CAST(:deadlines AS timestamptz[]), CAST(:shapes AS varchar[]))
       WITH ORDINALITY AS t(id, wf, ver, input, prio, key, scope, by, deadline, shape, n)
 ORDER BY t.n
ON CONFLICT (idempotency_scope, idempotency_key) DO NOTHING
RETURNING execution_id
"""

INSERT_STEPS_PG = """
INSERT INTO execution_steps (execution_id, step_name, status, attempt, max_attempts,
       recoveries, attempt_base, unmet_deps, republishes, wait_kind, created_at, updated_at)
SELECT e.id, x.name, 'pending', 1, x.most, 0, 0, x.unmet, 0, x.kind,
       statement_timestamp(), statement_timestamp()
  FROM unnest(CAST(:ids AS varchar[])) AS e(id)
 CROSS JOIN unnest(CAST(:names AS varchar[]), CAST(:unmet AS int[]), CAST(:most AS int[]),
                   CAST(:kinds AS varchar[])) AS x(name, unmet, most, kind)
"""

INSERT_CREATED_EVENTS_PG = """
INSERT INTO execution_events (execution_id, to_status, attempt, reason, created_at)
SELECT e.id, 'pending', 1, 'created', statement_timestamp()
  FROM unnest(CAST(:ids AS varchar[])) AS e(id)
"""


def set_limit_keys() -> Update:
    """Record the key each new execution takes turns under (``core.limits``): run with
    one parameter set per execution (``eid``, ``limit``)."""
    table = cast(Table, WorkflowExecution.__table__)
    return (
        update(table)
        .where(table.c.execution_id == bindparam("eid"))
        .values(limit_key=bindparam("limit"))
    )
