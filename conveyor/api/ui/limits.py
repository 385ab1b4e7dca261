"""The dashboard's Limits page: each concurrency or rate-limit key with its slots held
against its limit, the steps waiting for it, its rate and its pause, refreshed from
``GET /limits``; admins pause a key for a while or resume it there.

Every viewer sees every key, as over the API: keys are shared, not anyone's own.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from conveyor.api.schemas import LimitOut
from conveyor.api.services import Conveyor
from conveyor.api.ui.pages import page
from conveyor.api.ui.session import Viewer
from core import limits

router = APIRouter(prefix="/ui", include_in_schema=False)
# The pauses an admin picks from (a list: the page data's JSON sorts an object's keys).
PAUSES = [("15 minutes", 15 * 60), ("1 hour", 3600), ("1 day", 86400)]


@router.get("/limits", response_class=HTMLResponse)
def limits_page(
    request: Request,
    viewer: Viewer,
    conveyor: Conveyor,
    key: Annotated[str | None, Query(max_length=255)] = None,
) -> HTMLResponse:
    """Every key (or ``key``): limit, running, waiting, rate, paused until; live."""
    states = conveyor.engine.manager.run(limits.key_states, [key] if key else None)
    rows = [LimitOut.of(state).model_dump(mode="json") for state in states]
    return page(
        request,
        "limits.html",
        {
            "viewer": viewer,
            "active": "limits",
            "rows": rows,
            "key": key or "",
            "data": {"key": key or None, "admin": viewer.is_admin, "pauses": PAUSES},
        },
    )
