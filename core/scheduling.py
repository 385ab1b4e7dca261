"""Engine-side units of work: admitting executions, claiming, retrying and failing steps,
retrying executions, and the reconciler's passes. Plans, like ``core.operations``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from core import statements as sql
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from core.operations import (
    event_rows,
    finish_executions,
    finish_if_done,
    recover_stalled_steps,
    transition_execution,
    transition_of,
    transition_step,
    transition_steps,
)
from core.outcomes import TransitionResult
from core.sql import utcnow
from core.states import EXECUTIONS, STEPS, ExecutionStatus, StepStatus
from core.transactions import Plan

log = logging.getLogger(__name__)

StepKey = tuple[str, str]


@dataclass(frozen=True)
class Admission:
    """Executions moved from pending to running, and their root steps now queued."""

    started: list[str] = field(default_factory=list)
    queued: list[StepKey] = field(default_factory=list)
    routes: dict[str, tuple[str, int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    """A claimed step with what it needs to run, or ``claimed=False`` for a no-op."""

    claimed: bool
    transition: TransitionResult
    execution: WorkflowExecution | None = None
    upstream: dict[str, Any] = field(default_factory=dict)
    # Attempts this step was given back after its worker died (not error retries).
    recoveries: int = 0


@dataclass(frozen=True)
class StepFailure:
    """A step's recorded failure: the steps skipped because of it and the execution's end."""

    transition: TransitionResult
    skipped: list[str] = field(default_factory=list)
    execution: TransitionResult | None = None


@dataclass(frozen=True)
class ReconcileReport:
    """What one reconciler pass found and did."""

    requeued: list[StepKey] = field(default_factory=list)
    stalled_failed: list[StepKey] = field(default_factory=list)
    republish: list[StepKey] = field(default_factory=list)
    start: list[tuple[str, str]] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    # Workflows with an execution that ended in this pass: a concurrency slot is free.
    freed: list[str] = field(default_factory=list)


class Dag(Protocol):
    """What the reconciler needs of a workflow's definition."""

    @property
    def sinks(self) -> list[str]:
        """Steps nothing depends on."""

    def descendants(self, name: str) -> list[str]:
        """Every step that depends on ``name``, directly or not."""


# A workflow's definition by (name, version); None when this process does not know it.
DagOf = Callable[[str, int], Dag | None]


def admit(
    dialect: str, workflow_id: str, execution_ids: Sequence[str], limit: int | None
) -> Plan[Admission]:
    """Start pending executions and queue their root steps, within the concurrency limit.

    Without a limit the given executions start. With one, as many as there are free
    slots start, chosen by priority then age among all pending executions of the
    workflow: the given ids only say that something may be waiting.
    """
    if limit is None:
        candidates = list(execution_ids)
    else:
        lock = sql.lock_workflow(dialect, workflow_id)
        if lock is not None:
            yield lock
        running = (yield sql.count_running(workflow_id)).scalar_one()
        free = limit - int(running)
        if free <= 0:
            return Admission()
        candidates = list((yield sql.next_pending(workflow_id, free)).scalars().all())
    if not candidates:
        return Admission()
    started_rows = (
        yield sql.transition_execution(
            candidates, ExecutionStatus.RUNNING, {ExecutionStatus.PENDING}
        )
    ).all()
    started = [transition_of(row, step=False) for row in started_rows]
    if not started:
        return Admission()
    started_ids = [r.execution_id for r in started]
    queued_rows = (yield sql.queue_roots(started_ids)).all()
    queued = [transition_of(row, step=True) for row in queued_rows]
    yield (
        sql.insert_rows(ExecutionEvent),
        event_rows(started, "admitted") + event_rows(queued, "root step"),
    )
    routes = yield from execution_routes(started_ids)
    return Admission(
        started=started_ids,
        queued=[(r.execution_id, r.step_name or "") for r in queued],
        routes=routes,
    )


UpstreamOf = Callable[[str, int], Sequence[str]]


