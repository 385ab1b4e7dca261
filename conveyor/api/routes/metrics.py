"""``/metrics``: Prometheus' text format, for an admin's token (metrics span every user).

Prometheus sends it with ``authorization: {type: Bearer, credentials_file: ...}``.
The queued and running steps are read from the database at each scrape; the
collection runs in FastAPI's thread pool (a sync route), off the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from conveyor.api import problems
from conveyor.api.auth import Admin
from conveyor.api.services import Conveyor

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
        **problems.responses(401, 403, 503),
    },
)
def metrics(_: Admin, conveyor: Conveyor) -> Response:
    """Queued and running steps by workflow, each limit key's held slots and waiting
    steps, and this process's counters."""
    return Response(generate_latest(conveyor.metrics_registry), media_type=CONTENT_TYPE_LATEST)
