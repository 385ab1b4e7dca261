"""Per-key concurrency and rate limits: admission, release of slots, promotion of waiters.

A step behind limits (``@wf.step(concurrency=..., rate_limit=...)``) is admitted when it
is released, in the releasing transaction (``arm_gate``, called where waits are armed):
every key's row in ``flow_keys`` is locked (in key order, so two admissions cannot
deadlock), and the step either takes a slot under each concurrency key (a ``key_slots``
row) and spends its rate, going waiting -> queued to be published, or stays ``waiting``
with the refusing key in ``wait_key`` and, for a rate or a pause, the earliest moment it
may start in ``wake_at`` (the waker tries again then). No message exists for a step that
cannot start.

A key's running count is never stored: it is the slots whose holder still holds (a step
queued or running at the slot's attempt; an execution running and not parked), counted
under the key's lock. So a step that ends in any way (success, failure, cancel, timeout,
a retry's backoff, a stall recovery) frees its slot in the transaction that records the
end, whichever code path wrote it. The slot rows are deleted by the ends that know them
(``free_step``, which also promotes the key's next waiters) and by the reconciler's
``sweep`` (which logs each as drift, and admits what waits behind a key with room).

Executions of a workflow with limits (``Workflow(concurrency=..., rate_limit=...,
max_concurrency=...)``) are admitted the same way at their start (``admit_executions``),
round robin between the keys of the workflow's pending executions.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Literal, cast

from sqlalchemy import (
    Connection,
    Integer,
    Select,
    String,
    Table,
    Update,
    and_,
    bindparam,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from core.errors import InputValidationError
from core.models import ExecutionEvent, FlowKey, KeySlot, StepExecution, WorkflowExecution
from core.outcomes import Route, TransitionResult, WaitOutcome
from core.sql import clock_now, utcnow
from core.states import ExecutionStatus, StepStatus
from core.step_statements import event_row, hot_path
from core.wait_statements import STEP_COLUMNS
from core.workflows import (
    WHOLE_WORKFLOW_VALUE,
    Concurrency,
    RateLimit,
    Step,
    Workflow,
    whole_workflow,
)

log = logging.getLogger(__name__)

FK = cast(Table, FlowKey.__table__)
KS = cast(Table, KeySlot.__table__)
SE = cast(Table, StepExecution.__table__)
WE = cast(Table, WorkflowExecution.__table__)

KEY = "key"
WAITING = StepStatus.WAITING.value
# A step holds its slots while queued or running at the slot's attempt.
HOLDING = (StepStatus.QUEUED.value, StepStatus.RUNNING.value)
# Each its own bind parameter: a list would be an "expanding" one, its SQL text rendered
# again on every execution (see core.step_statements._status_in).
HOLDS = [literal(status) for status in HOLDING]

DefinitionOf = Callable[[str, int], Workflow | None]


class KeyFailed(Exception):
    """A limit's key function raised, or returned nothing usable."""


@dataclass(frozen=True)
class KeyLimit:
    """One limit of one step or execution, with its key's stored name resolved."""

    key: str
    limit: Concurrency | RateLimit
    cost: int = 1


@dataclass(frozen=True)
class Admitted:
    """An admission: its slots taken and rates spent at ``at`` (the database's clock,
    read once the keys were locked), the time its history records."""

    at: datetime


@dataclass(frozen=True)
class Refusal:
    """Why an admission was refused: the key, when to try again (None: when a slot under
    it frees), and when it was judged (as ``Admitted.at``)."""

    key: str
    wake_at: datetime | None
    why: str  # "concurrency", "rate" or "paused"
    at: datetime


def key_name(
    workflow: Workflow, step: Step | None, limit: Concurrency | RateLimit, data: Any
) -> str:
    """The stored name of ``limit``'s key for an execution whose parsed input is ``data``:
    text keys as given (shared by every workflow and step naming them), a function's
    value scoped to its workflow (and step): ``"reports:tenant-7"``, ``"reports.load:7"``."""
    if isinstance(limit.key, str):
        return limit.key
    try:
        value = limit.key(data)
    except Exception as error:
        raise KeyFailed(f"{type(error).__name__}: {error}") from error
    if value is None or (isinstance(value, str) and not value):
        raise KeyFailed(f"the key function returned {value!r}")
    scope = workflow.name if step is None else f"{workflow.name}.{step.name}"
    name = f"{scope}:{value}"
    return name[:255]


def limits_of(workflow: Workflow, step: Step | None, input_data: Any) -> list[KeyLimit]:
    """The limits of ``step`` (None: of the execution) with their keys resolved."""
    limits = workflow.limits if step is None else step.limits
    if not limits:
        return []
    data = workflow.parse_input(input_data)
    found: list[KeyLimit] = []
    for limit in limits:
        cost = 1
        if isinstance(limit, RateLimit):
            cost = limit.cost(data) if callable(limit.cost) else limit.cost
            if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
                raise KeyFailed(f"the cost function returned {cost!r}, not an int of 1 or more")
        found.append(KeyLimit(key_name(workflow, step, limit, data), limit, cost))
    return found


