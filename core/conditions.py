"""Conditional steps: ``when=`` conditions, ``trigger=`` rules and the reach of a skip.

A *gated* step (``Step.gated``: a ``when`` or a trigger other than ``all_success``) is
released here, never by the fused completion of ``core.step_statements``: workflows
without one keep exactly the hot path's statements. Each unit runs in its caller's
transaction, after the upstream step's own transition:

- ``release_after`` (an upstream step ended: succeeded, failed or skipped) walks its
  dependents. A gated one is counted down (an atomic decrement, whatever the outcome)
  and the one transaction that brings its count to zero decides it, reading how its
  upstream steps ended (all final by then): run it (queued, or a wait entered), skip it
  (pending -> skipped) or fail it (its condition raised). A plain (``all_success``)
  dependent of a step that failed or was skipped is skipped at once. Every skip or
  failure walks on from that step, iteratively, through any depth, in the same
  transaction.
- ``decide_admitted`` (an execution started): its gated steps that the start queued (a
  root with ``when``, or after a retry a step whose upstream steps had succeeded) are
  decided the same way.
- ``skip_step`` (a step of ``Retry(on_exhausted="skip")`` whose attempts are spent):
  running -> skipped, its error kept, then ``release_after``.

What that sets in motion (steps to publish, waits established, skips to count) is put in
a ``WaitOutcome`` the caller publishes after its commit.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any, cast

from sqlalchemy import Connection, Select, String, Table, Update, bindparam, select, update

from core import statements as sql
from core.executions import finish_if_done
from core.models import StepExecution
from core.outcomes import Admission, TransitionResult, WaitOutcome
from core.sql import utcnow
from core.states import StepStatus
from core.step_statements import RELEASED, event_row, hot_path
from core.transitions import step_sources, transition_step, transition_steps
from core.waits import (
    DefinitionOf,
    WaitingExecution,
    context_of,
    establish,
    read_execution,
    settle,
    wait_error,
)
from core.waits import admit as admit_waits
from core.workflows import MapSpec, Step, Workflow

log = logging.getLogger(__name__)

SE = cast(Table, StepExecution.__table__)
SUCCEEDED = StepStatus.SUCCEEDED.value
FAILED = StepStatus.FAILED.value
SKIPPED = StepStatus.SKIPPED.value
# Why a step was skipped, as the metric conveyor_steps_skipped_total{why} says it.
CONDITION, UPSTREAM, EXHAUSTED = "condition", "upstream", "exhausted"

# The edges used here, checked against the state table once, at import.
FROM_PENDING = step_sources(StepStatus.QUEUED, {StepStatus.PENDING}, retry=False)
# A step is skipped from pending, or from queued when its admission queued it (a root).
SKIP_FROM = {
    source: step_sources(StepStatus.SKIPPED, {source}, retry=False)
    for source in (StepStatus.PENDING, StepStatus.QUEUED)
}
FAIL_FROM = step_sources(StepStatus.FAILED, {StepStatus.PENDING, StepStatus.QUEUED}, False)
EXHAUSTED_FROM = step_sources(StepStatus.SKIPPED, {StepStatus.RUNNING}, retry=False)
WAIT_FROM = step_sources(StepStatus.WAITING, {StepStatus.PENDING}, retry=False)


@dataclass(frozen=True)
class ConditionStatements:
    """The statements of gated releases, built once with bind parameters."""

    count_down: Update
    upstream: Select[Any]


@cache
def condition_statements() -> ConditionStatements:
    """Built on first use, then reused (both dialects)."""
    eid = bindparam("eid", type_=String)
    # Counts down, whatever the upstream outcome; moves no status: the transaction that
    # reads 0 back (the row's lock orders them) decides the step.
    count_down = (
        update(SE)
        .where(
            SE.c.execution_id == eid,
            SE.c.step_name.in_(bindparam("names", expanding=True)),
            SE.c.status == StepStatus.PENDING.value,
            SE.c.unmet_deps > 0,
        )
        .values(unmet_deps=SE.c.unmet_deps - 1, updated_at=utcnow())
        .returning(SE.c.step_name, SE.c.unmet_deps)
    )
    upstream = select(SE.c.step_name, SE.c.status, SE.c.output_data).where(
        SE.c.execution_id == eid, SE.c.step_name.in_(bindparam("names", expanding=True))
    )
    return ConditionStatements(count_down, upstream)


@dataclass
class _Release:
    """One release's state: its execution (read once, when first needed), what it set in
    motion, and whether any step it touched is still open."""

    conn: Connection
    execution_id: str
    workflow: Workflow
    definition_of: DefinitionOf
    outcome: WaitOutcome
    known: Mapping[str, Any]
    execution: WaitingExecution | None = None
    opened: bool = False

    def read(self) -> WaitingExecution:
        if self.execution is None:
            self.execution = read_execution(self.conn, self.execution_id, self.workflow)
            self.outcome.routes[self.execution_id] = self.execution.route
        return self.execution


def release_after(
    conn: Connection,
    execution_id: str,
    workflow: Workflow,
    ended: Sequence[tuple[str, str]],
    known_outputs: Mapping[str, Any],
    definition_of: DefinitionOf,
    outcome: WaitOutcome,
) -> bool:
    """After the steps ``ended`` ((name, final status), recorded in this transaction)
    ended: count down their gated dependents and decide those that reach zero; skip the
    plain dependents of those that did not succeed; go on from every step this skipped
    or failed. Whether any step it touched is still open (pending, queued, waiting): if
    not, the execution may have ended. ``known_outputs`` are outputs in hand."""
    release = _Release(conn, execution_id, workflow, definition_of, outcome, known_outputs)
    frontier = list(ended)
    statements = condition_statements()
    while frontier:
        name, status = frontier.pop(0)
        if status != SUCCEEDED:
            plain = [d for d in workflow.downstream(name) if d not in workflow.gated]
            for skipped in _skip(conn, execution_id, plain, f"upstream step {name} {status}"):
                _count_skip(release, skipped, UPSTREAM)
                frontier.append((skipped, SKIPPED))
        gated = workflow.gated_downstream(name)
        if not gated:
            continue
        rows = conn.execute(statements.count_down, {"eid": execution_id, "names": gated}).all()
        for row in sorted(rows, key=lambda r: str(r.step_name)):
            if row.unmet_deps > 0:
                release.opened = True
                continue
            decided = _decide(release, workflow.steps[row.step_name], StepStatus.PENDING)
            if decided in (SKIPPED, FAILED):
                frontier.append((row.step_name, decided))
    return release.opened


def admit(
    conn: Connection,
    workflow: Workflow,
    execution_ids: Sequence[str],
    definition_of: DefinitionOf,
) -> tuple[Admission, WaitOutcome]:
    """``core.waits.admit`` for a workflow with gated steps: the admission, then the gated
    steps it queued decided (``decide_admitted``); the admission lists what stays queued."""
    admission, outcome = admit_waits(conn, workflow, execution_ids, definition_of)
    if not workflow.gated or not admission.started:
        return admission, outcome
    # Gated wait nodes with nothing upstream left (a root with ``when=`` behind a limit,
    # a gated sleep) were left pending by the waits' arming: decided here first.
    gated_waits = sorted(n for n in workflow.gated if n in workflow.wait_nodes)
    pending = (
        conn.execute(
            select(SE.c.execution_id, SE.c.step_name).where(
                SE.c.execution_id.in_(admission.started),
                SE.c.status == StepStatus.PENDING.value,
                SE.c.unmet_deps == 0,
                SE.c.step_name.in_(gated_waits),
            )
        ).all()
        if gated_waits
        else []
    )
    if not admission.queued and not pending:
        return admission, outcome
    kept = decide_admitted(
        conn,
        workflow,
        admission.queued,
        definition_of,
        outcome,
        pending=[(r.execution_id, r.step_name) for r in pending],
    )
    first_run = [key for key in admission.first_run if key in kept]
    return replace(admission, queued=kept, first_run=first_run), outcome


def decide_admitted(
    conn: Connection,
    workflow: Workflow,
    queued: Sequence[tuple[str, str]],
    definition_of: DefinitionOf,
    outcome: WaitOutcome,
    pending: Sequence[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """Decide the gated steps among ``queued`` ((execution, step) an admission queued in
    this transaction, not yet published) and the gated wait nodes ``pending`` it left
    with nothing upstream. Returns those of ``queued`` still queued, to publish; a
    pending node that runs enters its wait (established, in ``outcome``); for the others
    (skipped, failed) their dependents follow their triggers and the execution finishes
    if that left nothing open, here (``outcome``)."""
    kept: list[tuple[str, str]] = []
    ended: dict[str, list[tuple[str, str]]] = {}
    waited: set[str] = set()
    judged = [(eid, name, StepStatus.QUEUED) for eid, name in queued]
    judged += [(eid, name, StepStatus.PENDING) for eid, name in pending]
    for execution_id, name, source in judged:
        if name not in workflow.gated:
            kept.append((execution_id, name))
            continue
        release = _Release(conn, execution_id, workflow, definition_of, outcome, {})
        decided = _decide(release, workflow.steps[name], source)
        if decided == StepStatus.QUEUED.value and source == StepStatus.QUEUED:
            kept.append((execution_id, name))
        elif decided == StepStatus.WAITING.value:
            waited.add(execution_id)
        elif decided in (SKIPPED, FAILED):
            ended.setdefault(execution_id, []).append((name, decided))
    # An execution whose open steps now all wait holds no max_concurrency slot.
    settle(conn, sorted(waited - set(ended)), outcome)
    for execution_id, steps in ended.items():
        release_after(conn, execution_id, workflow, steps, {}, definition_of, outcome)
        # Rare (a root's condition): the finish checks in SQL whether anything is open.
        finished = finish_if_done(conn, execution_id, workflow.sinks)
        if finished is not None:
            outcome.finished.append((finished, workflow.name))
    return kept


def skip_step(
    conn: Connection,
    execution_id: str,
    step_name: str,
    attempt: int,
    error: Mapping[str, Any],
    workflow: Workflow,
    definition_of: DefinitionOf,
) -> tuple[TransitionResult, WaitOutcome]:
    """running -> skipped for a step whose ``Retry(on_exhausted="skip")`` attempts are
    spent, its error kept; then its dependents follow their triggers and the execution
    finishes when nothing is left open: one transaction. Not applied when the step is no
    longer running at ``attempt`` (another outcome was recorded first)."""
    outcome = WaitOutcome()
    skipped = transition_step(
        conn,
        execution_id,
        step_name,
        StepStatus.SKIPPED,
        EXHAUSTED_FROM,
        reason=f"skipped: attempts exhausted after {error.get('type', 'error')} "
        '(on_exhausted="skip")',
        attempt=attempt,
        values={"error": dict(error), "finished_at": utcnow()},
    )
    if not skipped.applied:
        return skipped, outcome
    outcome.skipped.append((workflow.name, step_name, EXHAUSTED))
    if workflow.steps[step_name].limits:
        from core.limits import free_step

        free_step(conn, execution_id, step_name, outcome, definition_of)
    still_open = release_after(
        conn, execution_id, workflow, [(step_name, SKIPPED)], {}, definition_of, outcome
    )
    if not still_open and not outcome.queued:
        finished = finish_if_done(conn, execution_id, workflow.sinks)
        if finished is not None:
            outcome.finished.append((finished, workflow.name))
    return skipped, outcome


def skip_reasons(history: Iterable[Any]) -> dict[str, str]:
    """Why each skipped step was skipped: the reason of its latest transition to
    ``skipped`` in ``history`` (event rows, oldest first), by step name."""
    return {
        e.step_name: e.reason or ""
        for e in history
        if e.step_name is not None and e.to_status == SKIPPED
    }


def _decide(release: _Release, step: Step, source: StepStatus) -> str:
    """Run, skip or fail the gated ``step``, whose upstream steps are all final: the
    status it ends this transaction in (``queued``, ``waiting``, ``skipped``, ``failed``)."""
    conn, execution_id = release.conn, release.execution_id
    rows = (
        conn.execute(
            condition_statements().upstream,
            {"eid": execution_id, "names": list(step.depends_on)},
        ).all()
        if step.depends_on
        else []
    )
    statuses = {r.step_name: r.status for r in rows}
    outputs = {r.step_name: r.output_data if r.status == SUCCEEDED else None for r in rows}
    refused = _refused_by_trigger(step, statuses)
    if refused is not None:
        return _skip_one(release, step, source, refused, UPSTREAM)
    if step.when is not None:
        execution = release.read()
        label = condition_label(step.when)
        try:
            verdict = step.when(context_of(execution, step, 1), **_named(step.when, outputs))
        except Exception as error:
            log.warning("condition of step %s/%s raised: %s", execution_id, step.name, error)
            transition_step(
                conn,
                execution_id,
                step.name,
                StepStatus.FAILED,
                FAIL_FROM,
                reason=f"condition raised: {type(error).__name__} in when({label})",
                values={"error": wait_error(error), "finished_at": utcnow()},
            )
            return FAILED
        if not verdict:
            reason = f"condition false: when({label}) of {step.name}"
            return _skip_one(release, step, source, reason, CONDITION)
    release.opened = True
    if source == StepStatus.QUEUED:
        return StepStatus.QUEUED.value  # queued by the admission, published by its caller
    if step.wait_kind is None:  # a task step with no limits: queued to run
        transition_step(
            conn,
            execution_id,
            step.name,
            StepStatus.QUEUED,
            FROM_PENDING,
            reason=RELEASED,
            values={"queued_at": utcnow()},
        )
        release.read()
        release.outcome.queued.append((execution_id, step.name))
        return StepStatus.QUEUED.value
    entered = conn.execute(
        sql.transition_steps(
            execution_id,
            [step.name],
            StepStatus.WAITING,
            WAIT_FROM,
            values={"waiting_since": utcnow()},
        )
    ).all()
    if entered:
        conn.execute(hot_path(conn.dialect.name).events, [event_row(r, RELEASED) for r in entered])
        establish(
            conn, release.read(), entered, release.known, release.definition_of, release.outcome
        )
    return StepStatus.WAITING.value


def _refused_by_trigger(step: Step, statuses: Mapping[str, str]) -> str | None:
    """Why the trigger keeps ``step`` from running (its upstream steps' final
    statuses), or None when it may run."""
    for name in step.depends_on:
        status = statuses.get(name, SKIPPED)
        if status == SUCCEEDED:
            continue
        if isinstance(step.wait, MapSpec) and name == step.wait.over:
            return f"upstream step {name} {status}: no list to map"
        if step.trigger == "all_success" or (step.trigger == "none_failed" and status == FAILED):
            return f"upstream step {name} {status} (trigger {step.trigger})"
    return None


def _skip_one(release: _Release, step: Step, source: StepStatus, reason: str, why: str) -> str:
    result = transition_step(
        release.conn,
        release.execution_id,
        step.name,
        StepStatus.SKIPPED,
        SKIP_FROM[source],
        reason=reason,
        values={"finished_at": utcnow()},
    )
    if result.applied:
        _count_skip(release, step.name, why)
    return SKIPPED


def _skip(conn: Connection, execution_id: str, names: Sequence[str], reason: str) -> list[str]:
    """pending -> skipped for each of ``names`` still pending; the names moved."""
    if not names:
        return []
    moved = transition_steps(
        conn,
        execution_id,
        list(names),
        StepStatus.SKIPPED,
        SKIP_FROM[StepStatus.PENDING],
        reason=reason,
    )
    return sorted(r.step_name or "" for r in moved)


def _count_skip(release: _Release, step_name: str, why: str) -> None:
    release.outcome.skipped.append((release.workflow.name, step_name, why))


def _named(when: Callable[..., Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
    """The upstream outputs ``when`` takes: those it names, or all with ``**upstream``."""
    parameters = list(inspect.signature(when).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(outputs)
    return {p.name: outputs.get(p.name) for p in parameters if p.name in outputs}


def condition_label(function: Callable[..., Any] | None) -> str | None:
    """How a condition is named in events and listings: its ``__qualname__`` (None for
    no condition)."""
    if function is None:
        return None
    return str(getattr(function, "__qualname__", None) or repr(function))
