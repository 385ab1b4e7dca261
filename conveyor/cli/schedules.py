"""``conveyor schedules``: each declared schedule with its next run; pause and resume.

Reads and writes go through core.schedule_state's units of work; pausing creates the
schedule's row if no firing pass has yet, so a schedule can be paused before it first runs.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TypeVar
from zoneinfo import ZoneInfo

from rich import box
from rich.table import Table
from rich.text import Text
from sqlalchemy import Connection

from core import schedule_state, schedules
from core.execution_state_manager import SyncExecutionStateManager
from core.registry import WorkflowRegistry

T = TypeVar("T")


def _run(work: Callable[[Connection], T]) -> T:
    return SyncExecutionStateManager().run(work)


def local_time(moment: datetime | None, zone: ZoneInfo) -> str:
    """``moment`` in the schedule's time zone, with the zone's abbreviation, or '-'."""
    if moment is None:
        return "-"
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def schedules_table(registry: WorkflowRegistry) -> Table | None:
    """Each declared schedule: when it fires, its next and last run, and whether paused
    (None when no workflow has a schedule)."""
    declared = schedules.declared(registry)
    if not declared:
        return None

    def read(
        connection: Connection,
    ) -> tuple[datetime, dict[tuple[str, str], schedule_state.ScheduleState]]:
        now = schedule_state.database_now(connection)
        return now, schedule_state.read_rows(connection, declared)

    now, rows = _run(read)
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("workflow", "schedule", "when", "timezone", "next run", "last run", "paused"):
        table.add_column(column, no_wrap=column not in ("last run",))
    for d in declared:
        row = rows.get(d.key)
        zone = d.schedule.zone
        paused = row is not None and row.paused
        # No row yet: no pass has seen it, and the first will aim at its next tick.
        upcoming = row.next_tick_at if row is not None else d.schedule.next_after(now)
        if paused:
            next_run = Text("paused", style="yellow")
        elif upcoming is not None and upcoming < now:
            next_run = Text(f"{local_time(upcoming, zone)} (overdue)", style="bold red")
        else:
            next_run = Text(local_time(upcoming, zone))
        last = "-"
        if row is not None and row.last_tick_at is not None:
            last = local_time(row.last_tick_at, zone)
            if row.last_execution_id:
                last += f" {row.last_execution_id}"
        table.add_row(
            d.workflow,
            d.schedule.label,
            d.schedule.when,
            d.schedule.timezone,
            next_run,
            last,
            Text("yes", style="yellow") if paused else "no",
        )
    return table


def set_paused(registry: WorkflowRegistry, workflow: str, name: str, paused: bool) -> str:
    """Pause or resume one schedule; what happened, as a sentence."""
    found = schedules.find(registry, workflow, name)

    def change(connection: Connection) -> schedule_state.ScheduleState | None:
        now = schedule_state.database_now(connection)
        return schedule_state.set_paused(connection, found, paused, now)

    changed = _run(change)
    what = f"schedule {found.schedule.label!r} of {found.workflow!r}"
    if changed is None:
        return f"The {what} was already {'paused' if paused else 'running'}."
    if paused:
        return f"Paused the {what}."
    return f"Resumed the {what}; next run {local_time(changed.next_tick_at, found.schedule.zone)}."
