"""A step's life in SQL: claim, complete (release downstream, finish, continue), retry,
fail, heartbeat.

Each function is one unit of work on a ``Connection`` inside a transaction its caller
owns. The claim and the completion run the statements of ``core.step_statements``
(built once per dialect): one statement each on PostgreSQL, the same parts in turn on
SQLite.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
)

from core import statements as sql
from core.children import wake_parents_of
from core.conditions import UPSTREAM, release_after
from core.executions import admit, finish_if_done
from core.limits import free_step
from core.models import StepExecution
from core.outcomes import (
    Admission,
    Claim,
    Route,
    StepCompletion,
    StepFailure,
    TransitionResult,
    WaitOutcome,
)
from core.sql import utcnow
from core.states import StepStatus
from core.step_statements import (
    CLAIMED,
    CLAIMED_AT_START,
    CONTINUED,
    HANDED_OFF,
    RELEASED,
    SUCCEEDED,
    HotPath,
    event_row,
    hot_path,
)
from core.transitions import transition_step, transition_steps
from core.waits import enter_waits, registered, settle
from core.workflows import Dag, Workflow

DefinitionOf = Callable[[str, int], Workflow | None]

log = logging.getLogger(__name__)


def claim(
    conn: Connection,
    execution_id: str,
    step_name: str,
    worker: str,
    task_id: str | None,
    upstream: Sequence[str] | None,
    upstream_of: Callable[[Route], Sequence[str]],
) -> Claim | None:
    """Claim a due, queued step of a running execution for ``worker``, with what it
    needs to run (input, route, upstream outputs, attempt); None when the claim loses:
    a duplicate, early or late delivery, a no-op.

    ``upstream`` names the step's upstream steps when the message said which workflow
    it belongs to; otherwise ``upstream_of(route)`` is asked once the route is known.
    """
    sql_ = hot_path(conn.dialect.name)
    params = {
        "eid": execution_id,
        "step": step_name,
        "worker_id": worker,
        "task_id": task_id,
        "names": list(upstream or ()),
    }
    if sql_.fused:
        row = conn.execute(sql_.claim_pg, params).first()
        if row is None:
            return None
        route = Route(row.workflow_id, row.workflow_version, row.priority, row.shape_hash)
        outputs: dict[str, Any] = dict(row.upstream or {})
        attempt, recoveries, input_data = row.attempt, row.recoveries, row.input_data
        waited = _waited(row)
    else:
        claimed = conn.execute(sql_.claim, params).first()
        if claimed is None:
            return None
        conn.execute(sql_.events, [event_row(claimed, CLAIMED)])
        found = conn.execute(sql_.execution, params).one()
        route = Route(found.workflow_id, found.workflow_version, found.priority, found.shape_hash)
        outputs = _outputs(conn, sql_, execution_id, upstream or ())
        attempt, recoveries, input_data = claimed.attempt, claimed.recoveries, found.input_data
        waited = _waited(claimed)
    if upstream is None:
        outputs = _outputs(conn, sql_, execution_id, upstream_of(route))
    return Claim(
        execution_id, step_name, attempt, recoveries, route, input_data, outputs, waited=waited
    )


def _waited(row: Row[Any]) -> float:
    """Seconds from a claimed step's ``queued_at`` to its ``started_at`` (both the
    database's clock)."""
    if row.queued_at is None or row.started_at is None:
        return 0.0
    return max(0.0, float((row.started_at - row.queued_at).total_seconds()))


def _outputs(
    conn: Connection, sql_: HotPath, execution_id: str, names: Sequence[str]
) -> dict[str, Any]:
    if not names:
        return {}
    rows = conn.execute(sql_.outputs, {"eid": execution_id, "names": list(names)})
    return {r.step_name: r.output_data for r in rows}


@dataclass(frozen=True)
class HeldStep:
    """A sibling step this worker holds (see ``complete``'s ``hold``), with what it
    needs to run when its only upstream step is the one that released it."""

    name: str
    source: str  # the step whose completion released it
    output: Any  # that step's output


