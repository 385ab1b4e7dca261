"""Enqueueing: validate, commit the execution, then publish its start message.

    from worker.producer import enqueue
    execution_id = enqueue("etl", {"day": "2026-11-25"}, idempotency_key="etl-2026-11-25")

A publish that fails after the commit loses nothing: the execution stays pending and
the reconciler sends its start message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from core import executions
from core.errors import InputValidationError
from core.executions import NewExecution
from core.outcomes import CreatedExecution
from core.workflows import Workflow

if TYPE_CHECKING:
    from worker.app import ConveyorCelery

log = logging.getLogger(__name__)


def _app(app: ConveyorCelery | None) -> ConveyorCelery:
    if app is not None:
        return app
    from worker.app import app as default_app

    return default_app


def _deadline(deadline: datetime | timedelta | None) -> datetime | None:
    if isinstance(deadline, timedelta):
        return datetime.now(UTC) + deadline
    return deadline


def _prepare(
    app: ConveyorCelery,
    workflow: Workflow | str,
    input_data: Any,
    idempotency_key: str | None,
    priority: int | None,
    deadline: datetime | timedelta | None,
    triggered_by: str | None,
    idempotency_scope: str,
    schedule_tick: bool,
) -> NewExecution:
    engine = app.engine
    return executions.execution_of(
        engine.registry,
        workflow if isinstance(workflow, str) else workflow.name,
        input_data,
        max_payload_bytes=engine.settings.max_payload_bytes,
        workflow_version=None if isinstance(workflow, str) else workflow.version,
        idempotency_key=idempotency_key,
        idempotency_scope=idempotency_scope,
        schedule_tick=schedule_tick,
        triggered_by=triggered_by,
        priority=priority or 0,
        deadline_at=_deadline(deadline),
    )


def enqueue(
    workflow: Workflow | str,
    input_data: Any = None,
    *,
    idempotency_key: str | None = None,
    priority: int | None = None,
    deadline: datetime | timedelta | None = None,
    triggered_by: str | None = None,
    app: ConveyorCelery | None = None,
    schedule_tick: bool = False,
) -> str:
    """Validate ``input_data``, commit a pending execution, publish its start; its id.

    The same ``idempotency_key`` again returns the first execution's id and sends
    nothing; keys beginning ``schedule:`` are refused (ReservedIdempotencyKey), except
    with ``schedule_tick``, which only the schedules' firing pass passes. ``priority``
    runs from 0 to 9, higher first.
    """
    (created,) = submit_many(
        workflow,
        [input_data],
        idempotency_keys=[idempotency_key],
        priority=priority,
        deadline=deadline,
        triggered_by=triggered_by,
        app=app,
        schedule_tick=schedule_tick,
    )
    return created.execution_id


def enqueue_many(
    workflow: Workflow | str,
    inputs: Iterable[Any],
    *,
    idempotency_keys: Sequence[str | None] | None = None,
    priority: int | None = None,
    deadline: datetime | timedelta | None = None,
    triggered_by: str | None = None,
    app: ConveyorCelery | None = None,
) -> list[str]:
    """Enqueue many executions: one INSERT, one commit, then one batch of publishes.

    Every input is validated before anything is written; one bad input writes nothing.
    """
    created = submit_many(
        workflow,
        inputs,
        idempotency_keys=idempotency_keys,
        priority=priority,
        deadline=deadline,
        triggered_by=triggered_by,
        app=app,
    )
    return [c.execution_id for c in created]


def submit_many(
    workflow: Workflow | str,
    inputs: Iterable[Any],
    *,
    idempotency_keys: Sequence[str | None] | None = None,
    priority: int | None = None,
    deadline: datetime | timedelta | None = None,
    triggered_by: str | None = None,
    app: ConveyorCelery | None = None,
    idempotency_scope: str = executions.PRODUCER_SCOPE,
    schedule_tick: bool = False,
) -> list[CreatedExecution]:
    """``enqueue_many``, telling for each execution whether this call created it (False:
    its idempotency key named an existing one, which was not started again).

    Keys are looked up in ``idempotency_scope``: the producers' by default; the HTTP
    API passes its caller's user id, so that users neither share nor see others' keys.
    """
    celery_app = _app(app)
    batch = list(inputs)
    keys = list(idempotency_keys) if idempotency_keys is not None else [None] * len(batch)
    if len(keys) != len(batch):
        raise InputValidationError(f"{len(keys)} idempotency keys for {len(batch)} inputs")
    news = [
        _prepare(
            celery_app,
            workflow,
            data,
            key,
            priority,
            deadline,
            triggered_by,
            idempotency_scope,
            schedule_tick,
        )
        for data, key in zip(batch, keys, strict=True)
    ]
    engine = celery_app.engine
    created: list[CreatedExecution] = engine.manager.run(executions.create_executions, news)
    fresh = [
        (c.execution_id, new.workflow_id, new.priority)
        for c, new in zip(created, news, strict=True)
        if c.created
    ]
    try:
        engine.publish_starts(fresh)
    except Exception:  # the rows are committed: the reconciler will start them
        log.warning(
            "publishing %d start message(s) failed; the reconciler will send them",
            len(fresh),
            exc_info=True,
        )
    return created
