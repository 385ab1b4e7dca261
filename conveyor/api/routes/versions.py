"""Versions: the workflow shapes recorded across deploys and what uses each; what the
API's own code could not finish (a deploy check); moving an execution to that code.

Listing is open to any user: a shape is part of the deployed code, and its counts name
no execution. The check names executions and migrating rewrites one: admins only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from conveyor.api import problems
from conveyor.api.auth import Admin, Caller
from conveyor.api.schemas import NO_NUL, ExecutionOut, PathId
from conveyor.api.services import Conveyor
from core import shapes
from core.shapes import shape_of

router = APIRouter(tags=["versions"], responses=problems.responses(401, 503))


class ShapeOut(BaseModel):
    """A workflow's shape (its steps, edges and contracts, hashed) and what uses it."""

    shape: str = Field(description="The shape's hash.")
    workflow: str
    version: int
    recorded_at: datetime
    current: bool = Field(description="Whether it is the API's own code's shape.")
    open_executions: int = Field(description="Pending or running executions begun with it.")
    held_steps: int = Field(
        description="Their steps handed back, waiting for a worker with a compatible shape."
    )
    live_workers: int = Field(description="Workers up now whose code has this shape.")


class StrandedOut(BaseModel):
    """An open execution that the API's code could not finish, and why."""

    execution_id: str
    workflow: str
    shape: str | None
    status: str
    reason: str


@router.get("/versions", response_model=list[ShapeOut], responses=problems.responses(422))
def list_versions(
    _: Caller,
    conveyor: Conveyor,
    workflow: Annotated[
        str | None,
        Query(min_length=1, max_length=200, pattern=NO_NUL, description="Only this workflow."),
    ] = None,
) -> list[ShapeOut]:
    """Every recorded shape by workflow, oldest first, with its open executions, their
    held steps and the live workers that run it."""
    engine = conveyor.engine
    uses = engine.manager.run(shapes.shape_uses, engine.settings.stall_timeout, workflow)
    current = {shape_of(w).hash for w in engine.registry}
    return [
        ShapeOut(
            shape=u.shape_hash,
            workflow=u.workflow,
            version=u.version,
            recorded_at=u.created_at,
            current=u.shape_hash in current,
            open_executions=u.open_executions,
            held_steps=u.held_steps,
            live_workers=u.live_workers,
        )
        for u in uses
    ]


@router.get("/versions/check", response_model=list[StrandedOut])
def check_versions(_: Admin, conveyor: Conveyor) -> list[StrandedOut]:
    """The open executions the API's code could not finish (``conveyor versions check``
    run with the API's release): empty when a deploy of this code strands nothing."""
    engine = conveyor.engine
    current = {(w.name, w.version): shape_of(w) for w in engine.registry}
    found = engine.manager.run(shapes.stranded, current, {name for name, _ in current})
    return [
        StrandedOut(
            execution_id=s.execution_id,
            workflow=s.workflow,
            shape=s.shape,
            status=s.status,
            reason=s.reason,
        )
        for s in found
    ]


@router.post(
    "/executions/{execution_id}/migrate",
    response_model=ExecutionOut,
    responses=problems.responses(404, 409, 422),
    tags=["executions"],
)
def migrate_execution(execution_id: PathId, caller: Admin, conveyor: Conveyor) -> ExecutionOut:
    """Move an open execution to the API's code's shape of its workflow: steps that
    code no longer has are removed, steps it adds are created, and its steps handed back
    run (409 for an execution that is not open)."""
    engine = conveyor.engine
    execution = engine.manager.get_execution(execution_id)
    # The newest version this code has (WorkflowNotFound, a 404, when it has none).
    workflow = engine.registry.get(execution.workflow_id)
    engine.migrate(execution_id, workflow, actor=caller.email)
    return ExecutionOut.of(engine.manager.get_execution(execution_id))