@dataclass(frozen=True)
class Completion(StepCompletion):
    """A StepCompletion, and the released steps it held for this worker (``held``:
    queued, due only after the hold's grace, and sent by no message yet)."""

    held: tuple[str, ...] = ()


def complete(
    conn: Connection,
    step: Claim,
    output: Any,
    encoded: str | None,
    workflow: Dag,
    continue_as: str | None = None,
    definition_of: DefinitionOf | None = None,
    *,
    hold: float | None = None,
    take: HeldStep | None = None,
    here: Collection[str] | None = None,
) -> Completion:
    """Record a step's success and everything it sets in motion, in one transaction:
    its output and event, the release of its downstream steps (atomic decrements),
    the execution's end when this was its last open step, and, with ``continue_as``
    (this worker's id), the claim of one released step for the worker to run next.

    Held siblings (a fan-out run by one worker, with no broker message per branch):
    with ``hold`` (seconds) and a released step continued, the other steps it queued
    are held for this worker: due only ``hold`` seconds from now, and reported in
    ``held`` instead of ``queued`` (not to be published). With ``take`` (a step this
    worker holds) and no released step continued, ``take`` is claimed to run next
    instead, if it is still queued. The worker hands held steps it will not run to the
    broker (``hand_off``); those of a worker that died fall due to the reconciler.

    ``here`` (None: every one) names the downstream steps this worker may run, those of
    a broker queue it consumes: only one of them is continued or held; the others it
    releases are queued, to be published to their own queue.

    Wait nodes it releases enter ``waiting`` and are established here too
    (``core.waits.enter_waits``; ``definition_of`` finds workflows by name and version,
    for what they set in motion), reported in ``woken``.

    ``encoded`` is ``output`` as JSON text (None for None). Not applied
    (``transition.applied`` False) when the step is no longer running at this attempt:
    a duplicate or late completion that changes nothing.
    """
    sql_ = hot_path(conn.dialect.name)
    execution_id, step_name = step.execution_id, step.step_name
    # Wait nodes downstream enter waiting by their own statement (core.waits), after
    # this one: the fused completion's text stays as it is for every workflow.
    waits = workflow.wait_downstream(step_name) if isinstance(workflow, Workflow) else []
    # Gated steps downstream (a condition, a trigger) are decided by core.conditions,
    # after this statement too.
    gated = workflow.gated_downstream(step_name) if isinstance(workflow, Workflow) else []
    downstream = (
        workflow.task_downstream(step_name)
        if (waits or gated) and isinstance(workflow, Workflow)
        else workflow.downstream(step_name)
    )
    # None: every downstream step may continue here (a workflow with no ``queue=``).
    mine = downstream if here is None else [n for n in downstream if n in here]
    params = {
        "eid": execution_id,
        "step": step_name,
        "at_attempt": step.attempt,
        "output": encoded,
        "downstream": downstream,
        # An empty list would change the statement's text: nothing continues instead.
        "here": mine or downstream,
        "continue_here": continue_as is not None and bool(mine),
        "worker_id": continue_as,
    }
    queued: list[str] = []
    continued: Row[Any] | None = None
    released_any = False
    if sql_.fused:
        rows = conn.execute(sql_.complete_pg, params).all()
        if not rows:
            return Completion(transition=_not_applied(conn, sql_, step))
        for row in rows:
            released_any = released_any or row.step_name is not None
            if row.status == StepStatus.QUEUED.value:
                queued.append(row.step_name)
            elif row.status == StepStatus.RUNNING.value:
                continued = row
    else:
        done = conn.execute(sql_.complete, params).first()
        if done is None:
            return Completion(transition=_not_applied(conn, sql_, step))
        events = [event_row(done, SUCCEEDED)]
        if downstream:
            released = conn.execute(sql_.release, params).all()
            released_any = bool(released)
            events += [event_row(r, RELEASED) for r in released if r.status == StepStatus.QUEUED]
            queued = sorted(r.step_name for r in released if r.status == StepStatus.QUEUED)
        first = next((name for name in queued if name in mine), None)
        if continue_as is not None and first is not None:
            continued = conn.execute(sql_.continue_step, {**params, "step": first}).one()
            events.append(event_row(continued, CONTINUED))
            queued.remove(first)
        conn.execute(sql_.events, events)
    held: list[str] = []
    holdable = queued if here is None else [name for name in queued if name in here]
    if hold is not None and continued is not None and holdable:
        conn.execute(sql_.hold, {"eid": execution_id, "names": holdable, "grace": hold})
        held, queued = holdable, [name for name in queued if name not in holdable]
    source, took = (step_name, output), False
    if take is not None and continued is None and continue_as is not None:
        continued = _take_held(conn, sql_, execution_id, take.name, continue_as)
        source, took = (take.source, take.output), continued is not None
    transition = TransitionResult(
        applied=True,
        execution_id=execution_id,
        step_name=step_name,
        from_status=StepStatus.RUNNING.value,
        to_status=StepStatus.SUCCEEDED.value,
        attempt=step.attempt,
    )
    woken = None
    if waits:
        assert isinstance(workflow, Workflow)
        entered, woken = enter_waits(
            conn, execution_id, waits, workflow, {step_name: output}, definition_of or registered
        )
        released_any = released_any or entered
    if gated:
        assert isinstance(workflow, Workflow)
        woken = woken or WaitOutcome()
        ended = [(step_name, StepStatus.SUCCEEDED.value)]
        known = {step_name: output}
        opened = release_after(
            conn, execution_id, workflow, ended, known, definition_of or registered, woken
        )
        released_any = released_any or opened
    # A step that released a downstream step (pending or queued now) cannot have been
    # its execution's last open step; any other may have been (a sink, or a branch
    # whose downstream steps were skipped when a sibling failed). The DAG's only sink
    # is necessarily the last (every other step is upstream of it, and succeeded before
    # it was queued): no other step can end at the same moment, so it takes no lock.
    finished = None
    # A held step claimed here is running: the execution cannot end in this transaction.
    if not released_any and not took:
        # With gated steps, a sink may run while a branch skipped early still runs.
        alone = list(workflow.sinks) == [step_name] and not (
            isinstance(workflow, Workflow) and workflow.gated
        )
        finished = finish_if_done(conn, execution_id, workflow.sinks, contended=not alone)
        if finished is None and isinstance(workflow, Workflow) and workflow.wait_nodes:
            # Its last running branch ended beside a waiting one: parked, it frees its
            # max_concurrency slot while it waits.
            woken = woken or WaitOutcome()
            settle(conn, [execution_id], woken)
        elif finished is not None and finished.parent_execution_id is not None:
            # A child execution that ended tells its parent step (the finish returned
            # its parent: an execution that is no child pays nothing more).
            told = WaitOutcome()
            if wake_parents_of(conn, [execution_id], told, definition_of or registered):
                woken = woken or WaitOutcome()
                woken.merge(told)
    if isinstance(workflow, Workflow) and workflow.steps[step_name].limits:
        # Its slots free with its success: the keys' next waiters are admitted here.
        woken = woken or WaitOutcome()
        free_step(conn, execution_id, step_name, woken, definition_of or registered)
    if continued is None and continue_as is not None and woken is not None and woken.queued:
        continued = _continue_admitted(conn, sql_, step, workflow, here, continue_as, woken)
    next_step = None
    if continued is not None:
        upstream = workflow.upstream(continued.step_name)
        outputs = (
            {source[0]: source[1]}
            if upstream == (source[0],)
            else _outputs(conn, sql_, execution_id, upstream)
        )
        next_step = Claim(
            execution_id,
            continued.step_name,
            continued.attempt,
            continued.recoveries,
            step.route,
            step.input_data,
            outputs,
            continued=True,
            waited=_waited(continued) if took else 0.0,
        )
    return Completion(
        transition=transition,
        queued=tuple(queued),
        execution=finished,
        continued=next_step,
        woken=woken,
        held=tuple(held),
    )


