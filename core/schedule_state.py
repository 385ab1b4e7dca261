"""The state of schedules in the database: the units of work of a firing pass.

One ``workflow_schedules`` row per (workflow, schedule name) holds whether it is
paused, the last tick fired and the next one due. A firing pass reads the rows
(``sync_rows``), enqueues each due tick with its key, *then* advances the row with a
compare-and-set (``advance``): whatever a crash interrupts, the next pass finds the
same tick due and the key makes its enqueue a no-op; concurrent passes collide on the
key and only one of them advances the row. Misfires: a pass finds one tick due however
many passed since the row's ``next_tick_at`` (the latest at or before now).

The units of work take a Connection and own no transaction; ``core.transactions`` runs
one with the retry policy of the rest of conveyor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite

from core import statements
from core.executions import PRODUCER_SCOPE
from core.models import WorkflowSchedule
from core.schedules import MAX_KEY_LENGTH, Declared, tick_key
from core.sql import utcnow
from core.types import UTCDateTime

T = TypeVar("T")

_table = cast(Table, WorkflowSchedule.__table__)


@dataclass(frozen=True)
class ScheduleState:
    """A schedule's row: paused, the last tick fired (and its execution), the next due."""

    workflow: str
    name: str
    spec: str
    paused: bool
    next_tick_at: datetime | None
    last_tick_at: datetime | None
    last_execution_id: str | None
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> ScheduleState:
        """From a selected or returned row of workflow_schedules."""
        return cls(
            row.workflow,
            row.name,
            row.spec,
            row.paused,
            row.next_tick_at,
            row.last_tick_at,
            row.last_execution_id,
            row.updated_at,
        )


@dataclass(frozen=True)
class DueTick:
    """A tick to enqueue now, and the spec it was computed under."""

    declared: Declared
    tick: datetime
    spec: str

    @property
    def idempotency_key(self) -> str:
        """The key its execution is enqueued with."""
        return tick_key(self.declared.workflow, self.declared.schedule, self.tick)

    def fired_by(self, holder: KeyHolder) -> bool:
        """Whether ``holder``, found holding this tick's key, is this tick's execution:
        one of its workflow that no user triggered (maybe with an earlier deploy's
        input). Anything else holding the key (a user's execution from before keys were
        scoped, another schedule whose names join into the same key) is not."""
        return holder.workflow_id == self.declared.workflow and holder.triggered_by is None

    def fallback_key(self, holder: KeyHolder) -> str:
        """The key to enqueue the tick with when ``holder`` holds its own and is not its
        execution: the same in every pass (so still one execution), and no one else's."""
        suffix = f"#{holder.execution_id}"
        return self.idempotency_key[: MAX_KEY_LENGTH - len(suffix)] + suffix


@dataclass(frozen=True)
class KeyHolder:
    """The execution holding an idempotency key in the producers' scope."""

    execution_id: str
    workflow_id: str
    triggered_by: str | None


# --- statements (built once; bind parameters are prefixed ``b_``, as SQLAlchemy
# reserves column names in an UPDATE's SET) -------------------------------------------

_COLUMNS = (
    _table.c.workflow,
    _table.c.name,
    _table.c.spec,
    _table.c.paused,
    _table.c.next_tick_at,
    _table.c.last_tick_at,
    _table.c.last_execution_id,
    _table.c.updated_at,
)
SELECT_NOW = select(utcnow())
SELECT_ROWS = select(*_COLUMNS).where(
    _table.c.workflow.in_(bindparam("b_workflows", expanding=True))
)
INSERT_ROWS = {
    "postgresql": postgresql.insert(_table).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(_table).on_conflict_do_nothing(),
}
_TICK = bindparam("b_tick", type_=UTCDateTime())
_NEXT = bindparam("b_next", type_=UTCDateTime())
_ROW = (_table.c.workflow == bindparam("b_workflow")) & (_table.c.name == bindparam("b_name"))
# A deploy changed when the schedule fires: its next tick is computed anew. The CAS on
# the old spec lets one of several concurrent passes do it.
RESPEC = (
    update(_table)
    .where(_ROW, _table.c.spec == bindparam("b_old_spec"))
    .values(
        spec=bindparam("b_spec"),
        next_tick_at=_NEXT,
        updated_at=utcnow(),
    )
    .returning(*_COLUMNS)
)
# The tick was enqueued: move the row past it, unless a pass already moved it as far.
ADVANCE = (
    update(_table)
    .where(
        _ROW,
        _table.c.spec == bindparam("b_spec"),
        _table.c.next_tick_at <= _TICK,
    )
    .values(
        last_tick_at=_TICK,
        next_tick_at=_NEXT,
        last_execution_id=bindparam("b_execution_id"),
        updated_at=utcnow(),
    )
)
PAUSE = (
    update(_table)
    .where(_ROW, _table.c.paused.is_(False))
    .values(paused=True, updated_at=utcnow())
    .returning(*_COLUMNS)
)
# Resuming starts again at the first tick after now: the ticks missed while paused
# are not a backlog.
RESUME = (
    update(_table)
    .where(_ROW, _table.c.paused.is_(True))
    .values(paused=False, next_tick_at=_NEXT, updated_at=utcnow())
    .returning(*_COLUMNS)
)


