"""The FastAPI app: ``uvicorn conveyor.api.app:app``, or ``create_app()`` for your own settings.

Nothing connects when this module is imported: ``app`` is built on first access, and
the database and broker are reached on the first request that needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from conveyor.api import problems, redaction, ui
from conveyor.api.limits import BodyLimit
from conveyor.api.routes import (
    events,
    executions,
    failures,
    health,
    limits,
    metrics,
    repair,
    tokens,
    users,
    versions,
    workflows,
)
from conveyor.api.services import Services
from core.config import get_settings

if TYPE_CHECKING:
    from worker.app import ConveyorCelery

DESCRIPTION = """
Enqueue workflows, follow their executions step by step, cancel and retry them.

Every endpoint but `/healthz` and `/readyz` needs `Authorization: Bearer <token>`;
issue the first admin's token with `conveyor users create EMAIL --admin` and
`conveyor tokens issue EMAIL`. Errors are RFC 9457 problem details.
"""


def create_app(celery_app: ConveyorCelery | None = None) -> FastAPI:
    """A new API app, publishing through ``celery_app`` (default: ``worker.app.app``)."""
    api = FastAPI(title="conveyor", version="0.1.0", description=DESCRIPTION)
    api.state.services = Services(celery_app)
    max_bytes = (
        celery_app.engine.settings if celery_app is not None else get_settings()
    ).api_max_body_bytes
    api.add_middleware(BodyLimit, max_bytes=max_bytes)
    problems.install(api)
    redaction.install()
    for module in (
        health,
        users,
        tokens,
        executions,
        repair,
        failures,
        events,
        workflows,
        limits,
        versions,
        metrics,
    ):
        api.include_router(module.router)
    ui.install(api)  # the dashboard: /ui and /ui/static
    return api


def __getattr__(name: str) -> Any:
    # ``uvicorn conveyor.api.app:app`` reads the attribute; building it then, not at import,
    # keeps settings unread until the server starts.
    if name == "app":
        built = create_app()
        globals()["app"] = built
        return built
    raise AttributeError(name)