# --- statements ------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitStatements:
    lock: Select[Any]
    holders: Select[Any]
    take_slot: Any
    spend: Update
    admitted_at: Update
    to_queued: Update
    hold: Update
    free_step: Any
    waiters: Select[Any]
    any_waiter: Select[Any]
    clock: Select[Any]
    stale_steps: Any
    stale_executions: Any
    waiting_keys: Select[Any]
    pause: Any
    stale_of: Any


@cache
def statements(dialect: str) -> LimitStatements:
    """The statements of admission and release for ``dialect``, built once."""
    postgres = dialect == "postgresql"
    key = bindparam("k", type_=String)
    now = utcnow()
    # Every key's row, locked in key order (rows are created first: see ensure_keys).
    lock = select(FK).where(FK.c.key.in_(bindparam("keys", expanding=True))).order_by(FK.c.key)
    if postgres:
        lock = lock.with_for_update(of=FK)
    holders = select(_running(key).label("running"))
    insert_ = postgresql.insert if postgres else sqlite.insert
    take_slot = (
        insert_(KS)
        .on_conflict_do_update(
            index_elements=[KS.c.execution_id, KS.c.step_name, KS.c.key],
            set_={"attempt": bindparam("att", type_=Integer), "created_at": now},
        )
        .values(
            execution_id=bindparam("eid", type_=String),
            step_name=bindparam("step", type_=String),
            key=key,
            attempt=bindparam("att", type_=Integer),
            created_at=now,
        )
    )
    spend = (
        update(FK)
        .where(FK.c.key == key)
        .values(
            rate_tat=bindparam("tat", type_=FK.c.rate_tat.type),
            rate_interval=bindparam("interval"),
            rate_burst=bindparam("burst"),
            last_admitted_at=now,
            updated_at=now,
        )
    )
    admitted_at = (
        update(FK)
        .where(FK.c.key == key)
        .values(
            concurrency_limit=bindparam("limit", type_=Integer),
            last_admitted_at=now,
            updated_at=now,
        )
    )
    waiting_here = (
        SE.c.execution_id == bindparam("eid", type_=String),
        SE.c.step_name == bindparam("step", type_=String),
        SE.c.attempt == bindparam("att", type_=Integer),
        SE.c.status == WAITING,
    )
    returning = STEP_COLUMNS  # what an event row of a step transition needs
    to_queued = (
        update(SE)
        .where(*waiting_here)
        .values(
            status=StepStatus.QUEUED.value,
            previous_status=SE.c.status,
            queued_at=now,
            wake_at=None,
            wait_key=None,
            next_attempt_at=None,
            updated_at=now,
        )
        .returning(*returning)
    )
    hold = (
        update(SE)
        .where(*waiting_here)
        .values(
            previous_status=SE.c.status,
            wait_key=key,
            wake_at=bindparam("wake_at", type_=SE.c.wake_at.type),
            updated_at=now,
        )
        .returning(*returning)
    )
    free_step = (
        delete(KS)
        .where(
            KS.c.execution_id == bindparam("eid", type_=String),
            KS.c.step_name == bindparam("step", type_=String),
        )
        .returning(KS.c.key)
    )
    # Promotion: the steps waiting for a key's slot (no wake time: a rate's or a pause's
    # waiters are the waker's), by priority then arrival.
    waiters = (
        select(SE.c.execution_id, SE.c.step_name, SE.c.attempt)
        .select_from(SE.join(WE, WE.c.execution_id == SE.c.execution_id))
        .where(SE.c.status == WAITING, SE.c.wait_kind == KEY, SE.c.wait_key == key)
        .order_by(WE.c.priority.desc(), SE.c.waiting_since, SE.c.execution_id, SE.c.step_name)
        .limit(bindparam("limit", type_=Integer))
    )
    if postgres:
        waiters = waiters.with_for_update(of=SE, skip_locked=True)
    any_waiter = (
        select(SE.c.execution_id)
        .where(SE.c.status == WAITING, SE.c.wait_kind == KEY, SE.c.wait_key == key)
        .limit(1)
    )
    holds = and_(
        SE.c.execution_id == KS.c.execution_id,
        SE.c.step_name == KS.c.step_name,
        SE.c.attempt == KS.c.attempt,
        SE.c.status.in_(HOLDS),
    )
    stale_steps = (
        delete(KS)
        .where(KS.c.step_name != "", ~exists().where(holds))
        .returning(KS.c.key, KS.c.execution_id, KS.c.step_name)
    )
    stale_executions = (
        delete(KS)
        .where(
            KS.c.step_name == "",
            ~exists().where(
                WE.c.execution_id == KS.c.execution_id,
                WE.c.status == ExecutionStatus.RUNNING.value,
            ),
        )
        .returning(KS.c.key, KS.c.execution_id, KS.c.step_name)
    )
    execution_running = exists().where(
        WE.c.execution_id == KS.c.execution_id,
        WE.c.status == ExecutionStatus.RUNNING.value,
    )
    stale_of = (
        delete(KS)
        .where(
            KS.c.execution_id.in_(bindparam("eids", expanding=True)),
            or_(
                and_(KS.c.step_name != "", ~exists().where(holds)),
                and_(KS.c.step_name == "", ~execution_running),
            ),
        )
        .returning(KS.c.key)
    )
    # The keys with steps waiting for a slot and a slot free: what a missed promotion
    # left (the others wait for an end to free one).
    limit_of = select(FK.c.concurrency_limit).where(FK.c.key == SE.c.wait_key).scalar_subquery()
    waiting_keys = (
        select(SE.c.wait_key)
        .where(SE.c.status == WAITING, SE.c.wait_kind == KEY, SE.c.wake_at.is_(None))
        .group_by(SE.c.wait_key)
        .having(_running(SE.c.wait_key) < func.coalesce(limit_of, 1))
        .limit(bindparam("limit", type_=Integer))
    )
    pause = insert_(FK).values(key=key, paused_until=bindparam("until"), updated_at=now)
    pause = pause.on_conflict_do_update(
        index_elements=[FK.c.key],
        set_={"paused_until": bindparam("until"), "updated_at": now},
    )
    return LimitStatements(
        lock=lock,
        holders=holders,
        take_slot=take_slot,
        spend=spend,
        admitted_at=admitted_at,
        to_queued=to_queued,
        hold=hold,
        free_step=free_step,
        waiters=waiters,
        any_waiter=any_waiter,
        clock=select(clock_now()),
        stale_steps=stale_steps,
        stale_executions=stale_executions,
        waiting_keys=waiting_keys,
        pause=pause,
        stale_of=stale_of,
    )


