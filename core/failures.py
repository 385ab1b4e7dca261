"""Failures grouped: failed steps that are the same failure, counted together, so that
an operator sees "412 failures are one ConnectionError in load" at a glance and retries
or resolves the whole group in one action.

A failed step's *group* is a digest of its workflow, its step, its error's type and its
error's message *normalised*: what varies between two occurrences of one failure (ids,
numbers, addresses, times, quoted values) replaced by placeholders (``normalised``).
It is stored on the step (``execution_steps.error_group``) by ``backfill``: each
reconciler pass, and every listing first, fill it for the failed steps that have none,
whatever path failed them (the worker, the reconciler's crash and stall recoveries, a
wait's timeout, a child's failure, a map), so that the hot path writes nothing more. A
retried or repaired step leaves its group (it is no longer failed).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, true, update

from core.models import StepExecution, WorkflowExecution
from core.states import StepStatus

SE = StepExecution.__table__.c
WE = WorkflowExecution.__table__.c
FAILED = StepStatus.FAILED.value
MESSAGE_LIMIT = 300
GROUP_DIGITS = 16

# What varies between occurrences of one failure, in the order they are replaced (a
# UUID or a time holds numbers and hex digits: they go first).
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I), "<id>"),
    (
        re.compile(
            r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
        ),
        "<time>",
    ),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "<ip>"),
    (re.compile(r"\b0x[0-9a-f]+\b", re.I), "<hex>"),
    (re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{8,}\b", re.I), "<hex>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    # A number, with a unit after it or not ("30.5s"), but not a name's digits ("step3").
    (re.compile(r"(?<![A-Za-z_\d.])[-+]?\d+(?:\.\d+)?"), "<n>"),
)
_SPACE = re.compile(r"\s+")


def normalised(message: str) -> str:
    """``message`` with its varying parts replaced by placeholders, whitespace collapsed,
    cut at ``MESSAGE_LIMIT`` characters: what one failure's occurrences share."""
    text = message
    for pattern, placeholder in _PATTERNS:
        text = pattern.sub(placeholder, text)
    return _SPACE.sub(" ", text).strip()[:MESSAGE_LIMIT]


def error_parts(error: Any) -> tuple[str, str]:
    """The (type, message) of a stored error (``{"type": ..., "message": ...}``)."""
    if not isinstance(error, dict):
        return "error", "" if error is None else str(error)
    return str(error.get("type") or "error"), str(error.get("message") or "")


def group_of(workflow: str, step: str, error: Any) -> str:
    """The failure group of a failed step of ``workflow`` with stored ``error``."""
    kind, message = error_parts(error)
    key = "\x1f".join((workflow, step, kind, normalised(message)))
    return hashlib.sha256(key.encode()).hexdigest()[:GROUP_DIGITS]


def backfill(conn: Connection, limit: int) -> int:
    """Give up to ``limit`` failed steps without a group theirs; how many it gave."""
    rows = conn.execute(
        select(SE.execution_id, SE.step_name, SE.error, WE.workflow_id)
        .join(WorkflowExecution, WE.execution_id == SE.execution_id)
        .where(SE.status == FAILED, SE.error_group.is_(None))
        .limit(limit)
    ).all()
    if not rows:
        return 0
    conn.execute(
        update(StepExecution)
        .where(
            SE.execution_id == bindparam("eid"),
            SE.step_name == bindparam("name"),
            SE.status == FAILED,
            SE.error_group.is_(None),
        )
        .values(error_group=bindparam("group"))
        .execution_options(synchronize_session=False),
        [
            {
                "eid": r.execution_id,
                "name": r.step_name,
                "group": group_of(r.workflow_id, r.step_name, r.error),
            }
            for r in rows
        ],
    )
    return len(rows)


def backfill_all(conn: Connection, batch: int = 5000) -> int:
    """``backfill`` until no failed step lacks a group (before a listing)."""
    total = 0
    while True:
        done = backfill(conn, batch)
        total += done
        if done < batch:
            return total


@dataclass(frozen=True)
class FailureGroup:
    """Failed steps that are one failure."""

    group: str
    workflow: str
    step: str
    error_type: str
    message: str  # normalised
    count: int
    first_seen: datetime | None
    last_seen: datetime | None
    example_execution_id: str