def claim(
    execution_id: str,
    step_name: str,
    worker: str,
    task_id: str | None,
    upstream_of: UpstreamOf | None = None,
) -> Plan[Claim]:
    """Claim a due, queued step of a running execution, and read what the step needs:
    its execution and, when ``upstream_of(workflow, version)`` names them, the outputs
    of its upstream steps, all in the claiming transaction."""
    row = (yield sql.claim_step(execution_id, step_name, worker, task_id)).first()
    if row is None:
        current = (yield sql.select_step_status(execution_id, step_name)).first()
        status = current.status if current is not None else None
        return Claim(
            claimed=False,
            transition=TransitionResult(
                applied=False,
                execution_id=execution_id,
                step_name=step_name,
                to_status=StepStatus.RUNNING.value,
                current_status=status,
            ),
        )
    result = transition_of(row, step=True)
    yield sql.insert_rows(ExecutionEvent), event_rows([result], "claimed")
    execution: WorkflowExecution = (yield sql.select_execution(execution_id)).scalar_one()
    upstream: dict[str, Any] = {}
    names = upstream_of(execution.workflow_id, execution.workflow_version) if upstream_of else ()
    if names:
        rows = (yield sql.step_outputs(execution_id, names)).all()
        upstream = {r.step_name: r.output_data for r in rows}
    return Claim(
        claimed=True,
        transition=result,
        execution=execution,
        upstream=upstream,
        recoveries=row.recoveries,
    )


def running_claim(execution_id: str, step_name: str, task_id: str) -> Plan[Claim | None]:
    """The running claim of a step made by delivery ``task_id``, or None if the step is
    no longer running under it (recorded meanwhile, recovered, re-run)."""
    row = (yield sql.select_running_claim(execution_id, step_name, task_id)).first()
    if row is None:
        return None
    execution: WorkflowExecution = (yield sql.select_execution(execution_id)).scalar_one()
    transition = TransitionResult(
        applied=True,
        execution_id=execution_id,
        step_name=step_name,
        to_status=StepStatus.RUNNING.value,
        current_status=StepStatus.RUNNING.value,
        attempt=row.attempt,
    )
    return Claim(
        claimed=True, transition=transition, execution=execution, recoveries=row.recoveries
    )


def schedule_retry(
    execution_id: str, step_name: str, attempt: int, delay: float, error: Mapping[str, Any]
) -> Plan[TransitionResult]:
    """running -> queued for another attempt, due ``delay`` seconds from now."""

    result = yield from transition_step(
        execution_id,
        step_name,
        StepStatus.QUEUED,
        frozenset({StepStatus.RUNNING}),
        reason=f"retry in {delay:.1f}s after {error.get('type', 'error')}",
        attempt=attempt,
        values={
            "attempt": StepExecution.attempt + 1,
            "next_attempt_at": utcnow(delay),
            "error": dict(error),
            "worker": None,
        },
    )
    return result


