"""Events: send one to whichever execution waits for it (``wf.wait``), now or later.

Admins only: an event belongs to no execution, so a member who guessed a key could
complete a wait of someone else's execution (approve another's invoice). A member
answers one execution's wait with its signal (``POST /executions/{id}/signals/{step}``).
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from conveyor.api import problems
from conveyor.api.auth import Admin
from conveyor.api.schemas import EventCreate, EventReceiptOut
from conveyor.api.services import Conveyor
from worker.producer import send_event

router = APIRouter(prefix="/events", tags=["events"], responses=problems.responses(401, 503))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=EventReceiptOut,
    responses={
        200: {"model": EventReceiptOut, "description": "The idempotency key's event."},
        **problems.responses(400, 403, 409, 413, 422),
    },
)
def create_event(
    body: EventCreate, caller: Admin, conveyor: Conveyor, response: Response
) -> EventReceiptOut:
    """Send event ``name`` for ``key``: the oldest execution waiting for (name, key)
    takes it now (``consumed_by``); with none waiting it is kept for a wait established
    within CONVEYOR_EVENT_TTL. The payload is checked against the waits' schema first
    (422 naming each ``payload.<field>``; nothing stored). The same idempotency key
    again returns the first event (200), or 409 with another name, key or payload."""
    receipt = send_event(
        body.name,
        key=body.key,
        payload=body.payload,
        idempotency_key=body.idempotency_key,
        actor=caller.email,
        app=conveyor.celery_app,
        scope=caller.user_id,
        sent_by=caller.user_id,
    )
    if receipt.duplicate:
        response.status_code = status.HTTP_200_OK
    return EventReceiptOut(
        event_id=receipt.event_id, consumed_by=receipt.consumed_by, duplicate=receipt.duplicate
    )
