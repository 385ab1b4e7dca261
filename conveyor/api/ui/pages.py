"""The dashboard's pages: executions, one execution with its DAG (and what its waiting
steps wait for: an approval form, "Wake now"), workflows, and login.

Pages are rendered on the server (Jinja2) from the same units of work as the JSON API
and with the same visibility (members see their own executions); their scripts then
poll the JSON API every 2 s, authenticated by the login cookie, to keep them live.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import Connection

from conveyor.api.auth import UI_HEADER, owner_filter
from conveyor.api.routes.executions import children_of, key_pauses
from conveyor.api.routes.workflows import _body, _schedules
from conveyor.api.schemas import EventOut, ExecutionDetail, ExecutionOut, StepOut
from conveyor.api.services import Conveyor, Services
from conveyor.api.ui import graph, waits
from conveyor.api.ui.session import (
    HOME_PATH,
    LOGIN_PATH,
    Viewer,
    authenticate,
    clear_token_cookie,
    safe_next,
    same_origin,
    set_token_cookie,
)
from core import execution_counts, executions, maps
from core.accounts import Principal
from core.conditions import skip_reasons
from core.errors import ExecutionNotFound, WorkflowNotFound
from core.executions import ExecutionFilter, ListedStatus, listed_statuses
from core.states import EXECUTION_RETRY_TRANSITIONS, EXECUTIONS, ExecutionStatus
from core.workflows import Workflow

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
templates = Jinja2Templates(directory=str(TEMPLATES))
PAGE_SIZE = 50
RECENT = 20
MAX_LOGIN_BODY = 4096
CANCELLABLE = frozenset(s.value for s in ExecutionStatus if s not in EXECUTIONS.final)
RETRYABLE = frozenset(s.value for s in EXECUTION_RETRY_TRANSITIONS)
# The list's statuses: the execution statuses and `waiting` (running, parked on waits).
LISTED = [s.value for s in ListedStatus]
# Scripts and styles only from this origin (nothing inline, no CDN); no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


def page(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    """A rendered template with the dashboard's security headers."""
    response = templates.TemplateResponse(
        request,
        name,
        {"ui_header": UI_HEADER, "statuses": LISTED, **context},
        status_code=status_code,
        headers=SECURITY_HEADERS,
    )
    return response


# --- login ----------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    """The login form: paste an API token."""
    return page(request, "login.html", {"next": safe_next(next), "error": None})


@router.post("/login", response_model=None)
async def login(request: Request) -> Response:
    """Check the token and keep it in the cookie; back to the form on a bad one."""
    if not same_origin(request):
        return Response("cross-site login refused", status_code=403)
    body = await request.body()
    form = parse_qs(body[:MAX_LOGIN_BODY].decode(errors="replace"))
    token = form.get("token", [""])[0].strip()
    target = safe_next(form.get("next", [None])[0])
    principal = authenticate(token) if token else None
    if principal is None:
        error = "That token is not valid (unknown, expired or revoked)."
        context = {"next": target, "error": error}
        return page(request, "login.html", context, status_code=401)
    response = RedirectResponse(target, status_code=303)
    set_token_cookie(response, request, token)
    return response


@router.api_route("/logout", methods=["GET", "POST"])
def logout(request: Request) -> RedirectResponse:
    """Forget the token and go back to the login form."""
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    clear_token_cookie(response, request)
    return response


# --- executions -----------------------------------------------------------------------


def _moment(value: str | None) -> datetime | None:
    # The form's datetime-local has no zone: the dashboard shows and reads UTC.
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _counts(conn: Connection, where: ExecutionFilter) -> dict[str, int]:
    found = {c.status: c.count for c in execution_counts.count_by_status(conn, where)}
    counts = {status.value: found.get(status.value, 0) for status in ExecutionStatus}
    # Waiting executions are running ones (parked): a part of `running`, not beside it.
    counts[ListedStatus.WAITING.value] = waits.count_waiting(conn, where)
    return counts


def _total(counts: dict[str, int]) -> int:
    return sum(n for status, n in counts.items() if status != ListedStatus.WAITING.value)


def _row(execution: ExecutionOut) -> dict[str, Any]:
    return execution.model_dump(mode="json", include=set(ROW_FIELDS))