def _continue_admitted(
    conn: Connection,
    sql_: HotPath,
    step: Claim,
    workflow: Dag,
    here: Collection[str] | None,
    worker: str,
    woken: WaitOutcome,
) -> Row[Any] | None:
    """Claim for ``worker`` a step downstream of ``step`` that its release admitted at
    once under its limits (queued in ``woken``, core.limits): this worker runs it next,
    as a step released without limits, instead of a broker message and a claim of its
    own. None when there is none (it stays in ``woken`` to be published)."""
    if not isinstance(workflow, Workflow):
        return None
    downstream = workflow.downstream(step.step_name)
    for key in woken.queued:
        execution_id, name = key
        if execution_id != step.execution_id or name not in downstream:
            continue
        if not workflow.steps[name].limits or (here is not None and name not in here):
            continue
        params = {"eid": execution_id, "step": name, "worker_id": worker}
        row = conn.execute(sql_.continue_step, params).first()
        if row is not None:
            conn.execute(sql_.events, [event_row(row, CONTINUED)])
            woken.queued.remove(key)
            return row
    return None


def _take_held(
    conn: Connection, sql_: HotPath, execution_id: str, step_name: str, worker: str
) -> Row[Any] | None:
    """Claim the held step ``step_name`` for ``worker``, with its event; None when it is
    no longer queued (handed off and claimed elsewhere, cancelled)."""
    params = {"eid": execution_id, "step": step_name, "worker_id": worker}
    if sql_.fused:
        return conn.execute(sql_.continue_held_pg, params).first()
    row = conn.execute(sql_.continue_held, params).first()
    if row is not None:
        conn.execute(sql_.events, [event_row(row, CONTINUED)])
    return row