def _running(key: Any) -> Any:
    """How many hold a slot under ``key`` (a bound name or a column): the slots whose
    holder still holds (a step queued or running at the slot's attempt; an execution
    running and not parked)."""
    # Aliased: the callers' own statements name these tables (no correlation with them).
    slot = KS.alias("slot")
    step = SE.alias("held_step")
    steps = (
        select(func.count())
        .select_from(
            slot.join(
                step,
                and_(
                    step.c.execution_id == slot.c.execution_id,
                    step.c.step_name == slot.c.step_name,
                    step.c.attempt == slot.c.attempt,
                ),
            )
        )
        .where(slot.c.key == key, slot.c.step_name != "", step.c.status.in_(HOLDS))
        .scalar_subquery()
    )
    execution_slot = KS.alias("execution_slot")
    running_execution = WE.alias("running_execution")
    executions = (
        select(func.count())
        .select_from(
            execution_slot.join(
                running_execution,
                running_execution.c.execution_id == execution_slot.c.execution_id,
            )
        )
        .where(
            execution_slot.c.key == key,
            execution_slot.c.step_name == "",
            running_execution.c.status == ExecutionStatus.RUNNING.value,
            running_execution.c.parked_at.is_(None),
        )
        .scalar_subquery()
    )
    return steps + executions


def ensure_keys(conn: Connection, keys: Sequence[str]) -> None:
    """Create the rows of ``keys`` that do not exist yet (concurrent creators: one wins,
    the others do nothing)."""
    postgres = conn.dialect.name == "postgresql"
    insert_ = postgresql.insert if postgres else sqlite.insert
    conn.execute(
        insert_(FK).on_conflict_do_nothing(index_elements=[FK.c.key]),
        [{"key": k, "updated_at": datetime.now(UTC)} for k in keys],
    )


# --- admission ---------------------------------------------------------------------------


def try_admit(
    conn: Connection, execution_id: str, step_name: str, attempt: int, limits: Sequence[KeyLimit]
) -> Admitted | Refusal:
    """Admit one holder (a step attempt, or an execution with ``step_name`` "") under all
    of ``limits`` at once, or none of them: Admitted (its slots taken, its rates spent),
    or the refusal. The keys' rows stay locked to commit."""
    st = statements(conn.dialect.name)
    keys = sorted({limit.key for limit in limits})
    rows = {row.key: row for row in conn.execute(st.lock, {"keys": keys})}
    if len(rows) < len(keys):  # a key's first admission: its row, then all locked again
        ensure_keys(conn, [k for k in keys if k not in rows])
        rows = {row.key: row for row in conn.execute(st.lock, {"keys": keys})}
    refusals: list[Refusal] = []
    spends: dict[str, dict[str, Any]] = {}
    # The clock once the locks are held: a lock statement's own time is when it began
    # waiting, and a rate judged on it would be judged early.
    now: datetime = conn.execute(st.clock).scalar_one()
    for limit in limits:
        row = rows[limit.key]
        if row.paused_until is not None and row.paused_until > now:
            refusals.append(Refusal(limit.key, row.paused_until, "paused", now))
            continue
        spec = limit.limit
        if isinstance(spec, Concurrency):
            running = conn.execute(st.holders, {"k": limit.key}).scalar_one()
            if running >= spec.limit:
                refusals.append(Refusal(limit.key, None, "concurrency", now))
            continue
        # GCRA: the theoretical arrival time moves on by cost * interval per start; a
        # start is allowed while it stays within burst * interval of now.
        interval = spec.interval
        previous = spends.get(limit.key, {}).get("tat") or row.rate_tat or now
        tat = max(previous, now) + timedelta(seconds=limit.cost * interval)
        allowed_at = tat - timedelta(seconds=spec.burst * interval)
        if allowed_at > now:
            refusals.append(Refusal(limit.key, allowed_at, "rate", now))
            continue
        spends[limit.key] = {
            "k": limit.key,
            "tat": tat,
            "interval": interval,
            "burst": spec.burst,
        }
    if refusals:
        # A slot frees when it frees; a rate or a pause has a time: wait for the slot first.
        slot = [r for r in refusals if r.wake_at is None]
        if slot:
            return slot[0]
        return max(refusals, key=lambda r: cast(datetime, r.wake_at))
    for limit in limits:
        if isinstance(limit.limit, Concurrency):
            conn.execute(
                st.take_slot,
                {"eid": execution_id, "step": step_name, "k": limit.key, "att": attempt},
            )
            if rows[limit.key].concurrency_limit != limit.limit.limit:
                # The limit in force, for the surfaces (and promotion's room).
                conn.execute(st.admitted_at, {"k": limit.key, "limit": limit.limit.limit})
    for spend in spends.values():
        conn.execute(st.spend, spend)
    return Admitted(now)


