"""Who is calling: every endpoint but the health checks and the docs needs a token.

A request carries ``Authorization: Bearer <token>``; the token is checked against its
stored hash (``core.accounts.authenticate``) in a short transaction of its own, so a
refused token costs one indexed read and leaves nothing behind. The dashboard (``/ui``)
logs in once and keeps the token in a cookie, which its pages' ``fetch()`` calls send.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core import accounts
from core.accounts import Principal
from core.database import get_db_session
from core.errors import Forbidden, Unauthenticated

# The dashboard's cookie (HttpOnly, SameSite=Strict: api/ui/session.py sets it).
TOKEN_COOKIE = "conveyor_token"
# Cross-site request forgery: a browser attaches cookies to requests other sites make
# (forms post without any script), but no page can add a custom header to a request
# to another origin without a CORS preflight, which this API never grants. So a
# state-changing request authenticated by the cookie must carry this header: the
# dashboard's own fetch() calls send it, a forged form cannot. SameSite=Strict already
# keeps the cookie off cross-site requests; the header does not depend on browsers
# honouring it (nor on sibling subdomains, which count as the same site).
UI_HEADER = "X-Conveyor-UI"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer = HTTPBearer(
    auto_error=False,
    description="An API token (`conveyor tokens issue EMAIL`, or `POST /tokens`).",
)


def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller, or Unauthenticated (401) without a valid, unexpired, unrevoked token
    (a bearer token, else the dashboard's cookie); Forbidden (403) for a state-changing
    request by cookie without the dashboard's header."""
    if credentials is not None:
        token = credentials.credentials
    elif (cookie := request.cookies.get(TOKEN_COOKIE)) is not None:
        if request.method not in SAFE_METHODS and request.headers.get(UI_HEADER) != "1":
            raise Forbidden(f"a request authenticated by cookie must send {UI_HEADER}: 1")
        token = cookie
    else:
        raise Unauthenticated("send an API token: Authorization: Bearer <token>")
    with get_db_session(commit=True) as db:
        return accounts.authenticate(db, token)


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
