"""Retention: finished executions deleted once past their workflow's retention, with
their steps, map items and history (the foreign keys' ON DELETE CASCADE) and the inbox
events they consumed; and their payloads (inputs, outputs, errors) cleared sooner when
``Retention(payloads=)`` says so, their skeleton (statuses, timings, history) kept.

Each batch is one short transaction over at most ``CONVEYOR_PRUNE_BATCH`` (<= 5,000)
executions of one workflow and status class, oldest first, taken with ``FOR UPDATE SKIP
LOCKED`` on PostgreSQL: overlapping passes take disjoint rows, a row another
transaction holds (a retry, a repair) is left for the next pass, and the status is
checked again under the lock, so an execution that is not final is never touched.
Deleting an execution frees its idempotency key: an enqueue with that key afterwards
creates a new execution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Select, delete, func, select, text, update

from core.config import Settings
from core.models import InboxEvent, MapItem, StepExecution, WorkflowExecution
from core.sql import utcnow
from core.states import ExecutionStatus
from core.workflows import FOREVER, Keep, Retention, Workflow

WE = WorkflowExecution.__table__.c
SE = StepExecution.__table__.c
MI = MapItem.__table__.c
IE = InboxEvent.__table__.c

SUCCEEDED = (ExecutionStatus.SUCCEEDED.value,)
NOT_SUCCEEDED = (
    ExecutionStatus.FAILED.value,
    ExecutionStatus.CANCELLED.value,
    ExecutionStatus.TIMED_OUT.value,
)
FINAL = SUCCEEDED + NOT_SUCCEEDED


@dataclass(frozen=True)
class Policy:
    """A workflow's effective retention (None: keep forever)."""

    succeeded: timedelta | None
    failed: timedelta | None
    payloads: timedelta | None


def _effective(given: Keep, default: timedelta | None) -> timedelta | None:
    if given is None:
        return default
    if given == FOREVER:
        return None
    assert isinstance(given, timedelta)
    return given


def policy_of(retention: Retention, settings: Settings) -> Policy:
    """``retention`` with the settings filling what it leaves to them."""
    return Policy(
        _effective(retention.succeeded, settings.retention_succeeded),
        _effective(retention.failed, settings.retention_failed),
        _effective(retention.payloads, settings.retention_payloads),
    )


def policies(workflows: Iterable[Workflow], settings: Settings) -> dict[str, Policy]:
    """Each registered workflow's policy (the newest version's, by name)."""
    newest: dict[str, Workflow] = {}
    for workflow in workflows:
        if workflow.name not in newest or workflow.version > newest[workflow.name].version:
            newest[workflow.name] = workflow
    return {name: policy_of(w.retention, settings) for name, w in newest.items()}


def workflow_names(conn: Connection) -> list[str]:
    """The workflows executions exist of: a skip scan over the leading column of
    ix_workflow_executions_workflow_finished (one index probe a workflow, not a scan of
    a million rows)."""
    query = text(
        """
        WITH RECURSIVE names(name) AS (
            SELECT min(workflow_id) FROM workflow_executions
            UNION ALL
            SELECT (SELECT min(workflow_id) FROM workflow_executions WHERE workflow_id > name)
              FROM names WHERE name IS NOT NULL
        )
        SELECT name FROM names WHERE name IS NOT NULL
        """
    )
    return [row.name for row in conn.execute(query)]


def _eligible(
    workflow: str, statuses: Sequence[str], cutoff: datetime, payloads: bool
) -> Select[Any]:
    query = select(WE.execution_id).where(
        WE.workflow_id == workflow,
        WE.status.in_(statuses),
        WE.finished_at < cutoff,
    )
    if payloads:
        query = query.where(WE.payloads_cleared_at.is_(None))
    return query


def count_eligible(
    conn: Connection, workflow: str, statuses: Sequence[str], cutoff: datetime, payloads: bool
) -> int:
    """How many executions a pass would delete (or clear): ``conveyor prune --dry-run``."""
    inner = _eligible(workflow, statuses, cutoff, payloads).subquery()
    return int(conn.execute(select(func.count()).select_from(inner)).scalar_one())


def _take(
    conn: Connection,
    workflow: str,
    statuses: Sequence[str],
    cutoff: datetime,
    batch: int,
    payloads: bool,
) -> list[str]:
    """Lock up to ``batch`` eligible executions, oldest end first (PostgreSQL: skipping
    those another transaction holds; the WHERE is checked again on each row locked)."""
    query = _eligible(workflow, statuses, cutoff, payloads).order_by(WE.finished_at).limit(batch)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(conn.execute(query).scalars())


def delete_batch(conn: Connection, workflow: str, status: str, cutoff: datetime, batch: int) -> int:
    """Delete one batch of ``workflow``'s executions in ``status`` that ended before
    ``cutoff`` with everything of theirs; how many."""
    ids = _take(conn, workflow, (status,), cutoff, batch, payloads=False)
    if not ids:
        return 0
    # Consumed inbox events name their execution without a foreign key (the audit of
    # who took an event): they go with it. Steps, items and history cascade.
    conn.execute(delete(InboxEvent).where(IE.consumed_by_execution.in_(ids)))
    conn.execute(delete(WorkflowExecution).where(WE.execution_id.in_(ids)))
    return len(ids)


