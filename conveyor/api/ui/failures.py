"""The dashboard's Failures page: failed steps grouped by failure (``GET /failures``),
most first, each with its count, first and last failure and an example execution; a
whole group retried or resolved from there (``POST /failures/{group}/retry|resolve``,
a page at a time until none remain). A member sees and acts on their own executions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from conveyor.api.auth import owner_filter
from conveyor.api.routes.failures import FailureGroupOut
from conveyor.api.services import Conveyor
from conveyor.api.ui.pages import page
from conveyor.api.ui.session import Viewer
from core import failures

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/failures", response_class=HTMLResponse)
def failures_page(request: Request, viewer: Viewer, conveyor: Conveyor) -> HTMLResponse:
    """Every failure group the viewer may see."""
    found = conveyor.engine.manager.run(
        failures.failure_groups, owner=owner_filter(viewer), limit=200
    )
    groups = [FailureGroupOut(**vars(g)).model_dump(mode="json") for g in found]
    return page(
        request,
        "failures.html",
        {"viewer": viewer, "active": "failures", "groups": groups, "data": {}},
    )