def arm_gate(
    conn: Connection,
    execution_id: str,
    workflow: Workflow,
    step: Step,
    attempt: int,
    input_data: Any,
    route: Route,
    outcome: WaitOutcome,
) -> None:
    """Admit a released step behind limits (waiting at ``attempt``): queued, to be
    published (``outcome.queued``), or left waiting for the key that refused it.
    Raises KeyFailed when a key or cost function fails (the step then fails)."""
    limits = limits_of(workflow, step, input_data)
    decision = try_admit(conn, execution_id, step.name, attempt, limits)
    _record(conn, execution_id, step.name, attempt, decision, route, outcome, workflow.name)


def _record(
    conn: Connection,
    execution_id: str,
    step_name: str,
    attempt: int,
    decision: Admitted | Refusal,
    route: Route,
    outcome: WaitOutcome,
    workflow_name: str,
) -> bool:
    """Write an admission's result on the waiting step: queued, or held for the refusing
    key, each with its event. Whether it was queued."""
    st = statements(conn.dialect.name)
    sql_ = hot_path(conn.dialect.name)
    where = {"eid": execution_id, "step": step_name, "att": attempt}
    if isinstance(decision, Admitted):
        row = conn.execute(st.to_queued, where).first()
        if row is None:
            return False
        conn.execute(sql_.events, [{**event_row(row, "admitted"), "created_at": decision.at}])
        outcome.queued.append((execution_id, step_name))
        outcome.routes[execution_id] = route
        outcome.limited.append((workflow_name, "", "admitted"))
        return True
    refusal = decision
    row = conn.execute(st.hold, {**where, "k": refusal.key, "wake_at": refusal.wake_at}).first()
    if row is not None:
        outcome.hint(refusal.wake_at)
        reason = {
            "concurrency": f"held: key {refusal.key} has no free slot",
            "rate": f"held: key {refusal.key} is rate limited",
            "paused": f"held: key {refusal.key} is paused",
        }[refusal.why]
        conn.execute(sql_.events, [event_row(row, reason)])
        outcome.limited.append((workflow_name, refusal.key, refusal.why))
    return False


# --- executions ----------------------------------------------------------------------------

# How many pending executions of a workflow one admission looks at: enough to find, behind
# a busy key's backlog, the first execution of every other key (round robin).
ADMISSION_WINDOW = 500


@dataclass
class ExecutionAdmission:
    """What admitting a limited workflow's pending executions did: those started (their
    transition rows), those cancelled by ``on_limit``, and when a rate-limited one may
    start (None: none was)."""

    started: list[Any]
    cancelled: list[str]
    retry_at: datetime | None = None