def hand_off(conn: Connection, execution_id: str, names: Sequence[str]) -> list[str]:
    """Steps this worker held and will not run, made due now for their messages: queued
    -> queued with its event, for those still queued (a held step claimed meanwhile, or
    cancelled, is left as it is). The names to publish, once committed."""
    if not names:
        return []
    sql_ = hot_path(conn.dialect.name)
    rows = conn.execute(sql_.hand_off, {"eid": execution_id, "names": list(names)}).all()
    if rows:
        conn.execute(sql_.events, [event_row(row, HANDED_OFF) for row in rows])
    return sorted(row.step_name for row in rows)


def _not_applied(conn: Connection, sql_: HotPath, step: Claim) -> TransitionResult:
    current = conn.execute(sql_.current, {"eid": step.execution_id, "step": step.step_name})
    row = current.first()
    return TransitionResult(
        applied=False,
        execution_id=step.execution_id,
        step_name=step.step_name,
        to_status=StepStatus.SUCCEEDED.value,
        current_status=None if row is None else row.status,
        attempt=None if row is None else row.attempt,
    )


def admit_and_claim(
    conn: Connection,
    workflow_id: str,
    execution_ids: Sequence[str],
    limited: Workflow | None,
    worker: str,
) -> tuple[Admission, Claim | None]:
    """Admit executions (``core.executions.admit``) and, in the same transaction, claim
    one root step of the first one started for ``worker`` to run itself: a start costs
    no broker round trip before its first step. The Admission returned lists the other
    queued root steps, to publish. A retried execution's steps are all published (see
    ``Admission.first_run``)."""
    unlimited = limited is None or not limited.limits
    if conn.dialect.name == "postgresql" and unlimited and len(execution_ids) == 1:
        return _start_and_claim_pg(conn, execution_ids[0], worker)
    admission = admit(conn, workflow_id, execution_ids, limited)
    if not admission.first_run:
        return admission, None
    execution_id, step_name = admission.first_run[0]
    sql_ = hot_path(conn.dialect.name)
    params = {"eid": execution_id, "step": step_name, "worker_id": worker}
    row = conn.execute(sql_.continue_step, params).first()
    if row is None:
        return admission, None
    conn.execute(sql_.events, [event_row(row, CLAIMED_AT_START)])
    found = conn.execute(sql_.execution, params).one()
    route = admission.routes[execution_id]
    claim = Claim(
        execution_id,
        step_name,
        row.attempt,
        row.recoveries,
        route,
        found.input_data,
        {},
        continued=True,
    )
    rest = [key for key in admission.queued if key != (execution_id, step_name)]
    return Admission(
        admission.started,
        rest,
        admission.routes,
        cancelled=admission.cancelled,
        retry_at=admission.retry_at,
    ), claim


