"""Firing schedules: a pass enqueues each due tick of the declared schedules, once.

Beat sends ``conveyor.fire_schedules`` every ``CONVEYOR_SCHEDULE_INTERVAL`` seconds and
any worker runs it; passes may overlap (two beats, a redelivered message). A pass
reads the schedules' rows, enqueues each due tick through ``enqueue`` with the tick's
idempotency key, then advances the row with a compare-and-set (see core.schedule_state):
a tick that two passes find due is one execution, and a pass interrupted between the
enqueue and the advance is finished by the next one, without a second execution. Only
the tick's own execution holding its key counts as the tick having run
(``_enqueue_tick``); ``schedule:`` keys are refused to every other producer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection

from core import schedule_state, schedules
from core.errors import ConveyorError, IdempotencyConflict, TransientDatabaseError
from worker.producer import enqueue

if TYPE_CHECKING:
    from worker.app import ConveyorCelery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fired:
    """A tick a pass enqueued: its schedule, its execution, and whether this pass
    advanced the row (False: a concurrent pass had, with the same execution)."""

    workflow: str
    schedule: str
    tick: datetime
    execution_id: str
    advanced: bool


def fire_schedules(app: ConveyorCelery, now: datetime | None = None) -> list[Fired]:
    """One pass over the schedules of ``app``'s workflows; ``now`` defaults to the
    database's clock (tests give their own)."""
    declared = schedules.declared(app.engine.registry)
    if not declared:
        return []
    manager = app.engine.manager

    def read(
        connection: Connection,
    ) -> tuple[datetime, dict[tuple[str, str], schedule_state.ScheduleState]]:
        clock = now or schedule_state.database_now(connection)
        return clock, schedule_state.sync_rows(connection, declared, clock)

    clock, rows = manager.run(read)
    fired: list[Fired] = []
    for due in schedule_state.due_ticks(declared, rows, clock):
        workflow, schedule = due.declared.workflow, due.declared.schedule
        try:
            execution_id = _enqueue_tick(app, due)
        except TransientDatabaseError:
            raise
        except ConveyorError:
            log.exception(
                "schedule %r of %r: tick %s not enqueued", schedule.label, workflow, due.tick
            )
            continue
        advanced = manager.run(schedule_state.advance, due=due, execution_id=execution_id)
        fired.append(Fired(workflow, schedule.label, due.tick, execution_id, advanced))
        log.info(
            "schedule %r of %r fired for %s: execution %s",
            schedule.label,
            workflow,
            due.tick.isoformat(),
            execution_id,
        )
    return fired


def _enqueue_tick(app: ConveyorCelery, due: schedule_state.DueTick) -> str:
    """The execution of ``due``: enqueued now, or the one an earlier pass enqueued.

    A tick counts as fired only when its key's holder is its own execution
    (``DueTick.fired_by``). Any other holder (an execution a user created with the key
    before ``schedule:`` was reserved, another schedule whose names join into the same
    key) is never taken for the tick: the tick is enqueued under a key derived from the
    holder's id, which every pass derives alike, so it still runs once.
    """
    workflow, schedule = due.declared.workflow, due.declared.schedule
    key = due.idempotency_key
    for _ in range(3):  # the tick's key, its fallback, and once more if a holder vanished
        try:
            return enqueue(
                workflow, schedule.input, idempotency_key=key, schedule_tick=True, app=app
            )
        except IdempotencyConflict:
            holder = app.engine.manager.run(schedule_state.key_holder, key)
            if holder is None:  # deleted since the conflict: the key is free again
                continue
            if due.fired_by(holder):
                # The tick ran already, with the input of an earlier deploy: it is fired.
                log.warning("tick %s already ran with other input", key)
                return holder.execution_id
            log.error(
                "the key %s of schedule %r of %r is held by execution %s, which is not "
                "this schedule's tick; the tick is enqueued under another key",
                key,
                schedule.label,
                workflow,
                holder.execution_id,
            )
            key = due.fallback_key(holder)
    raise IdempotencyConflict(f"no key left to enqueue tick {due.idempotency_key!r} with")