def admit_executions(conn: Connection, workflow: Workflow) -> ExecutionAdmission:
    """Start the workflow's pending executions its limits allow, round robin between
    their keys (one busy tenant's backlog cannot starve another's first execution), each
    key in priority then arrival order. The caller holds the workflow's admission lock.

    Each admitted execution takes its slots and goes pending -> running at once, so the
    next candidate's count includes it. A concurrency refusal with ``on_limit="queue"``
    leaves it pending; ``"cancel_newest"`` cancels it; ``"cancel_in_progress"`` cancels
    the oldest running execution under the key and admits it in its place."""
    from core import statements as sql
    from core.executions import cancel_execution
    from core.transitions import event_rows, transition_of

    result = ExecutionAdmission(started=[], cancelled=[])
    st = statements(conn.dialect.name)
    window = ADMISSION_WINDOW
    whole = next((lim for lim in workflow.limits if lim.key is whole_workflow), None)
    if isinstance(whole, Concurrency):
        # max_concurrency: no candidate may start while the workflow's own key is full
        # (its key is this workflow's alone: the caller's lock makes the count exact);
        # with no other limit, the window is the room left.
        key = f"{workflow.name}:{WHOLE_WORKFLOW_VALUE}"
        room = whole.limit - int(conn.execute(st.holders, {"k": key}).scalar_one())
        if room <= 0:
            return result
        if len(workflow.limits) == 1:
            window = room
    by_key = any(
        not isinstance(lim.key, str) and lim.key is not whole_workflow for lim in workflow.limits
    )
    rows = conn.execute(pending_of(by_key), {"wf": workflow.name, "limit": window}).all()
    queues: dict[str, list[tuple[Any, list[KeyLimit]]]] = {}
    for row in rows:
        try:
            limits = limits_of(workflow, None, row.input_data)
        except KeyFailed as error:
            _fail_pending(conn, row.execution_id, error)
            continue
        queues.setdefault(_partition(limits), []).append((row, limits))
    running = frozenset({ExecutionStatus.PENDING})
    # Keys that refused in this pass stay refused to its end (it holds their locks, and
    # holders only grow): a candidate under one is not asked again.
    blocked: set[str] = set()
    for row, limits in _round_robin(list(queues.values())):
        if any(kl.key in blocked for kl in limits):
            if whole is not None and f"{workflow.name}:{WHOLE_WORKFLOW_VALUE}" in blocked:
                break
            continue
        while True:
            refusal = try_admit(conn, row.execution_id, "", row.attempt, limits)
            if isinstance(refusal, Admitted):
                start = sql.transition_execution(row.execution_id, ExecutionStatus.RUNNING, running)
                moved = conn.execute(start).all()
                result.started += moved
                break
            if refusal.wake_at is not None:
                if result.retry_at is None or refusal.wake_at < result.retry_at:
                    result.retry_at = refusal.wake_at
                blocked.add(refusal.key)
                break
            spec = next(kl.limit for kl in limits if kl.key == refusal.key)
            on_limit = spec.on_limit if isinstance(spec, Concurrency) else "queue"
            if on_limit == "cancel_newest":
                reason = f"cancelled: key {refusal.key} is at its limit (cancel_newest)"
                if cancel_execution(conn, row.execution_id, reason).applied:
                    result.cancelled.append(row.execution_id)
                break
            if on_limit == "cancel_in_progress":
                oldest = conn.execute(oldest_holder(), {"k": refusal.key}).scalar()
                reason = f"cancelled: key {refusal.key} needed its slot (cancel_in_progress)"
                if oldest is not None and cancel_execution(conn, oldest, reason).applied:
                    result.cancelled.append(oldest)
                    continue  # its slot is free now: admit this one
            blocked.add(refusal.key)
            break
    if result.started:
        started = [transition_of(r, step=False) for r in result.started]
        conn.execute(sql.insert_rows(ExecutionEvent), event_rows(started, "admitted"))
    return result


def partition_key(workflow: Workflow, input_data: Any) -> str | None:
    """The key an execution of ``workflow`` with (validated) ``input_data`` takes turns
    under while its limits hold it (``workflow_executions.limit_key``): its first key
    of its own (per input); None for a workflow with none. Raises InputValidationError
    when the key function fails: the enqueue is refused before anything is written."""
    own = [
        limit
        for limit in workflow.limits
        if not isinstance(limit.key, str) and limit.key is not whole_workflow
    ]
    if not own:
        return None
    try:
        return key_name(workflow, None, own[0], workflow.parse_input(input_data))
    except KeyFailed as error:
        raise InputValidationError(
            f"workflow {workflow.name!r}: a limit's key function failed on this input: {error}"
        ) from error


def _partition(limits: Sequence[KeyLimit]) -> str:
    """The key an execution takes turns under: its first key of its own (a tenant's),
    else its first key."""
    own = [kl.key for kl in limits if not isinstance(kl.limit.key, str)]
    own = [k for k in own if not k.endswith(":" + WHOLE_WORKFLOW_VALUE)] or own
    return own[0] if own else (limits[0].key if limits else "")


def _round_robin(queues: list[list[Any]]) -> list[Any]:
    """The heads of every queue first, then the seconds, and so on."""
    order: list[Any] = []
    depth = 0
    while True:
        layer = [queue[depth] for queue in queues if depth < len(queue)]
        if not layer:
            return order
        order += layer
        depth += 1


def _fail_pending(conn: Connection, execution_id: str, error: KeyFailed) -> None:
    from core.executions import move_execution

    log.warning("execution %s cannot be admitted: its key failed: %s", execution_id, error)
    move_execution(
        conn,
        execution_id,
        ExecutionStatus.FAILED,
        frozenset({ExecutionStatus.PENDING}),
        f"a limit's key failed: {error}",
    )


# Of each key's pending executions, how many one admission looks at.
PER_KEY_WINDOW = 50