def _scope(owner: str | None) -> Any:
    """Only ``owner``'s executions (a member), or everyone's (None: an admin)."""
    return WE.triggered_by == owner if owner is not None else true()


def failure_groups(
    conn: Connection,
    *,
    owner: str | None = None,
    workflow: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[FailureGroup]:
    """The failure groups, most failures first (then the latest), each with its count,
    first and last failure and an example execution; ``owner`` limits them to that
    user's executions, ``since`` to failures since then."""
    backfill_all(conn)
    conditions = [SE.status == FAILED, _scope(owner)]
    if workflow is not None:
        conditions.append(WE.workflow_id == workflow)
    if since is not None:
        conditions.append(SE.finished_at >= since)
    count = func.count().label("failures")
    last = func.max(SE.finished_at).label("last_seen")
    rows = conn.execute(
        select(
            SE.error_group,
            WE.workflow_id,
            SE.step_name,
            count,
            func.min(SE.finished_at).label("first_seen"),
            last,
            func.max(SE.execution_id).label("example"),
        )
        .join(WorkflowExecution, WE.execution_id == SE.execution_id)
        .where(*conditions)
        .group_by(SE.error_group, WE.workflow_id, SE.step_name)
        .order_by(count.desc(), last.desc(), SE.error_group)
        .limit(limit)
        .offset(offset)
    ).all()
    examples = {
        (r.execution_id, r.step_name): r.error
        for r in conn.execute(
            select(SE.execution_id, SE.step_name, SE.error).where(
                SE.execution_id.in_([row.example for row in rows])
            )
        )
    }
    found = []
    for row in rows:
        kind, message = error_parts(examples.get((row.example, row.step_name)))
        found.append(
            FailureGroup(
                group=row.error_group,
                workflow=row.workflow_id,
                step=row.step_name,
                error_type=kind,
                message=normalised(message),
                count=row.failures,
                first_seen=row.first_seen,
                last_seen=row.last_seen,
                example_execution_id=row.example,
            )
        )
    return found


@dataclass(frozen=True)
class BulkAction:
    """One page of a failure group's retry or resolve: how many it applied, how many
    members (failed at or before ``as_of``) remain for the next call."""

    applied: int
    remaining: int
    as_of: datetime


@dataclass(frozen=True)
class Member:
    """A failed step of a group."""

    execution_id: str
    workflow: str
    step: str
    finished_at: datetime | None


def members(
    conn: Connection,
    group: str,
    *,
    owner: str | None = None,
    as_of: datetime | None = None,
    after: str | None = None,
    limit: int = 100,
) -> list[Member]:
    """The failed steps of ``group`` (failed at or before ``as_of``), by execution id
    after ``after``: a page of at most ``limit``."""
    backfill_all(conn)
    conditions = [SE.status == FAILED, SE.error_group == group, _scope(owner)]
    if as_of is not None:
        conditions.append(SE.finished_at <= as_of)
    if after is not None:
        conditions.append(SE.execution_id > after)
    rows = conn.execute(
        select(SE.execution_id, WE.workflow_id, SE.step_name, SE.finished_at)
        .join(WorkflowExecution, WE.execution_id == SE.execution_id)
        .where(*conditions)
        .order_by(SE.execution_id)
        .limit(limit)
    ).all()
    return [Member(r.execution_id, r.workflow_id, r.step_name, r.finished_at) for r in rows]


def group_count(conn: Connection) -> int:
    """How many failure groups there are now (the gauge)."""
    groups = select(SE.error_group).where(SE.status == FAILED).group_by(SE.error_group).subquery()
    return int(conn.execute(select(func.count()).select_from(groups)).scalar_one())


def member_count(
    conn: Connection, group: str, *, owner: str | None = None, as_of: datetime | None = None
) -> int:
    """How many failed steps ``group`` holds (failed at or before ``as_of``)."""
    conditions = [SE.status == FAILED, SE.error_group == group, _scope(owner)]
    if as_of is not None:
        conditions.append(SE.finished_at <= as_of)
    query = (
        select(func.count())
        .select_from(StepExecution)
        .join(WorkflowExecution, WE.execution_id == SE.execution_id)
        .where(*conditions)
    )
    return int(conn.execute(query).scalar_one())