def _start_and_claim_pg(
    conn: Connection, execution_id: str, worker: str
) -> tuple[Admission, Claim | None]:
    """admit_and_claim of one execution with no concurrency limit: one statement."""
    sql_ = hot_path("postgresql")
    rows = conn.execute(sql_.start_pg, {"eid": execution_id, "worker_id": worker}).all()
    if not rows:
        return Admission(), None  # not pending: started already, or cancelled
    first = rows[0]
    route = Route(first.workflow_id, first.workflow_version, first.priority, first.shape_hash)
    queued = sorted(r.step_name for r in rows if r.step_status == StepStatus.QUEUED.value)
    claimed = next((r for r in rows if r.step_status == StepStatus.RUNNING.value), None)
    admission = Admission(
        started=[execution_id],
        queued=[(execution_id, name) for name in queued],
        routes={execution_id: route},
    )
    if claimed is None:
        return admission, None
    claim = Claim(
        execution_id,
        claimed.step_name,
        claimed.step_attempt,
        claimed.recoveries,
        route,
        first.input_data,
        {},
        continued=True,
    )
    return admission, claim


# --- retries and failures ------------------------------------------------------------


def schedule_retry(
    conn: Connection,
    execution_id: str,
    step_name: str,
    attempt: int,
    delay: float,
    error: Mapping[str, Any],
) -> TransitionResult:
    """running -> queued for another attempt, due ``delay`` seconds from now."""

    result = transition_step(
        conn,
        execution_id,
        step_name,
        StepStatus.QUEUED,
        frozenset({StepStatus.RUNNING}),
        reason=f"retry in {delay:.1f}s after {error.get('type', 'error')}",
        attempt=attempt,
        values={
            "attempt": StepExecution.attempt + 1,
            "next_attempt_at": utcnow(delay),
            # Queued from when it is due: the backoff is no time spent waiting in the
            # queue (the queue-wait metric measures queued_at -> started_at).
            "queued_at": utcnow(delay),
            "error": dict(error),
            "worker": None,
        },
    )
    return result


