"""Who is calling: every endpoint but the health checks and the docs needs a token.

A request carries ``Authorization: Bearer <token>``; the token is checked against its
stored hash (``core.accounts.authenticate``) in a short transaction of its own, so a
refused token costs one indexed read and leaves nothing behind.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core import accounts
from core.accounts import Principal
from core.database import get_db_session
from core.errors import Forbidden, Unauthenticated

bearer = HTTPBearer(
    auto_error=False,
    description="An API token (`conveyor tokens issue EMAIL`, or `POST /tokens`).",
)


def current_principal(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller, or Unauthenticated (401) without a valid, unexpired, unrevoked token."""
    if credentials is None:
        raise Unauthenticated("send an API token: Authorization: Bearer <token>")
    with get_db_session(commit=True) as db:
        return accounts.authenticate(db, credentials.credentials)


Caller = Annotated[Principal, Depends(current_principal)]


def admin_principal(caller: Caller) -> Principal:
    """The caller if an admin, else Forbidden (403)."""
    if not caller.is_admin:
        raise Forbidden("this needs an admin's token")
    return caller


Admin = Annotated[Principal, Depends(admin_principal)]


def owner_filter(caller: Principal) -> str | None:
    """Whose executions a caller sees: their own, or everyone's (None) for an admin."""
    return None if caller.is_admin else caller.user_id
