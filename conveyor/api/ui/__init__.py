"""The web dashboard at ``/ui``: pages, their static files, and the login redirect."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from conveyor.api.ui import failures, limits, pages
from conveyor.api.ui.session import LoginRequired, login_redirect

STATIC = Path(__file__).resolve().parent.parent / "static"


async def _login_required(request: Request, error: Exception) -> RedirectResponse:
    assert isinstance(error, LoginRequired)
    return login_redirect(error.next_path)


def install(app: FastAPI) -> None:
    """Serve the dashboard from ``app``: its pages, ``/ui/static``, and the redirect of
    pages asked for without a login."""
    app.include_router(pages.router)
    app.include_router(limits.router)
    app.include_router(failures.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    app.add_exception_handler(LoginRequired, _login_required)
