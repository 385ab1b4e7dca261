"""The dashboard's login: an API token kept in an HttpOnly, SameSite=Strict cookie.

Pages call ``page_principal``: without a valid token in the cookie it raises
``LoginRequired``, which ``conveyor.api.ui`` answers with a redirect to the login form. The JSON
API reads the same cookie (``conveyor.api.auth.current_principal``), so the pages' scripts call
it with ``fetch()`` and never see the token (HttpOnly).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, Request, Response
from fastapi.responses import RedirectResponse

from conveyor.api.auth import TOKEN_COOKIE
from core import accounts
from core.accounts import Principal
from core.database import get_db_session
from core.errors import Unauthenticated

LOGIN_PATH = "/ui/login"
HOME_PATH = "/ui"


class LoginRequired(Exception):
    """The page needs a logged-in user; carries where to return after logging in."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def authenticate(token: str) -> Principal | None:
    """Who ``token`` stands for, or None when it is not a valid token."""
    try:
        with get_db_session(commit=True) as db:
            return accounts.authenticate(db, token)
    except Unauthenticated:
        return None


def page_principal(request: Request) -> Principal:
    """The logged-in user of a page, or LoginRequired."""
    token = request.cookies.get(TOKEN_COOKIE)
    principal = authenticate(token) if token else None
    if principal is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return principal


Viewer = Annotated[Principal, Depends(page_principal)]


def safe_next(path: str | None) -> str:
    """Where to go after logging in: a path of the dashboard, never another site."""
    if not path:
        return HOME_PATH
    parts = urlsplit(path)
    if parts.scheme or parts.netloc or not path.startswith("/ui") or path.startswith("//"):
        return HOME_PATH
    if "\\" in path:
        return HOME_PATH
    return path


def login_redirect(next_path: str) -> RedirectResponse:
    """A redirect to the login form, returning to ``next_path`` afterwards."""
    return RedirectResponse(f"{LOGIN_PATH}?next={quote(safe_next(next_path))}", status_code=303)


def set_token_cookie(response: Response, request: Request, token: str) -> None:
    """Keep ``token`` in the browser: unreadable by scripts (HttpOnly), never sent by
    other sites' requests (SameSite=Strict), and only over TLS when served over TLS."""
    response.set_cookie(
        TOKEN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def clear_token_cookie(response: Response, request: Request) -> None:
    """Forget the token (the cookie's attributes must match to delete it)."""
    response.delete_cookie(
        TOKEN_COOKIE,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def same_origin(request: Request) -> bool:
    """Whether a form post comes from a page of this site: its Origin (browsers send it
    on POST) names this host, or it has none (a non-browser client)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    parts = urlsplit(origin)
    return parts.netloc == request.url.netloc and parts.scheme == request.url.scheme