@cache
def pending_of(by_key: bool) -> Select[Any]:
    """A workflow's pending executions in admission order: priority, then arrival; with
    ``by_key``, round robin between their keys (``limit_key``): each key's first, then
    each key's second, ...; so a key with a backlog of thousands cannot keep another
    key's first execution out of the window. (Without keys of its own a workflow's
    admission reads only the head of the ``ix_workflow_executions_workflow_status``
    range; ranking reads every pending execution of the workflow.)"""
    order = (WE.c.priority.desc(), WE.c.created_at, WE.c.execution_id)
    pending = (
        WE.c.workflow_id == bindparam("wf", type_=String),
        WE.c.status == ExecutionStatus.PENDING.value,
        # An open debounce window starts when the waker closes it, not in a free slot.
        WE.c.debounce_key.is_(None),
    )
    if not by_key:
        return (
            select(WE.c.execution_id, WE.c.attempt, WE.c.input_data)
            .where(*pending)
            .order_by(*order)
            .limit(bindparam("limit", type_=Integer))
        )
    turn = func.row_number().over(partition_by=WE.c.limit_key, order_by=order).label("turn")
    ranked = (
        select(
            WE.c.execution_id,
            WE.c.attempt,
            WE.c.input_data,
            WE.c.priority,
            WE.c.created_at,
            turn,
        )
        .where(*pending)
        .subquery("ranked")
    )
    return (
        select(ranked.c.execution_id, ranked.c.attempt, ranked.c.input_data)
        .where(ranked.c.turn <= PER_KEY_WINDOW)
        .order_by(
            ranked.c.turn,
            ranked.c.priority.desc(),
            ranked.c.created_at,
            ranked.c.execution_id,
        )
        .limit(bindparam("limit", type_=Integer))
    )


@cache
def oldest_holder() -> Select[Any]:
    """The running execution holding a slot under a key the longest."""
    return (
        select(WE.c.execution_id)
        .select_from(KS.join(WE, WE.c.execution_id == KS.c.execution_id))
        .where(
            KS.c.key == bindparam("k", type_=String),
            KS.c.step_name == "",
            WE.c.status == ExecutionStatus.RUNNING.value,
        )
        .order_by(WE.c.started_at, WE.c.execution_id)
        .limit(1)
    )


# --- release and promotion -----------------------------------------------------------------


def free_step(
    conn: Connection,
    execution_id: str,
    step_name: str,
    outcome: WaitOutcome,
    definition_of: DefinitionOf,
) -> None:
    """Delete the slots of a step that no longer holds them (its end, a retry's backoff),
    then admit what waits behind those keys."""
    st = statements(conn.dialect.name)
    keys = sorted(
        set(conn.execute(st.free_step, {"eid": execution_id, "step": step_name}).scalars())
    )
    if keys:
        promote(conn, keys, outcome, definition_of)


def promote(
    conn: Connection, keys: Sequence[str], outcome: WaitOutcome, definition_of: DefinitionOf
) -> None:
    """Admit the steps waiting for a slot under ``keys``, by priority then arrival, while
    the keys have room (each admission checks all of the step's limits)."""
    from core.waits import executions_of

    st = statements(conn.dialect.name)
    for key in keys:
        # The key's lock first, then the look for waiters: an admission refused under
        # this key holds the lock until its waiting row commits, so after the lock that
        # row is seen; probed before it, a waiter refused while this end was in flight
        # would be missed and wait for ever (a lost wake-up). Most ends free a key nobody
        # waits for: then the lock and one probe of the waiting-key index.
        rows = conn.execute(st.lock, {"keys": [key]}).all()
        if not rows:
            continue
        if conn.execute(st.any_waiter, {"k": key}).first() is None:
            continue
        limit = rows[0].concurrency_limit
        running = conn.execute(st.holders, {"k": key}).scalar_one()
        room = (limit or 1) - int(running)
        if room <= 0:
            continue
        waiting = conn.execute(st.waiters, {"k": key, "limit": room}).all()
        if not waiting:
            continue
        executions = executions_of(conn, sorted({w.execution_id for w in waiting}), definition_of)
        for row in waiting:
            execution = executions.get(row.execution_id)
            if execution is None:
                continue  # a workflow this process does not know: another worker's
            step = execution.workflow.steps.get(row.step_name)
            if step is None:
                continue
            try:
                limits = limits_of(execution.workflow, step, execution.row.input_data)
            except KeyFailed:
                continue  # armed once already: its key function ran then
            decision = try_admit(conn, row.execution_id, row.step_name, row.attempt, limits)
            _record(
                conn,
                row.execution_id,
                row.step_name,
                row.attempt,
                decision,
                execution.route,
                outcome,
                execution.workflow.name,
            )


def free_executions(
    conn: Connection, execution_ids: Sequence[str], definition_of: DefinitionOf
) -> WaitOutcome:
    """After the given executions (or their steps) ended by a path that does not free
    slots itself (a cancel, a timeout): delete their slots that no longer hold, and
    admit what waits behind those keys. Their count excluded them already: this only
    makes the next waiters start now rather than at the reconciler's next pass."""
    outcome = WaitOutcome()
    if not execution_ids:
        return outcome
    st = statements(conn.dialect.name)
    keys = sorted(set(conn.execute(st.stale_of, {"eids": list(execution_ids)}).scalars()))
    if keys:
        promote(conn, keys, outcome, definition_of)
    return outcome


