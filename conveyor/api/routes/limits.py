"""Limits: the concurrency and rate-limit keys, what each holds and holds back; an
operator's pause and resume of a key.

Any user reads them: a key is shared by every execution that names it (``"openai"``), so
its counts are no one's own data, and they name no execution. Pausing and resuming
hold back every user's steps: admins only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy import Connection

from conveyor.api import problems
from conveyor.api.auth import Admin, Caller
from conveyor.api.schemas import NO_NUL, LimitOut, PauseRequest
from conveyor.api.services import Conveyor
from core import limits
from core.errors import InputValidationError, KeyNotFound

router = APIRouter(prefix="/limits", tags=["limits"], responses=problems.responses(401, 503))

KeyPath = Annotated[str, Path(min_length=1, max_length=255, pattern=NO_NUL)]


@router.get("", response_model=list[LimitOut], responses=problems.responses(422))
def list_limits(
    _: Caller,
    conveyor: Conveyor,
    key: Annotated[
        str | None,
        Query(min_length=1, max_length=255, pattern=NO_NUL, description="Only this key."),
    ] = None,
) -> list[LimitOut]:
    """Every key by name: its concurrency limit, slots held (running), steps waiting for
    it, its rate and its pause. An unknown ``key`` lists nothing."""
    states = conveyor.engine.manager.run(limits.key_states, None if key is None else [key])
    return [LimitOut.of(state) for state in states]


def _pause(conn: Connection, key: str, until: datetime) -> limits.KeyState:
    if not limits.key_states(conn, [key]):
        raise KeyNotFound(key)
    # After the key's lookup: an unknown key is a 404 whatever the time.
    if until <= datetime.now(UTC):
        raise InputValidationError(
            "until must be in the future", [{"field": "until", "message": "is not in the future"}]
        )
    limits.pause_key(conn, key, until)
    (state,) = limits.key_states(conn, [key])
    return state


@router.post(
    "/{key}/pause", response_model=LimitOut, responses=problems.responses(400, 403, 404, 413, 422)
)
def pause_limit(key: KeyPath, body: PauseRequest, _: Admin, conveyor: Conveyor) -> LimitOut:
    """Hold every start under ``key`` until ``until`` (an upstream's outage, a quota
    reset): steps released meanwhile wait with that wake time; running ones run on.
    Pausing again moves the time. 404 for a key never used; 422 for a past ``until``."""
    return LimitOut.of(conveyor.engine.manager.run(_pause, key, body.until))


def _resume(conn: Connection, key: str) -> limits.KeyState:
    if limits.resume_key(conn, key) is None:
        raise KeyNotFound(key)
    (state,) = limits.key_states(conn, [key])
    return state


@router.delete("/{key}/pause", response_model=LimitOut, responses=problems.responses(403, 404, 422))
def resume_limit(key: KeyPath, _: Admin, conveyor: Conveyor) -> LimitOut:
    """End ``key``'s pause now: the steps it held, and the executions a workflow's own
    limit under it kept pending, are admitted at once (within the key's other limits).
    Resuming a key that is not paused changes nothing. 404 for a key never used."""
    engine = conveyor.engine
    state = engine.manager.run(_resume, key)
    engine.key_resumed(key)
    return LimitOut.of(state)
