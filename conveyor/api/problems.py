"""Errors as RFC 9457 problem details: one handler maps every typed error to a status.

A body names the problem (``title``, ``detail``, and ``errors`` per field for 422) and
never carries a stack trace, a SQL statement, or a secret: unexpected errors answer a
bare 500 and are logged server-side with their traceback.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from conveyor.api.schemas import ProblemDetails
from core.errors import (
    AlreadyExists,
    ConveyorError,
    DatabaseError,
    FieldError,
    Forbidden,
    InputValidationError,
    InvalidTransition,
    NotFound,
    TransientDatabaseError,
    Unauthenticated,
)

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"

# Most specific first: the first class an error is an instance of decides its status.
STATUSES: tuple[tuple[type[ConveyorError], HTTPStatus], ...] = (
    (Unauthenticated, HTTPStatus.UNAUTHORIZED),
    (Forbidden, HTTPStatus.FORBIDDEN),
    (NotFound, HTTPStatus.NOT_FOUND),
    (AlreadyExists, HTTPStatus.CONFLICT),
    (InvalidTransition, HTTPStatus.CONFLICT),
    (InputValidationError, HTTPStatus.UNPROCESSABLE_ENTITY),
    (TransientDatabaseError, HTTPStatus.SERVICE_UNAVAILABLE),
)


# What each status means on this API, as its OpenAPI schema documents it.
MEANINGS: dict[int, str] = {
    400: "The body is not JSON text (not UTF-8, or not parseable).",
    401: "No valid API token: missing, unknown, expired, revoked, or its user inactive.",
    403: "The token's user may not do this (an admin's token is needed).",
    404: "No such object, or not one the caller may see.",
    409: "Conflicts with the current state (a taken email or idempotency key, a transition "
    "the execution's status does not allow).",
    413: "The body is larger than CONVEYOR_API_MAX_BODY_BYTES.",
    422: "A field is not valid; ``errors`` names each one.",
    503: "The database is unavailable for now; retry later.",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The problem responses a route declares (``APIRouter(responses=...)`` or a route's)."""
    return {s: {"model": ProblemDetails, "description": MEANINGS[s]} for s in statuses}


def status_of(error: ConveyorError) -> HTTPStatus:
    """The HTTP status of a typed error (500 for the ones a caller cannot fix)."""
    for kind, status in STATUSES:
        if isinstance(error, kind):
            return status
    return HTTPStatus.INTERNAL_SERVER_ERROR


def problem(
    status: HTTPStatus,
    detail: str | None = None,
    *,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    instance: str | None = None,
) -> JSONResponse:
    """A problem-details response."""
    body: dict[str, Any] = {"type": "about:blank", "title": status.phrase, "status": status.value}
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status.value, media_type=MEDIA_TYPE, headers=headers)


def _field(location: tuple[Any, ...] | list[Any]) -> str:
    # FastAPI locates errors as ("body", "input", "month") or ("query", "limit").
    parts = [str(p) for p in location]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts) or "(body)"


async def _conveyor_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ConveyorError)
    status = status_of(error)
    if status is HTTPStatus.INTERNAL_SERVER_ERROR or isinstance(error, DatabaseError):
        # A database error's text can hold a statement or a host; log it, show none of it.
        log.error("%s on %s %s: %s", type(error).__name__, request.method, request.url.path, error)
        return problem(status, "the server could not complete the request")
    headers = {"WWW-Authenticate": "Bearer"} if status is HTTPStatus.UNAUTHORIZED else None
    errors = error.errors if isinstance(error, InputValidationError) else None
    return problem(status, str(error), errors=errors, headers=headers)


async def _request_invalid(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors: list[FieldError] = [
        {"field": _field(e.get("loc", ())), "message": str(e.get("msg", "is not valid"))}
        for e in error.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(HTTPStatus.UNPROCESSABLE_ENTITY, detail, errors=errors)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    status = HTTPStatus(error.status_code)
    detail = error.detail if isinstance(error.detail, str) else None
    headers = dict(error.headers) if error.headers else {}
    if status is HTTPStatus.METHOD_NOT_ALLOWED and (allowed := _allowed_methods(request)):
        headers["Allow"] = ", ".join(allowed)
    return problem(status, detail, headers=headers or None)


def _allowed_methods(request: Request) -> list[str]:
    # Starlette's Allow names the methods of the first route matching the path only; a
    # path served by several routes (GET and POST /executions) allows every method its
    # OpenAPI path item documents.
    path = request.scope["path"]
    methods: set[str] = set()
    for template, item in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(template)), path):
            methods |= {m.upper() for m in item if m.upper() in _METHODS}
    return sorted(methods)


_METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"})


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.error(
        "unexpected %s on %s %s",
        type(error).__name__,
        request.method,
        request.url.path,
        exc_info=error,
    )
    return problem(HTTPStatus.INTERNAL_SERVER_ERROR, "the server could not complete the request")


def _document_problems(app: FastAPI) -> None:
    # FastAPI documents a response model under the route's media type (application/json);
    # problem responses are sent as application/problem+json, so their schema says that.
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    for response in operation.get("responses", {}).values():
                        content = response.get("content", {})
                        body = content.get("application/json", {})
                        if body.get("schema", {}).get("$ref", "").endswith("/ProblemDetails"):
                            content[MEDIA_TYPE] = content.pop("application/json")
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented extension


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``, and document its problem responses as such."""
    app.add_exception_handler(ConveyorError, _conveyor_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    _document_problems(app)