def fail_step(
    conn: Connection,
    execution_id: str,
    step_name: str,
    attempt: int,
    error: Mapping[str, Any],
    descendants: Sequence[str] | None,
    sinks: Sequence[str] = (),
    workflow: Workflow | None = None,
) -> StepFailure:
    """Fail a running step for good, skip the steps downstream of it, and finish the
    execution when nothing is left open: one transaction. A step behind limits (known
    from ``workflow``) frees its slots, admitting the keys' next waiters.

    ``descendants=None`` skips every pending step: for a step that cannot run here at
    all (its workflow is not registered), whose DAG is unknown. With ``workflow`` (its
    definition) the skips are counted in ``woken.skipped``; when it has gated steps,
    its dependents follow their triggers instead (``core.conditions.release_after``:
    an ``all_done`` handler is released, not skipped).
    """
    failed = transition_step(
        conn,
        execution_id,
        step_name,
        StepStatus.FAILED,
        frozenset({StepStatus.RUNNING}),
        reason=f"failed: {error.get('type', 'error')}",
        attempt=attempt,
        values={"error": dict(error)},
    )
    if not failed.applied:
        return StepFailure(transition=failed)
    woken = None
    if workflow is not None and workflow.gated:
        woken = WaitOutcome()
        ended = [(step_name, StepStatus.FAILED.value)]
        release_after(conn, execution_id, workflow, ended, {}, registered, woken)
        skipped = [name for _, name, _ in woken.skipped]
        finished = finish_if_done(conn, execution_id, sinks)
    else:
        skipped, finished = skip_downstream_and_finish(
            conn, execution_id, step_name, descendants, sinks
        )
        if workflow is not None and skipped:
            woken = WaitOutcome(skipped=[(workflow.name, name, UPSTREAM) for name in skipped])
    if finished is not None and finished.parent_execution_id is not None:
        # A child execution that failed tells its parent step.
        told = WaitOutcome()
        if wake_parents_of(conn, [execution_id], told, registered):
            woken = woken or WaitOutcome()
            woken.merge(told)
    if workflow is not None and step_name in workflow.steps and workflow.steps[step_name].limits:
        woken = woken or WaitOutcome()
        free_step(conn, execution_id, step_name, woken, registered)
    return StepFailure(transition=failed, skipped=skipped, execution=finished, woken=woken)


def skip_downstream_and_finish(
    conn: Connection,
    execution_id: str,
    step_name: str,
    descendants: Sequence[str] | None,
    sinks: Sequence[str] = (),
) -> tuple[list[str], TransitionResult | None]:
    """After ``step_name`` failed for good: skip its pending descendants (None: every
    pending step) and finish the execution if nothing is left open. Returns the skipped
    steps and the execution's final transition, if this made one."""
    skipped = skip_descendants(conn, execution_id, step_name, descendants)
    finished = finish_if_done(conn, execution_id, sinks)
    return skipped, finished


def skip_descendants(
    conn: Connection, execution_id: str, step_name: str, descendants: Sequence[str] | None
) -> list[str]:
    """Skip the pending descendants of a step that failed for good (None: every pending
    step, for a workflow whose DAG this process does not know)."""
    if descendants is not None and not descendants:
        return []
    skipped = transition_steps(
        conn,
        execution_id,
        None if descendants is None else list(descendants),
        StepStatus.SKIPPED,
        frozenset({StepStatus.PENDING}),
        reason=f"upstream step {step_name} failed",
    )
    return [r.step_name or "" for r in skipped]


def running_claim(
    conn: Connection, execution_id: str, step_name: str, task_id: str
) -> Claim | None:
    """The running claim of a step made by Celery delivery ``task_id``, or None if the
    step is no longer running under it (recorded meanwhile, recovered, re-run)."""
    row = conn.execute(sql.select_running_claim(execution_id, step_name, task_id)).first()
    if row is None:
        return None
    found = conn.execute(hot_path(conn.dialect.name).execution, {"eid": execution_id}).one()
    route = Route(found.workflow_id, found.workflow_version, found.priority, found.shape_hash)
    return Claim(execution_id, step_name, row.attempt, row.recoveries, route, found.input_data, {})


def heartbeat(conn: Connection, worker: str, keys: Sequence[tuple[str, str]] | None) -> int:
    """Refresh the heartbeats of a worker's running steps; how many rows it touched."""
    result = conn.execute(sql.heartbeat(worker, keys))
    return int(result.rowcount)


def step_status(conn: Connection, execution_id: str, step_name: str) -> str | None:
    """The step's status, or None when there is no such step."""
    row = conn.execute(sql.select_step_status(execution_id, step_name)).first()
    return None if row is None else str(row.status)


def record_late_output(
    conn: Connection, execution_id: str, step_name: str, attempt: int, output: Any
) -> int:
    """Keep the output of a step that finished after it was cancelled (advances nothing)."""
    result = conn.execute(sql.late_output(execution_id, step_name, attempt, output))
    return int(result.rowcount)