ROW_FIELDS = (
    "execution_id",
    "workflow",
    "workflow_version",
    "status",
    "attempt",
    "priority",
    "created_at",
    "started_at",
    "finished_at",
    "parked_at",
)


@router.get("", response_class=HTMLResponse)
def executions_page(
    request: Request,
    viewer: Viewer,
    conveyor: Conveyor,
    workflow: str | None = None,
    status: Annotated[list[str] | None, Query()] = None,
    created_after: str | None = None,
    created_before: str | None = None,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> HTMLResponse:
    """Executions newest first, filtered, with counts by status; refreshed live."""
    chosen = [s for s in (status or []) if s in LISTED]
    after, before = _moment(created_after), _moment(created_before)
    statuses, waiting = listed_statuses(chosen) if chosen else (None, False)
    where = ExecutionFilter(
        statuses=statuses,
        waiting=waiting,
        workflow_id=workflow or None,
        triggered_by=owner_filter(viewer),
        created_after=after,
        created_before=before,
    )
    api_query: list[tuple[str, str]] = [("status", s) for s in chosen]
    if workflow:
        api_query.append(("workflow", workflow))
    if after:
        api_query.append(("created_after", after.isoformat()))
    if before:
        api_query.append(("created_before", before.isoformat()))
    counts_query = urlencode([(k, v) for k, v in api_query if k != "status"])
    listing = [*api_query, ("limit", str(PAGE_SIZE))]
    if cursor:
        listing.append(("cursor", cursor))

    def read(conn: Connection) -> tuple[executions.ExecutionPage, dict[str, int]]:
        return executions.page_executions(conn, where, PAGE_SIZE, cursor), _counts(conn, where)

    found, counts = conveyor.engine.manager.run(read)
    rows = [_row(ExecutionOut.of(e)) for e in found.items]
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
    next_query = None
    if found.next_cursor:
        next_query = urlencode([*params, ("cursor", found.next_cursor)])
    data = {"api_query": urlencode(listing), "counts_query": counts_query}
    return page(
        request,
        "executions.html",
        {
            "viewer": viewer,
            "active": "executions",
            "rows": rows,
            "counts": counts,
            "total": _total(counts),
            "workflows": sorted({w.name for w in conveyor.engine.registry}),
            "filters": {
                "workflow": workflow or "",
                "status": chosen,
                "created_after": after.strftime("%Y-%m-%dT%H:%M") if after else "",
                "created_before": before.strftime("%Y-%m-%dT%H:%M") if before else "",
            },
            "paged": cursor is not None,
            "first_query": urlencode(params),
            "next_query": next_query,
            "data": data,
        },
    )


@router.get("/counts")
def counts(
    viewer: Viewer,
    conveyor: Conveyor,
    workflow: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> JSONResponse:
    """Counts of the viewer's visible executions by status (the list's live header)."""
    where = ExecutionFilter(
        workflow_id=workflow or None,
        triggered_by=owner_filter(viewer),
        created_after=created_after if created_after is None or created_after.tzinfo else None,
        created_before=created_before if created_before is None or created_before.tzinfo else None,
    )
    found = conveyor.engine.manager.run(_counts, where)
    return JSONResponse({"counts": found, "total": _total(found)})


def _drawing(
    workflow: Workflow | None, step_names: list[str], kinds: tuple[str, ...] = ()
) -> dict[str, Any]:
    try:
        if workflow is not None:
            drawn = graph.draw(workflow)
        else:
            drawn = graph.draw_steps(step_names, kinds)
    except graph.LayoutError as error:
        return {"svg": None, "problem": str(error), "node_ids": {}}
    return {"svg": drawn.svg, "problem": None, "node_ids": dict(drawn.node_ids)}


def _definition(services: Services, name: str, version: int | None = None) -> Workflow | None:
    try:
        return services.engine.registry.get(name, version)
    except WorkflowNotFound:
        return None


@router.get("/executions/{execution_id}", response_class=HTMLResponse)
def execution_page(
    request: Request, execution_id: str, viewer: Viewer, conveyor: Conveyor
) -> HTMLResponse:
    """One execution: its DAG coloured by step status, steps, timeline and history, what
    its waiting steps wait for (with an approval form and "Wake now"), its parent and
    children."""

    def read(conn: Connection) -> ExecutionDetail:
        execution = executions.get_execution(conn, execution_id)
        steps = executions.get_steps(conn, execution_id)
        events = executions.get_history(conn, execution_id)
        items = maps.map_counts_of(conn, execution_id)
        route = (execution.workflow_id, execution.workflow_version)
        why = skip_reasons(events)
        pauses = key_pauses(conn, steps)
        return ExecutionDetail(
            **ExecutionOut.of(execution).model_dump(),
            steps=[
                StepOut.of(
                    s,
                    items.get(s.step_name),
                    conveyor.engine.queue_of(*route, s.step_name),
                    why.get(s.step_name),
                    pauses,
                )
                for s in steps
            ],
            events=[EventOut.of(e) for e in events],
            children=children_of(conn, execution_id),
        )

    try:
        detail = conveyor.engine.manager.run(read)
        if not _can_see(viewer, detail.triggered_by):
            raise ExecutionNotFound(execution_id)
    except ExecutionNotFound:
        context = {"viewer": viewer, "message": f"No execution {execution_id!r}."}
        return page(request, "missing.html", context, status_code=404)
    definition = _definition(conveyor, detail.workflow, detail.workflow_version)
    kinds = tuple(s.kind for s in detail.steps)
    drawing = _drawing(definition, [s.name for s in detail.steps], kinds)
    data = {
        "execution": detail.model_dump(mode="json"),
        "node_ids": drawing["node_ids"],
        # Each wait node's declaration: its event, timeout, and approval form fields.
        "waits": waits.wait_views(definition),
        "cancellable": sorted(CANCELLABLE),
        "retryable": sorted(RETRYABLE),
        "may_act": viewer.is_admin or detail.triggered_by == viewer.user_id,
    }
    return page(
        request,
        "execution.html",
        {
            "viewer": viewer,
            "active": "executions",
            "execution": detail,
            "registered": definition is not None,
            "drawing": drawing,
            "data": data,
        },
    )


def _can_see(viewer: Principal, triggered_by: str | None) -> bool:
    return viewer.is_admin or triggered_by == viewer.user_id


# --- workflows ------------------------------------------------------------------------


@router.get("/workflows", response_class=HTMLResponse)
def workflows_page(request: Request, viewer: Viewer, conveyor: Conveyor) -> HTMLResponse:
    """Every registered workflow (newest version of each) and its steps."""
    newest: dict[str, Workflow] = {}
    for workflow in conveyor.engine.registry:
        newest[workflow.name] = workflow  # the registry iterates by (name, version)
    context = {"viewer": viewer, "active": "workflows", "workflows": list(newest.values())}
    return page(request, "workflows.html", context)


@router.get("/workflows/{name}", response_class=HTMLResponse)
def workflow_page(request: Request, name: str, viewer: Viewer, conveyor: Conveyor) -> HTMLResponse:
    """A workflow: DAG, input schema, schedules, recent executions, and a form to run it."""
    workflow = _definition(conveyor, name)
    if workflow is None:
        context = {"viewer": viewer, "message": f"No workflow {name!r} is registered."}
        return page(request, "missing.html", context, status_code=404)
    where = ExecutionFilter(workflow_id=name, triggered_by=owner_filter(viewer))
    recent = conveyor.engine.manager.run(executions.page_executions, where, RECENT, None)
    rows = conveyor.engine.manager.run(_schedules, [workflow])
    body = _body(workflow, rows, conveyor.engine.settings)
    schema = body.input_schema
    return page(
        request,
        "workflow.html",
        {
            "viewer": viewer,
            "active": "workflows",
            "workflow": body,
            "drawing": _drawing(workflow, []),
            "schema": json.dumps(schema, indent=2) if schema is not None else None,
            "example": json.dumps(_example(schema), indent=2),
            "recent": [_row(ExecutionOut.of(e)) for e in recent.items],
            "data": {"workflow": name},
        },
    )


def _example(schema: dict[str, Any] | None) -> Any:
    # A starting point for the input box: the schema's properties with their defaults.
    if schema is None:
        return None
    properties: dict[str, Any] = schema.get("properties", {})
    placeholders = {"integer": 0, "number": 0, "string": "", "boolean": False, "array": []}
    return {
        key: spec.get("default", placeholders.get(spec.get("type", "")))
        for key, spec in properties.items()
    }


@router.get("/", include_in_schema=False)
def slash() -> RedirectResponse:
    """/ui/ is /ui."""
    return RedirectResponse(HOME_PATH, status_code=307)