def retry_gated(
    conn: Connection,
    execution_id: str,
    step_name: str,
    attempt: int,
    delay: float,
    error: Mapping[str, Any],
    definition_of: DefinitionOf,
) -> tuple[TransitionResult, WaitOutcome]:
    """The retry of a step behind limits: running -> waiting at the next attempt, due
    when its backoff ends (the waker admits it again then), its slots freed now; with
    what freeing them set in motion (waiters admitted), to publish."""
    from core.transitions import transition_step

    outcome = WaitOutcome()
    result = transition_step(
        conn,
        execution_id,
        step_name,
        StepStatus.WAITING,
        frozenset({StepStatus.RUNNING}),
        reason=f"retry in {delay:.1f}s after {error.get('type', 'error')}",
        attempt=attempt,
        values={
            "attempt": StepExecution.attempt + 1,
            "wake_at": utcnow(delay),
            "waiting_since": utcnow(delay),
            "wait_key": None,
            "error": dict(error),
            "worker": None,
        },
    )
    if result.applied:
        outcome.hint(datetime.now(UTC) + timedelta(seconds=delay))
        free_step(conn, execution_id, step_name, outcome, definition_of)
    return result, outcome


def readmit_recovered(
    conn: Connection, steps: Sequence[tuple[str, str]], definition_of: DefinitionOf
) -> set[tuple[str, str]]:
    """Stalled steps behind limits that the reconciler queued again (attempt + 1): back
    to waiting, due now, so the waker admits them under their limits (their old slots
    count no more: their attempt moved on). The steps moved, not to be published."""
    from core.transitions import transition_step
    from core.waits import executions_of

    if not steps:
        return set()
    executions = executions_of(conn, sorted({e for e, _ in steps}), definition_of)
    moved: set[tuple[str, str]] = set()
    for execution_id, step_name in steps:
        execution = executions.get(execution_id)
        step = None if execution is None else execution.workflow.steps.get(step_name)
        if step is None or not step.limits:
            continue
        result = transition_step(
            conn,
            execution_id,
            step_name,
            StepStatus.WAITING,
            frozenset({StepStatus.QUEUED}),
            reason="stalled: admitted again under its limits",
            # Its place in line is where it first arrived: a crash does not send it to
            # the back, behind steps that came after it.
            values={
                "wake_at": utcnow(),
                "waiting_since": func.coalesce(StepExecution.queued_at, utcnow()),
                "wait_key": None,
            },
        )
        if result.applied:
            conn.execute(
                statements(conn.dialect.name).free_step, {"eid": execution_id, "step": step_name}
            )
            moved.add((execution_id, step_name))
    return moved


def sweep(conn: Connection, limit: int, outcome: WaitOutcome, definition_of: DefinitionOf) -> int:
    """The reconciler's check of the counts against the rows: delete the slots whose
    holder no longer holds that an end did not delete (logged: each is drift a code path
    left; the count never included it), then admit what waits behind keys with room. How
    many slots it deleted."""
    st = statements(conn.dialect.name)
    stale = [*conn.execute(st.stale_steps).all(), *conn.execute(st.stale_executions).all()]
    for row in stale:
        log.warning(
            "slot of %s/%s under key %s outlived its holder: freed",
            row.execution_id,
            row.step_name or "(execution)",
            row.key,
        )
    keys = sorted(
        {*(row.key for row in stale), *conn.execute(st.waiting_keys, {"limit": limit}).scalars()}
    )
    if keys:
        promote(conn, keys, outcome, definition_of)
    return len(stale)


def pause_key(conn: Connection, key: str, until: datetime) -> None:
    """Hold every start under ``key`` until ``until`` (a 429's Retry-After): steps
    released meanwhile wait with that wake time."""
    if not isinstance(until, datetime) or until.tzinfo is None:
        raise InputValidationError(
            f"pause_key({key!r}): until must be a timezone-aware datetime or a timedelta, "
            f"got {until!r}",
            [{"field": "until", "message": "a timezone-aware datetime or a timedelta"}],
        )
    if not isinstance(key, str) or not 0 < len(key) <= 255:
        raise InputValidationError(
            f"pause_key: the key must be text of 1-255 characters, got {key!r}",
            [{"field": "key", "message": "text of 1-255 characters"}],
        )
    conn.execute(statements(conn.dialect.name).pause, {"k": key, "until": until.astimezone(UTC)})


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyState:
    """What a key holds and holds back, for the CLI, the API, the dashboard and metrics."""

    key: str
    limit: int | None
    running: int
    waiting: int
    rate_per_second: float | None
    paused_until: datetime | None


