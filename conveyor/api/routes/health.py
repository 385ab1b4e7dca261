"""Liveness and readiness, without a token: what a load balancer and compose ask."""

from __future__ import annotations

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import select

from conveyor.api.schemas import Check, Health, Ready
from conveyor.api.services import Conveyor
from migrations import alembic_config

router = APIRouter(tags=["health"])

HEALTH_TIMEOUT_SECONDS = 3


def _database(conveyor: Conveyor) -> tuple[Check, str | None]:
    """Whether the database answers, and its schema's revision."""
    try:
        with conveyor.engine.manager.database.engine.connect() as conn:
            conn.execute(select(1))
            revision = MigrationContext.configure(conn).get_current_revision()
    except Exception as error:  # any failure is the answer; its text may name hosts
        return Check(status="error", detail=f"unreachable ({type(error).__name__})"), None
    return Check(status="ok"), revision


def _broker(conveyor: Conveyor) -> Check:
    try:
        with conveyor.celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=HEALTH_TIMEOUT_SECONDS)
    except Exception as error:
        return Check(status="error", detail=f"unreachable ({type(error).__name__})")
    return Check(status="ok")


def _answer(body: Health | Ready) -> JSONResponse:
    code = 200 if body.status == "ok" else 503
    return JSONResponse(body.model_dump(mode="json"), status_code=code)


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(conveyor: Conveyor) -> JSONResponse:
    """200 when the database and the broker both answer, else 503 naming which does not."""
    database, _ = _database(conveyor)
    broker = _broker(conveyor)
    ok = database.status == broker.status == "ok"
    return _answer(Health(status="ok" if ok else "error", database=database, broker=broker))


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
def readyz(conveyor: Conveyor) -> JSONResponse:
    """200 when the database answers, its schema is at this release's head, and workflows
    are registered; 503 naming what is missing (run ``conveyor migrate``)."""
    database, revision = _database(conveyor)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if database.status != "ok":
        migrations = Check(status="error", detail="database unreachable")
    elif revision != head:
        migrations = Check(
            status="error", detail=f"schema at {revision or 'none'}, expected {head}: run migrate"
        )
    else:
        migrations = Check(status="ok")
    count = len(conveyor.engine.registry)
    workflows = (
        Check(status="ok", detail=f"{count} registered")
        if count
        else Check(status="error", detail="none registered: set CONVEYOR_WORKFLOW_MODULES")
    )
    ok = database.status == migrations.status == workflows.status == "ok"
    return _answer(
        Ready(
            status="ok" if ok else "error",
            database=database,
            migrations=migrations,
            workflows=workflows,
        )
    )