def fail_step(
    execution_id: str,
    step_name: str,
    attempt: int,
    error: Mapping[str, Any],
    descendants: Sequence[str] | None,
    sinks: Sequence[str] = (),
) -> Plan[StepFailure]:
    """Fail a running step for good, skip the steps downstream of it, and finish the
    execution when nothing is left open: one transaction.

    ``descendants=None`` skips every pending step: for a step that cannot run here at
    all (its workflow is not registered), whose DAG is unknown.
    """
    failed = yield from transition_step(
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
    skipped, finished = yield from skip_downstream_and_finish(
        execution_id, step_name, descendants, sinks
    )
    return StepFailure(transition=failed, skipped=skipped, execution=finished)


def skip_downstream_and_finish(
    execution_id: str,
    step_name: str,
    descendants: Sequence[str] | None,
    sinks: Sequence[str] = (),
) -> Plan[tuple[list[str], TransitionResult | None]]:
    """After ``step_name`` failed for good: skip its pending descendants (None: every
    pending step) and finish the execution if nothing is left open. Returns the skipped
    steps and the execution's final transition, if this made one."""
    skipped = yield from skip_descendants(execution_id, step_name, descendants)
    finished = yield from finish_if_done(execution_id, sinks)
    return skipped, finished


def skip_descendants(
    execution_id: str, step_name: str, descendants: Sequence[str] | None
) -> Plan[list[str]]:
    """Skip the pending descendants of a step that failed for good (None: every pending
    step, for a workflow whose DAG this process does not know)."""
    if descendants is not None and not descendants:
        return []
    skipped = yield from transition_steps(
        execution_id,
        None if descendants is None else list(descendants),
        StepStatus.SKIPPED,
        frozenset({StepStatus.PENDING}),
        reason=f"upstream step {step_name} failed",
    )
    return [r.step_name or "" for r in skipped]


def retry_execution(
    execution_id: str, graph: Mapping[str, Sequence[str]]
) -> Plan[tuple[TransitionResult, list[StepKey]]]:
    """Re-run a failed, cancelled or timed-out execution from its unfinished steps.

    Succeeded steps keep their outputs; every other step goes back to pending with its
    count of unmet upstream steps recomputed, and those with none are queued.
    ``graph`` maps each step to its upstream steps (from the workflow definition).
    """

    sources = EXECUTIONS.sources_of(ExecutionStatus.RUNNING, retry=True)
    result = yield from transition_execution(
        execution_id, ExecutionStatus.RUNNING, sources, reason="retry", retry=True
    )
    if not result.applied:
        return result, []
    steps = (yield sql.select_steps(execution_id)).scalars().all()
    done = {s.step_name for s in steps if s.status == StepStatus.SUCCEEDED.value}
    retry_from = STEPS.sources_of(StepStatus.PENDING, retry=True)
    by_unmet: dict[int, list[str]] = {}
    for step in steps:
        if step.status in retry_from:
            unmet = sum(1 for up in graph.get(step.step_name, ()) if up not in done)
            by_unmet.setdefault(unmet, []).append(step.step_name)
    queued: list[StepKey] = []
    for unmet, names in sorted(by_unmet.items()):
        target = StepStatus.QUEUED if unmet == 0 else StepStatus.PENDING
        moved = yield from _retry_steps(execution_id, names, target, unmet, retry_from)
        if target is StepStatus.QUEUED:
            queued.extend((execution_id, r.step_name or "") for r in moved)
    return result, queued


def _retry_steps(
    execution_id: str,
    names: list[str],
    target: StepStatus,
    unmet: int,
    sources: frozenset[StepStatus],
) -> Plan[list[TransitionResult]]:
    update = sql.transition_steps(
        execution_id,
        names,
        target,
        sources,
        retry=True,
        values={
            "unmet_deps": unmet,
            "attempt": StepExecution.attempt + 1,
            "next_attempt_at": None,
            "output_data": None,
            "worker": None,
        },
    )
    rows = (yield update).all()
    moved = [transition_of(row, step=True) for row in rows]
    if moved:
        yield sql.insert_rows(ExecutionEvent), event_rows(moved, "execution retried")
    return moved


def time_out(execution_ids: Sequence[str]) -> Plan[list[tuple[str, str]]]:
    """Move open executions past their deadline to timed_out and cancel their open steps;
    the (execution, previous status) of those that moved."""
    if not execution_ids:
        return []
    sources = EXECUTIONS.sources_of(ExecutionStatus.TIMED_OUT)
    rows = (
        yield sql.transition_execution(list(execution_ids), ExecutionStatus.TIMED_OUT, sources)
    ).all()
    timed_out = [transition_of(row, step=False) for row in rows]
    if not timed_out:
        return []
    ids = [r.execution_id for r in timed_out]
    step_rows = (yield sql.cancel_steps_of(ids)).all()
    cancelled = [transition_of(row, step=True) for row in step_rows]
    yield (
        sql.insert_rows(ExecutionEvent),
        event_rows(timed_out, "deadline passed") + event_rows(cancelled, "deadline passed"),
    )
    return [(r.execution_id, r.from_status or "") for r in timed_out]


def reconcile_scan(
    *,
    stall_timeout: float,
    republish_after: float,
    start_after: float,
    limit: int,
    max_recoveries: int,
    dag_of: DagOf,
) -> Plan[ReconcileReport]:
    """One reconciler pass over stalled, unclaimed and unstarted work and deadlines.

    Each part is one bounded, set-based statement (or two), and idempotent: passes
    may overlap, and every change is a compare-and-set that only one of them wins.
    The whole pass is one transaction: a stalled step failed here has its descendants
    skipped and its execution finished in the same commit, so a crash cannot strand it.
    """

    stalled_rows = (yield sql.stalled_steps(stall_timeout, limit)).all()
    stalled = [(r.execution_id, r.step_name) for r in stalled_rows]
    recovery = yield from recover_stalled_steps(stalled, max_recoveries)
    if recovery.failed:
        routes = yield from execution_routes(sorted({r.execution_id for r in recovery.failed}))
        for failed in recovery.failed:
            workflow, version, _priority = routes[failed.execution_id]
            dag = dag_of(workflow, version)
            step_name = failed.step_name or ""
            yield from skip_descendants(
                failed.execution_id, step_name, dag.descendants(step_name) if dag else None
            )
    due_rows = (yield sql.due_queued_steps(republish_after, limit)).all()
    due = [(r.execution_id, r.step_name) for r in due_rows]
    republished: list[TransitionResult] = []
    if due:
        republished = [transition_of(row, step=True) for row in (yield sql.republish(due)).all()]
        yield sql.insert_rows(ExecutionEvent), event_rows(republished, "republished")
    start_rows = (yield sql.stale_pending_executions(start_after, limit)).all()
    overdue = list((yield sql.overdue_executions(limit)).scalars().all())
    timed_out = yield from time_out(overdue)
    finishable = set((yield sql.finishable_executions(limit)).scalars().all())
    finishable.update(r.execution_id for r in recovery.failed)

    def sinks_of(workflow: str, version: int) -> list[str]:
        dag = dag_of(workflow, version)
        return dag.sinks if dag else []

    finished = yield from finish_executions(sorted(finishable), sinks_of)
    freed_ids = [r.execution_id for r in finished] + [eid for eid, _ in timed_out]
    freed = yield from execution_routes(freed_ids)
    return ReconcileReport(
        requeued=[(r.execution_id, r.step_name or "") for r in recovery.requeued],
        stalled_failed=[(r.execution_id, r.step_name or "") for r in recovery.failed],
        republish=[(r.execution_id, r.step_name or "") for r in republished]
        + [(r.execution_id, r.step_name or "") for r in recovery.requeued],
        start=[(r.execution_id, r.workflow_id) for r in start_rows],
        timed_out=[eid for eid, _ in timed_out],
        finished=[r.execution_id for r in finished],
        freed=sorted({workflow for workflow, _version, _priority in freed.values()}),
    )


def step_status(execution_id: str, step_name: str) -> Plan[str | None]:
    """The step's status, or None when there is no such step."""
    row = (yield sql.select_step_status(execution_id, step_name)).first()
    return None if row is None else str(row.status)


def record_late_output(execution_id: str, step_name: str, attempt: int, output: Any) -> Plan[int]:
    """Keep the output of a step that finished after it was cancelled (advances nothing)."""
    result = yield sql.late_output(execution_id, step_name, attempt, output)
    return int(result.rowcount)  # type: ignore[attr-defined]


def execution_routes(execution_ids: Sequence[str]) -> Plan[dict[str, tuple[str, int, int]]]:
    """(workflow, version, priority) of each execution: what publishing a step needs."""
    if not execution_ids:
        return {}
    rows = (yield sql.execution_routes(execution_ids)).all()
    return {r.execution_id: (r.workflow_id, r.workflow_version, r.priority) for r in rows}