# --- units of work: each takes a Connection and owns no transaction ------------------


def database_now(connection: Connection) -> datetime:
    """The database's clock: one clock for every beat and worker, whatever their skew."""
    now: datetime = connection.execute(SELECT_NOW).scalar_one()
    return now


def sync_rows(
    connection: Connection, schedules: Sequence[Declared], now: datetime
) -> dict[tuple[str, str], ScheduleState]:
    """The rows of ``schedules``, creating the missing ones and re-timing changed specs.

    A new row's first tick is the first after ``now``: a schedule never fires for the
    time before it was deployed. Concurrent callers may all try the insert; the
    primary key keeps one row.
    """
    if not schedules:
        return {}
    workflows = sorted({d.workflow for d in schedules})
    rows = _select(connection, workflows)
    missing = [d for d in schedules if d.key not in rows]
    if missing:
        dialect = connection.dialect.name
        connection.execute(
            INSERT_ROWS[dialect],
            [
                {
                    "workflow": d.workflow,
                    "name": d.schedule.label,
                    "spec": d.schedule.spec,
                    "paused": False,
                    "next_tick_at": d.schedule.next_after(now),
                }
                for d in missing
            ],
        )
        rows = _select(connection, workflows)
    for d in schedules:
        row = rows[d.key]
        if row.spec != d.schedule.spec:
            changed = connection.execute(
                RESPEC,
                {
                    "b_workflow": d.workflow,
                    "b_name": d.schedule.label,
                    "b_old_spec": row.spec,
                    "b_spec": d.schedule.spec,
                    "b_next": d.schedule.next_after(now),
                },
            ).one_or_none()
            rows[d.key] = ScheduleState.of(changed) if changed else _select_one(connection, d)
    return {d.key: rows[d.key] for d in schedules}


def _select(connection: Connection, workflows: list[str]) -> dict[tuple[str, str], ScheduleState]:
    found = connection.execute(SELECT_ROWS, {"b_workflows": workflows})
    return {(row.workflow, row.name): ScheduleState.of(row) for row in found}


def _select_one(connection: Connection, d: Declared) -> ScheduleState:
    return _select(connection, [d.workflow])[d.key]


def due_ticks(
    schedules: Sequence[Declared], rows: dict[tuple[str, str], ScheduleState], now: datetime
) -> list[DueTick]:
    """The tick each unpaused schedule should enqueue now: the latest at or before
    ``now`` once its row's next tick has come (one tick, however many were missed)."""
    due: list[DueTick] = []
    for d in schedules:
        row = rows.get(d.key)
        if row is None or row.paused or row.spec != d.schedule.spec:
            continue
        if row.next_tick_at is None or row.next_tick_at > now:
            continue
        tick = d.schedule.latest_at(now)
        if tick is not None and tick >= row.next_tick_at:
            due.append(DueTick(d, tick, row.spec))
    return due


def advance(connection: Connection, due: DueTick, execution_id: str) -> bool:
    """Record ``due`` as fired by ``execution_id`` and move the row to the next tick.

    False means the row had already been moved this far (a concurrent pass fired the
    same tick, whose enqueue returned the same execution), or its spec changed since.
    """
    result = connection.execute(
        ADVANCE,
        {
            "b_workflow": due.declared.workflow,
            "b_name": due.declared.schedule.label,
            "b_spec": due.spec,
            "b_tick": due.tick,
            "b_next": due.declared.schedule.next_after(due.tick),
            "b_execution_id": execution_id,
        },
    )
    return result.rowcount == 1


def key_holder(connection: Connection, key: str) -> KeyHolder | None:
    """The execution holding ``key`` in the producers' scope (ticks' keys are there)."""
    row = connection.execute(
        statements.select_by_idempotency_key(PRODUCER_SCOPE, key)
    ).one_or_none()
    return KeyHolder(row.execution_id, row.workflow_id, row.triggered_by) if row else None


def set_paused(
    connection: Connection, schedule: Declared, paused: bool, now: datetime
) -> ScheduleState | None:
    """Pause, or resume at the first tick after ``now``; None if it already was so.

    Creates the row first, so a schedule can be paused before its first tick.
    """
    sync_rows(connection, [schedule], now)
    statement = PAUSE if paused else RESUME
    changed = connection.execute(
        statement,
        {
            "b_workflow": schedule.workflow,
            "b_name": schedule.schedule.label,
            "b_next": schedule.schedule.next_after(now),
        },
    ).one_or_none()
    return ScheduleState.of(changed) if changed else None


def read_rows(
    connection: Connection, schedules: Sequence[Declared]
) -> dict[tuple[str, str], ScheduleState]:
    """The existing rows of ``schedules`` (none are created)."""
    if not schedules:
        return {}
    return _select(connection, sorted({d.workflow for d in schedules}))
