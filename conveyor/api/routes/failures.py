"""Failures grouped (``core.failures``): failed steps that are the same failure, with
their count, first and last time and an example; a group's members; retrying or
resolving a whole group, a page at a time, idempotently.

A member sees the groups over their own executions (counted over those) and acts on
those only; an admin sees and acts on everyone's.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field

from conveyor.api import problems
from conveyor.api.auth import Caller, owner_filter
from conveyor.api.schemas import NO_NUL, Reason, Strict, Timestamp
from conveyor.api.services import Conveyor
from core import failures

router = APIRouter(prefix="/failures", tags=["failures"], responses=problems.responses(401, 503))

GroupPath = Annotated[str, Path(min_length=1, max_length=16, pattern=r"^[0-9a-f]+$")]


class FailureGroupOut(BaseModel):
    """Failed steps that are one failure."""

    group: str = Field(description="The group's id: a digest of what follows.")
    workflow: str
    step: str
    error_type: str
    message: str = Field(description="The error's message, its varying parts replaced.")
    count: int = Field(description="Failed steps in the group now.")
    first_seen: datetime | None
    last_seen: datetime | None
    example_execution_id: str


class MemberOut(BaseModel):
    """A failed step of a group."""

    execution_id: str
    workflow: str
    step: str
    failed_at: datetime | None


class MemberPage(BaseModel):
    """A page of a group's members, by execution id."""

    items: list[MemberOut]
    next_after: str | None = Field(description="Pass as `after` for the next page (null: done).")


class BulkRequest(Strict):
    """Which members a bulk action takes, a page at a time."""

    as_of: Timestamp | None = Field(
        default=None,
        description="Only steps that failed at or before this (default: now). Send the "
        "`as_of` of the first answer with each later call: a step that fails again after "
        "it is not acted on twice.",
    )
    limit: int = Field(default=500, ge=1, le=1000, description="Members acted on this call.")


class ResolveGroupRequest(BulkRequest):
    """The output every member's step is given, and why."""

    output: Any = Field(description="Checked against the step's return annotation (422).")
    reason: Reason | None = None


class BulkOut(BaseModel):
    """What one call of a bulk action did."""

    applied: int = Field(description="Executions retried or steps resolved by this call.")
    remaining: int = Field(description="Members left (failed at or before `as_of`): call again.")
    as_of: datetime


@router.get("", response_model=list[FailureGroupOut], responses=problems.responses(422))
def list_failures(
    caller: Caller,
    conveyor: Conveyor,
    workflow: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NO_NUL)] = None,
    since: Annotated[Timestamp | None, Query(description="Failures since this time.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[FailureGroupOut]:
    """The failure groups, most failed steps first, then the latest."""
    found = conveyor.engine.manager.run(
        failures.failure_groups,
        owner=owner_filter(caller),
        workflow=workflow,
        since=since,
        limit=limit,
        offset=offset,
    )
    return [FailureGroupOut(**vars(group)) for group in found]


@router.get("/{group}", response_model=MemberPage, responses=problems.responses(422))
def list_members(
    group: GroupPath,
    caller: Caller,
    conveyor: Conveyor,
    after: Annotated[str | None, Query(max_length=36, pattern=NO_NUL)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> MemberPage:
    """The group's failed steps, by execution id (``after``: the last of the page before)."""
    found = conveyor.engine.manager.run(
        failures.members, group, owner=owner_filter(caller), after=after, limit=limit
    )
    items = [
        MemberOut(
            execution_id=m.execution_id, workflow=m.workflow, step=m.step, failed_at=m.finished_at
        )
        for m in found
    ]
    return MemberPage(
        items=items, next_after=found[-1].execution_id if len(found) == limit else None
    )


@router.post("/{group}/retry", response_model=BulkOut, responses=problems.responses(400, 413, 422))
def retry_group(
    group: GroupPath, caller: Caller, conveyor: Conveyor, body: BulkRequest | None = None
) -> BulkOut:
    """Retry the executions of the group's failed steps (at most ``limit`` a call; the
    answer says how many remain). Sent twice with the same ``as_of``, each execution is
    retried once."""
    body = body or BulkRequest()
    as_of = body.as_of or datetime.now(UTC)
    done = conveyor.engine.retry_group(
        group, as_of=as_of, limit=body.limit, owner=owner_filter(caller)
    )
    return BulkOut(applied=done.applied, remaining=done.remaining, as_of=done.as_of)


@router.post(
    "/{group}/resolve", response_model=BulkOut, responses=problems.responses(400, 413, 422)
)
def resolve_group(
    group: GroupPath, body: ResolveGroupRequest, caller: Caller, conveyor: Conveyor
) -> BulkOut:
    """Resolve the group's failed steps with ``output`` (each execution goes on from
    there), at most ``limit`` a call; idempotent as retry."""
    as_of = body.as_of or datetime.now(UTC)
    done = conveyor.engine.resolve_group(
        group,
        body.output,
        actor=caller.email,
        reason=body.reason,
        as_of=as_of,
        limit=body.limit,
        owner=owner_filter(caller),
    )
    return BulkOut(applied=done.applied, remaining=done.remaining, as_of=done.as_of)
