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

from core import events, executions
from core.errors import InputValidationError, StepNotFound
from core.events import EventReceipt
from core.executions import NewExecution
from core.outcomes import CreatedExecution
from core.workflows import EventWait, Workflow

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
    runs from 0 to 9, higher first. A debounced workflow's enqueue returns the id of its
    key's open window (``Debounce``), which starts when the window closes.
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
    its idempotency key named an existing one, which was not started again, or an open
    debounce window took its input) and whether it is held for its debounce window.

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
        if c.created and not c.held
    ]
    collapsed = sum(1 for c in created if c.held and not c.created)
    if collapsed:
        engine.metrics.collapsed(news[0].workflow_id, collapsed)
    try:
        engine.publish_starts(fresh)
    except Exception:  # the rows are committed: the reconciler will start them
        log.warning(
            "publishing %d start message(s) failed; the reconciler will send them",
            len(fresh),
            exc_info=True,
        )
    return created


def send_event(
    name: str,
    *,
    key: str = "",
    payload: Any = None,
    idempotency_key: str | None = None,
    actor: str | None = None,
    app: ConveyorCelery | None = None,
    scope: str = executions.PRODUCER_SCOPE,
    sent_by: str | None = None,
) -> EventReceipt:
    """Send event ``name`` for ``key``: the oldest execution waiting for (name, key)
    (``wf.wait``) takes it now; with none waiting, it is kept for a wait established
    later (``CONVEYOR_EVENT_TTL``). ``payload`` is checked against the waits' schema
    first (InputValidationError naming each field; nothing stored). A repeated
    ``idempotency_key`` stores one event."""
    conveyor = _app(app)
    engine = conveyor.engine
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise InputValidationError(f"event name must be 1-200 characters, got {name!r}")
    if not isinstance(key, str) or len(key) > 255:
        raise InputValidationError(f"event key must be text of at most 255 characters, got {key!r}")
    checked = events.payload_of(
        name, engine.registry.event_schema(name), payload, engine.settings.max_payload_bytes
    )
    receipt, outcome = engine.manager.run(
        events.send_event,
        name,
        key,
        checked,
        ttl_seconds=engine.settings.event_ttl,
        definition_of=engine.definition,
        idempotency_key=idempotency_key,
        scope=scope,
        sent_by=sent_by,
        actor=actor,
    )
    engine.metrics.event_sent(
        "duplicate" if receipt.duplicate else "consumed" if receipt.consumed_by else "stored"
    )
    engine.publish_outcome(outcome)
    return receipt


def signal(
    execution_id: str,
    step: str,
    payload: Any = None,
    *,
    actor: str | None = None,
    app: ConveyorCelery | None = None,
    sent_by: str | None = None,
) -> EventReceipt:
    """Send ``payload`` to execution ``execution_id``'s event wait ``step``: it completes
    now if it waits, or takes the signal when it is established. Checked against the
    wait's schema (InputValidationError); WaitNotOpen when the execution or step has
    ended."""
    conveyor = _app(app)
    engine = conveyor.engine
    execution = engine.manager.get_execution(execution_id)
    workflow = engine.registry.get(execution.workflow_id, execution.workflow_version)
    defined = workflow.steps.get(step)
    if defined is None:
        raise StepNotFound(execution_id, step)
    schema = defined.wait.schema if isinstance(defined.wait, EventWait) else None
    checked = events.payload_of(step, schema, payload, engine.settings.max_payload_bytes)
    receipt, outcome = engine.manager.run(
        events.signal,
        execution_id,
        step,
        checked,
        ttl_seconds=engine.settings.event_ttl,
        definition_of=engine.definition,
        actor=actor,
        sent_by=sent_by,
    )
    engine.metrics.event_sent("consumed" if receipt.consumed_by else "stored")
    engine.publish_outcome(outcome)
    return receipt


def wake(
    execution_id: str,
    step: str,
    *,
    actor: str | None = None,
    app: ConveyorCelery | None = None,
) -> None:
    """Wake sleep ``step`` of execution ``execution_id`` now (audited as woken early by
    ``actor``); WaitNotOpen (409) when it is not sleeping."""
    engine = _app(app).engine
    outcome = engine.manager.run(
        events.wake, execution_id, step, definition_of=engine.definition, actor=actor
    )
    engine.publish_outcome(outcome)


def resolve(
    execution_id: str,
    step: str,
    output: Any,
    *,
    reason: str | None = None,
    actor: str = "python",
    app: ConveyorCelery | None = None,
) -> None:
    """Complete failed step ``step`` of an ended execution with ``output`` (checked
    against the step's return annotation: InputValidationError naming the field) and go
    on from there: its dependents run with that output (``core.repair``). Recorded in
    the history with ``actor`` and ``reason``; InvalidTransition when the step is not
    failed or the execution has not ended."""
    _app(app).engine.resolve(execution_id, step, output, actor=actor, reason=reason)


def skip(
    execution_id: str,
    step: str,
    *,
    reason: str | None = None,
    actor: str = "python",
    app: ConveyorCelery | None = None,
) -> None:
    """Skip failed step ``step`` of an ended execution and go on from there: its
    ``all_success`` dependents are skipped, the others run by their triggers."""
    _app(app).engine.skip(execution_id, step, actor=actor, reason=reason)
