"""Executions: enqueue, read (with steps, history and children), list by keyset pages,
cancel, retry; signal an event wait, wake a sleep.

A member sees and acts on the executions they triggered; others' answer 404, as if
they did not exist. Admins see all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response, status
from sqlalchemy import Connection, select

from conveyor.api import problems
from conveyor.api.auth import Caller, owner_filter
from conveyor.api.schemas import (
    KEY_WAIT,
    NO_NUL,
    CancelRequest,
    ChildOut,
    EventOut,
    EventReceiptOut,
    ExecutionCreate,
    ExecutionDetail,
    ExecutionOut,
    ExecutionPage,
    ItemOut,
    ItemPage,
    PathId,
    RetryRequest,
    SignalCreate,
    StepOut,
    Timestamp,
)
from conveyor.api.services import Conveyor
from core import executions, limits, maps
from core.accounts import Principal
from core.conditions import skip_reasons
from core.errors import (
    DebouncedIdempotencyKey,
    ExecutionNotFound,
    FieldError,
    InputValidationError,
    InvalidTransition,
    NotFound,
    ReservedIdempotencyKey,
    StepNotFound,
    WorkflowNotFound,
)
from core.executions import ExecutionFilter, ListedStatus, listed_statuses
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from core.states import ExecutionStatus
from worker.producer import signal, submit_many, wake

router = APIRouter(
    prefix="/executions", tags=["executions"], responses=problems.responses(401, 503)
)


StepName = Annotated[str, Path(max_length=200, pattern=NO_NUL)]
WE = WorkflowExecution


def _in_input(field: str) -> str:
    return "input" if field == "(input)" else f"input.{field}"


def _visible(execution: WorkflowExecution, caller: Principal) -> WorkflowExecution:
    if not caller.is_admin and execution.triggered_by != caller.user_id:
        raise ExecutionNotFound(execution.execution_id)
    return execution


def children_of(conn: Connection, execution_id: str) -> list[ChildOut]:
    # The partial index on parent_execution_id: its children, oldest first.
    query = (
        select(WE.execution_id, WE.workflow_id, WE.status, WE.parent_step_name)
        .where(WE.parent_execution_id == execution_id)
        .order_by(WE.created_at, WE.execution_id)
    )
    return [
        ChildOut(execution_id=row[0], workflow=row[1], status=row[2], step=row[3])
        for row in conn.execute(query)
    ]


def key_pauses(conn: Connection, steps: list[StepExecution]) -> dict[str, datetime | None]:
    """The pause of each key holding one of ``steps`` back (read only when one is held)."""
    keys = sorted(
        {
            s.wait_key
            for s in steps
            if s.status == "waiting" and s.wait_kind == KEY_WAIT and s.wait_key is not None
        }
    )
    if not keys:
        return {}
    return {state.key: state.paused_until for state in limits.key_states(conn, keys)}


Detail = tuple[
    WorkflowExecution,
    list[StepExecution],
    list[ExecutionEvent],
    list[ChildOut],
    dict[str, dict[str, int]],
    dict[str, datetime | None],
]


def _detail(conn: Connection, execution_id: str) -> Detail:
    # One transaction, so steps and history are of the same moment as the execution.
    steps = executions.get_steps(conn, execution_id)
    return (
        executions.get_execution(conn, execution_id),
        steps,
        executions.get_history(conn, execution_id),
        children_of(conn, execution_id),
        maps.map_counts_of(conn, execution_id),
        key_pauses(conn, steps),
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ExecutionOut,
    responses={
        200: {
            "model": ExecutionOut,
            "description": (
                "The idempotency key's execution, or the pending execution of the debounce "
                "window that took this input."
            ),
        },
        **problems.responses(400, 403, 409, 413, 422),
    },
)
def enqueue(
    body: ExecutionCreate, caller: Caller, conveyor: Conveyor, response: Response
) -> ExecutionOut:
    """Validate the input, commit a pending execution and publish its start.

    Idempotency keys are the caller's own: another user's key of the same name is
    neither found nor a conflict, and keys beginning ``schedule:`` are refused (422).
    A debounced workflow's input goes to the open window of its key (the caller's own,
    as keys are): 201 when it opened one, 200 when an open one took it; either is
    pending until ``start_at``.
    """
    try:
        (created,) = submit_many(
            body.workflow,
            [body.input],
            idempotency_keys=[body.idempotency_key],
            priority=body.priority,
            deadline=body.deadline,
            triggered_by=caller.user_id,
            app=conveyor.celery_app,
            idempotency_scope=caller.user_id,
        )
    except WorkflowNotFound as error:
        raise InputValidationError(
            str(error), [{"field": "workflow", "message": str(error)}]
        ) from None
    except (ReservedIdempotencyKey, DebouncedIdempotencyKey):
        raise  # names the request's own field, idempotency_key
    except InputValidationError as error:
        # The workflow's own checks name fields of the input: say where they are.
        fields: list[FieldError] = [
            {"field": _in_input(e["field"]), "message": e["message"]} for e in error.errors
        ]
        raise InputValidationError(
            str(error), fields or [{"field": "input", "message": str(error)}]
        ) from None
    if not created.created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/executions/{created.execution_id}"
    execution = conveyor.engine.manager.run(executions.get_execution, created.execution_id)
    return ExecutionOut.of(execution)


@router.get("", response_model=ExecutionPage, responses=problems.responses(422))
def list_executions(
    caller: Caller,
    conveyor: Conveyor,
    status_: Annotated[
        list[ListedStatus] | None,
        Query(
            alias="status",
            description=(
                "Any of these statuses (repeat the parameter). `waiting` is no column "
                "value: the running executions whose every open step waits (parked)."
            ),
        ),
    ] = None,
    workflow: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NO_NUL)] = None,
    created_after: Annotated[Timestamp | None, Query(description="Inclusive.")] = None,
    created_before: Annotated[Timestamp | None, Query(description="Exclusive.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500, pattern=NO_NUL)] = None,
) -> ExecutionPage:
    """Executions newest first, a page at a time: rows inserted meanwhile never make a
    later page repeat or skip one."""
    statuses, waiting = listed_statuses(status_) if status_ else (None, False)
    where = ExecutionFilter(
        statuses=statuses,
        waiting=waiting,
        workflow_id=workflow,
        triggered_by=owner_filter(caller),
        created_after=created_after,
        created_before=created_before,
    )
    page = conveyor.engine.manager.run(executions.page_executions, where, limit, cursor)
    return ExecutionPage(
        items=[ExecutionOut.of(e) for e in page.items], next_cursor=page.next_cursor
    )


@router.get(
    "/{execution_id}", response_model=ExecutionDetail, responses=problems.responses(404, 422)
)
def read_execution(execution_id: PathId, caller: Caller, conveyor: Conveyor) -> ExecutionDetail:
    """An execution, its steps (what each waiting one waits for), every transition it
    went through, and the child executions its child nodes started."""
    engine = conveyor.engine
    execution, steps, events, children, items, pauses = engine.manager.run(_detail, execution_id)
    _visible(execution, caller)
    route = (execution.workflow_id, execution.workflow_version)
    why = skip_reasons(events)
    # In DAG order, as `conveyor status` lists them (by name where the definition is
    # unknown here).
    definition = engine.definition(*route)
    position = {name: i for i, name in enumerate(definition.order())} if definition else {}
    steps = sorted(steps, key=lambda s: (position.get(s.step_name, len(position)), s.step_name))
    return ExecutionDetail(
        **ExecutionOut.of(execution).model_dump(),
        steps=[
            StepOut.of(
                s,
                items.get(s.step_name),
                engine.queue_of(*route, s.step_name),
                why.get(s.step_name),
                pauses,
            )
            for s in steps
        ],
        events=[EventOut.of(e) for e in events],
        children=children,
    )


@router.post(
    "/{execution_id}/cancel",
    response_model=ExecutionOut,
    responses=problems.responses(400, 403, 404, 409, 413, 422),
)
def cancel_execution(
    execution_id: PathId,
    caller: Caller,
    conveyor: Conveyor,
    body: CancelRequest | None = None,
) -> ExecutionOut:
    """Cancel a pending or running execution (running steps stop when they check);
    cancelling a cancelled one again is a no-op; others are 409."""
    engine = conveyor.engine
    _visible(engine.manager.run(executions.get_execution, execution_id), caller)
    reason = (body or CancelRequest()).reason
    engine.cancel(execution_id, reason=f"{reason} (by {caller.email})")
    execution = engine.manager.run(executions.get_execution, execution_id)
    if execution.status != ExecutionStatus.CANCELLED:
        raise InvalidTransition(
            "execution",
            execution.status,
            ExecutionStatus.CANCELLED,
            "only pending or running executions can be cancelled",
        )
    return ExecutionOut.of(execution)


@router.post(
    "/{execution_id}/retry",
    response_model=ExecutionOut,
    responses=problems.responses(403, 404, 409, 422),
)
def retry_execution(
    execution_id: PathId,
    caller: Caller,
    conveyor: Conveyor,
    body: RetryRequest | None = None,
) -> ExecutionOut:
    """Run a failed, cancelled or timed-out execution again from its unfinished steps.

    It goes back to pending, with a new deadline and every unfinished step's retry
    policy whole again, and starts like a new execution: at once when its workflow has
    a free slot (max_concurrency), by priority otherwise. With ``failed_items``, its
    failed map steps run only their failed and cancelled items again (succeeded items
    keep their outputs); 409 when it has no such items.
    """
    engine = conveyor.engine
    _visible(engine.manager.run(executions.get_execution, execution_id), caller)
    failed_items = (body or RetryRequest()).failed_items
    if not engine.retry(execution_id, failed_items=failed_items):
        current = engine.manager.run(executions.get_execution, execution_id)
        raise InvalidTransition(
            "execution",
            current.status,
            ExecutionStatus.PENDING,
            "only failed, cancelled or timed-out executions can be retried",
        )
    return ExecutionOut.of(engine.manager.run(executions.get_execution, execution_id))


@router.post(
    "/{execution_id}/signals/{step}",
    response_model=EventReceiptOut,
    responses=problems.responses(400, 403, 404, 409, 413, 422),
)
def signal_step(
    execution_id: PathId,
    step: StepName,
    caller: Caller,
    conveyor: Conveyor,
    body: SignalCreate | None = None,
) -> EventReceiptOut:
    """Send ``payload`` to this execution's event wait ``step``: it completes now if it
    waits (``consumed_by``), or takes the signal when it begins waiting. 422 names each
    bad ``payload.<field>`` (nothing stored) or a step that is no event wait; 409 when
    the execution or the step has ended (naming its status)."""
    engine = conveyor.engine
    _visible(engine.manager.run(executions.get_execution, execution_id), caller)
    receipt = signal(
        execution_id,
        step,
        (body or SignalCreate()).payload,
        actor=caller.email,
        app=conveyor.celery_app,
        sent_by=caller.user_id,
    )
    return EventReceiptOut(
        event_id=receipt.event_id, consumed_by=receipt.consumed_by, duplicate=receipt.duplicate
    )


@router.post(
    "/{execution_id}/steps/{step}/wake",
    response_model=StepOut,
    responses=problems.responses(403, 404, 409, 422),
)
def wake_step(execution_id: PathId, step: StepName, caller: Caller, conveyor: Conveyor) -> StepOut:
    """Wake this execution's sleep ``step`` now: it succeeds with the time it woke, and
    its history says who woke it early. 422 for a step that is no sleep; 409 when it is
    not sleeping (naming its status, or the execution's once that has ended)."""
    engine = conveyor.engine
    execution = engine.manager.run(executions.get_execution, execution_id)
    _visible(execution, caller)
    wake(execution_id, step, actor=caller.email, app=conveyor.celery_app)
    woken = next(
        s for s in engine.manager.run(executions.get_steps, execution_id) if s.step_name == step
    )
    queue = engine.queue_of(execution.workflow_id, execution.workflow_version, step)
    return StepOut.of(woken, queue=queue)


ItemStatus = Literal["pending", "queued", "running", "succeeded", "failed", "cancelled"]


@router.get(
    "/{execution_id}/steps/{step}/items",
    response_model=ItemPage,
    responses=problems.responses(404, 422),
)
def list_items(
    execution_id: PathId,
    step: StepName,
    caller: Caller,
    conveyor: Conveyor,
    status: Annotated[ItemStatus | None, Query(description="Only items in this status.")] = None,
    after: Annotated[
        int | None, Query(ge=0, description="The last index of the page before.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> ItemPage:
    """The items of map step ``step``, in index order, with each one's attempt,
    duration and error; 404 for an unknown execution or step, and for a step that is no
    map (it has no items)."""
    engine = conveyor.engine
    _visible(engine.manager.run(executions.get_execution, execution_id), caller)
    found = next(
        (s for s in engine.manager.run(executions.get_steps, execution_id) if s.step_name == step),
        None,
    )
    if found is None:
        raise StepNotFound(execution_id, step)
    if found.wait_kind != "map":
        # The items of a step that is no map do not exist.
        raise NotFound(f"step {step} is a {found.kind}, not a map: it has no items")
    page = engine.manager.run(
        maps.item_page, execution_id, step, status=status, after=after, limit=limit
    )
    return ItemPage(items=[_item(row) for row in page.items], next=page.next)


def _item(row: Any) -> ItemOut:
    duration = (
        (row.finished_at - row.started_at).total_seconds()
        if row.finished_at is not None and row.started_at is not None
        else None
    )
    return ItemOut(
        index=row.item_index,
        status=row.status,
        attempt=row.attempt,
        policy_attempt=row.attempt - row.recoveries,
        worker=row.worker,
        queued_at=row.queued_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        duration_seconds=duration,
        error=row.error,
        output=row.output_data,
    )