@cache
def _counts(filtered: bool) -> tuple[Select[Any], Select[Any], Select[Any], Select[Any]]:
    """The listing's statements: the keys' rows, then each key's holders and waiters
    counted per key in one grouped statement each (not one count per key), so a scrape
    costs the same few statements whatever the number of keys."""
    keys: Any = bindparam("keys", expanding=True)
    rows = select(FK).order_by(FK.c.key)
    step_holders = (
        select(KS.c.key, func.count().label("n"))
        .select_from(
            KS.join(
                SE,
                and_(
                    SE.c.execution_id == KS.c.execution_id,
                    SE.c.step_name == KS.c.step_name,
                    SE.c.attempt == KS.c.attempt,
                ),
            )
        )
        .where(KS.c.step_name != "", SE.c.status.in_(HOLDING))
        .group_by(KS.c.key)
    )
    execution_holders = (
        select(KS.c.key, func.count().label("n"))
        .select_from(KS.join(WE, WE.c.execution_id == KS.c.execution_id))
        .where(
            KS.c.step_name == "",
            WE.c.status == ExecutionStatus.RUNNING.value,
            WE.c.parked_at.is_(None),
        )
        .group_by(KS.c.key)
    )
    # ix_execution_steps_waiting_key's predicate, so the count reads that index only.
    waiters = (
        select(SE.c.wait_key.label("key"), func.count().label("n"))
        .where(SE.c.status == WAITING, SE.c.wait_kind == KEY, SE.c.wait_key.is_not(None))
        .group_by(SE.c.wait_key)
    )
    if filtered:
        rows = rows.where(FK.c.key.in_(keys))
        step_holders = step_holders.where(KS.c.key.in_(keys))
        execution_holders = execution_holders.where(KS.c.key.in_(keys))
        waiters = waiters.where(SE.c.wait_key.in_(keys))
    return rows, step_holders, execution_holders, waiters


def key_states(conn: Connection, keys: Sequence[str] | None = None) -> list[KeyState]:
    """Each key's running and waiting counts (every key, or ``keys``), by key."""
    rows, step_holders, execution_holders, waiters = _counts(keys is not None)
    params = {} if keys is None else {"keys": list(keys)}
    running: Counter[str] = Counter()
    for query in (step_holders, execution_holders):
        for row in conn.execute(query, params):
            running[row.key] += int(row.n)
    waiting = {row.key: int(row.n) for row in conn.execute(waiters, params)}
    return [
        KeyState(
            key=row.key,
            limit=row.concurrency_limit,
            running=running[row.key],
            waiting=waiting.get(row.key, 0),
            rate_per_second=None if not row.rate_interval else 1.0 / row.rate_interval,
            paused_until=row.paused_until,
        )
        for row in conn.execute(rows, params)
    ]


HeldFor = Literal["concurrency", "rate", "paused"]


def why_held(wake_at: datetime | None, paused_until: datetime | None, now: datetime) -> HeldFor:
    """Why a step waiting under its key (``wait_key`` set) is held, from its row and its
    key's pause: ``"concurrency"`` (no wake time: it waits for a free slot), ``"paused"``
    (the key is paused now), else ``"rate"`` (its wake time is the rate's next start)."""
    if wake_at is None:
        return "concurrency"
    if paused_until is not None and paused_until > now:
        return "paused"
    return "rate"


def names_key(workflow: Workflow, key: str) -> bool:
    """Whether ``key`` may be one of ``workflow``'s own (execution-level) limits' keys: a
    text key by its name, a function's value by its workflow's scope (``key_name``)."""
    return any(
        limit.key == key if isinstance(limit.key, str) else key.startswith(f"{workflow.name}:")
        for limit in workflow.limits
    )


@cache
def _resume() -> tuple[Update, Update]:
    key = bindparam("k", type_=String)
    unpause = (
        update(FK)
        .where(FK.c.key == key)
        .values(paused_until=None, updated_at=utcnow())
        .returning(FK.c.key)
    )
    # The steps the pause held wait with a wake time: due now, so the waker admits them
    # (a rate's waiters among them are refused again, with their rate's time).
    due_now = (
        update(SE)
        .where(
            SE.c.status == WAITING,
            SE.c.wait_kind == KEY,
            SE.c.wait_key == key,
            SE.c.wake_at.is_not(None),
        )
        .values(wake_at=utcnow(), updated_at=utcnow())
    )
    return unpause, due_now


def resume_key(conn: Connection, key: str) -> int | None:
    """End ``key``'s pause now (an operator's resume): the steps it held are due at
    once. How many steps were made due, or None when no such key exists."""
    unpause, due_now = _resume()
    if conn.execute(unpause, {"k": key}).first() is None:
        return None
    return int(conn.execute(due_now, {"k": key}).rowcount)


__all__ = [
    "HeldFor",
    "KeyFailed",
    "KeyLimit",
    "KeyState",
    "Refusal",
    "arm_gate",
    "free_step",
    "key_states",
    "limits_of",
    "names_key",
    "pause_key",
    "promote",
    "resume_key",
    "sweep",
    "try_admit",
    "why_held",
]
