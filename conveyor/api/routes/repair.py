"""Repairing an execution: resolve a failed step with an output, or skip it, and the
execution goes on from there (``core.repair``). Allowed to admins and to the user who
triggered the execution (anyone else gets 404, as if it did not exist); recorded in its
history with the caller's email and reason."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import Field

from conveyor.api import problems
from conveyor.api.auth import Caller
from conveyor.api.schemas import NO_NUL, ExecutionOut, PathId, Reason, Strict
from conveyor.api.services import Conveyor
from core.accounts import Principal
from core.errors import ExecutionNotFound

router = APIRouter(
    prefix="/executions", tags=["executions"], responses=problems.responses(401, 503)
)

StepPath = Annotated[str, Path(min_length=1, max_length=200, pattern=NO_NUL)]


class ResolveRequest(Strict):
    """The output a failed step is given, and why."""

    output: Any = Field(
        description="The step's output: checked against its return annotation (422 naming "
        "`output.<field>` when it does not fit)."
    )
    reason: Reason | None = Field(default=None, description="Recorded in the history.")


class SkipRequest(Strict):
    """Why a failed step is skipped."""

    reason: Reason | None = Field(default=None, description="Recorded in the history.")


def _owned(conveyor: Conveyor, execution_id: str, caller: Principal) -> None:
    execution = conveyor.engine.manager.get_execution(execution_id)
    if not caller.is_admin and execution.triggered_by != caller.user_id:
        raise ExecutionNotFound(execution_id)


@router.post(
    "/{execution_id}/steps/{step}/resolve",
    response_model=ExecutionOut,
    responses=problems.responses(400, 404, 409, 413, 422),
)
def resolve_step(
    execution_id: PathId, step: StepPath, body: ResolveRequest, caller: Caller, conveyor: Conveyor
) -> ExecutionOut:
    """Complete a failed step of an ended execution with `output` and go on from there:
    its dependents run with it (the execution's other unfinished steps run again, as in
    a retry). 409 when the step is not failed or the execution has not ended."""
    _owned(conveyor, execution_id, caller)
    conveyor.engine.resolve(execution_id, step, body.output, actor=caller.email, reason=body.reason)
    return ExecutionOut.of(conveyor.engine.manager.get_execution(execution_id))


@router.post(
    "/{execution_id}/steps/{step}/skip",
    response_model=ExecutionOut,
    responses=problems.responses(400, 404, 409, 413, 422),
)
def skip_step(
    execution_id: PathId,
    step: StepPath,
    caller: Caller,
    conveyor: Conveyor,
    body: SkipRequest | None = None,
) -> ExecutionOut:
    """Skip a failed step of an ended execution and go on from there: its `all_success`
    dependents are skipped, `none_failed` and `all_done` ones run. 409 as for resolve."""
    _owned(conveyor, execution_id, caller)
    reason = body.reason if body is not None else None
    conveyor.engine.skip(execution_id, step, actor=caller.email, reason=reason)
    return ExecutionOut.of(conveyor.engine.manager.get_execution(execution_id))