def clear_batch(conn: Connection, workflow: str, status: str, cutoff: datetime, batch: int) -> int:
    """Clear the payloads of one batch of ``workflow``'s executions in final ``status``
    that ended before ``cutoff``: inputs, outputs and errors of the execution, its steps
    and items, and the payloads of the inbox events it consumed; how many."""
    ids = _take(conn, workflow, (status,), cutoff, batch, payloads=True)
    if not ids:
        return 0
    conn.execute(
        update(WorkflowExecution)
        .where(WE.execution_id.in_(ids))
        .values(input_data=None, output_data=None, error=None, payloads_cleared_at=utcnow())
    )
    conn.execute(
        update(StepExecution).where(SE.execution_id.in_(ids)).values(output_data=None, error=None)
    )
    conn.execute(
        update(MapItem).where(MI.execution_id.in_(ids)).values(output_data=None, error=None)
    )
    conn.execute(update(InboxEvent).where(IE.consumed_by_execution.in_(ids)).values(payload=None))
    return len(ids)


@dataclass
class Pruned:
    """What one workflow's part of a pass did (or, dry, would do)."""

    workflow: str
    what: str  # "succeeded", "failed" (with cancelled and timed out) or "payloads"
    cutoff: datetime
    count: int = 0
    batches: list[int] = field(default_factory=list)


@dataclass
class PruneReport:
    """A retention pass: each workflow's deletions and clearings."""

    parts: list[Pruned] = field(default_factory=list)
    dry_run: bool = False
    # Whether it stopped at CONVEYOR_PRUNE_MAX_BATCHES with work left (the next goes on).
    capped: bool = False

    def total(self, what: str | None = None) -> int:
        """Executions deleted (``what``: one kind, "payloads" for clearings)."""
        return sum(p.count for p in self.parts if what is None or p.what == what)


Run = Callable[..., Any]


def prune(
    run: Run,
    workflows: Iterable[Workflow],
    settings: Settings,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> PruneReport:
    """One retention pass: every workflow executions exist of, by its policy (the
    settings' for a workflow this process does not know), in batches of at most
    ``settings.prune_batch``, each its own transaction through ``run`` (the state
    manager's, which retries a transient error); at most ``prune_max_batches``."""
    known = policies(workflows, settings)
    default = policy_of(Retention(), settings)
    moment = now or datetime.now(UTC)
    report = PruneReport(dry_run=dry_run)
    budget = settings.prune_max_batches
    for workflow in run(workflow_names):
        policy = known.get(workflow, default)
        # One status at a time: each batch is then one range of the index (workflow,
        # status, finished_at) read in order, never a sort of all that is eligible.
        plan = [("succeeded", status, policy.succeeded, False) for status in SUCCEEDED]
        plan += [("failed", status, policy.failed, False) for status in NOT_SUCCEEDED]
        plan += [("payloads", status, policy.payloads, True) for status in FINAL]
        for what, status, keep, payloads in plan:
            if keep is None:
                continue
            part = Pruned(workflow, what, moment - keep)
            report.parts.append(part)
            if dry_run:
                part.count = run(count_eligible, workflow, (status,), part.cutoff, payloads)
                continue
            while True:
                if budget == 0:
                    report.capped = True
                    report.parts = _merged(report.parts, dry_run)
                    return report
                if payloads:
                    done = run(clear_batch, workflow, status, part.cutoff, settings.prune_batch)
                else:
                    done = run(delete_batch, workflow, status, part.cutoff, settings.prune_batch)
                if done:
                    # The bound counts batches that removed something: finding nothing
                    # to do for a workflow costs one probe of the index, no budget.
                    budget -= 1
                    part.count += done
                    part.batches.append(done)
                if done < settings.prune_batch:
                    break
                # More to do: rest, so that a backlog leaves the database to the steps.
                time.sleep(settings.prune_pause)
    report.parts = _merged(report.parts, dry_run)
    return report


def _merged(parts: list[Pruned], dry_run: bool) -> list[Pruned]:
    """One part per (workflow, what), its statuses' counts and batches together."""
    merged: dict[tuple[str, str], Pruned] = {}
    for part in parts:
        into = merged.setdefault(
            (part.workflow, part.what), Pruned(part.workflow, part.what, part.cutoff)
        )
        into.count += part.count
        into.batches += part.batches
    return [p for p in merged.values() if p.count or dry_run]


def described(policy: Policy) -> Mapping[str, float | None]:
    """A policy in seconds (None: forever): what the API and dashboard show."""
    return {
        "succeeded": None if policy.succeeded is None else policy.succeeded.total_seconds(),
        "failed": None if policy.failed is None else policy.failed.total_seconds(),
        "payloads": None if policy.payloads is None else policy.payloads.total_seconds(),
    }
