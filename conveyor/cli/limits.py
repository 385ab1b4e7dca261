"""``conveyor limits``: each concurrency or rate-limit key with its limit, the slots it
holds, the steps waiting for it, its rate and its pause; an operator's pause and resume.

Reads and writes go through core.limits' units of work, as the API's ``/limits`` does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from sqlalchemy import Connection

from conveyor.cli import documents, render
from conveyor.cli.main import CliState, JsonOption, app, fail, migrated, reported
from conveyor.cli.render import stdout
from core import limits, schema
from core.database import get_database
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.errors import KeyNotFound
from core.limits import KeyState

limits_app = typer.Typer(
    help="Concurrency and rate-limit keys: what each holds and holds back; pause and resume.",
    no_args_is_help=False,
)
app.add_typer(limits_app, name="limits")
KeyArgument = Annotated[
    str, typer.Argument(help="The key (see conveyor limits).", show_default=False)
]


def rate(per_second: float | None) -> str:
    """A steady rate per second, or per minute below one a second: '100/s', '50/min'."""
    if per_second is None:
        return "-"
    if per_second >= 1:
        return f"{round(per_second, 2):g}/s"
    return f"{round(per_second * 60, 2):g}/min"


def paused(until: datetime | None, now: datetime) -> str:
    """'2026-12-07 10:00 UTC (in 2h 03m)' while paused, else '-'."""
    if until is None or until <= now:
        return "-"
    return f"{render.moment(until)} ({render.relative(until, now)})"


def limits_table(states: list[KeyState]) -> Table:
    """One row per key: limit, running, waiting, rate, paused until."""
    now = datetime.now(UTC)
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("key", no_wrap=True)
    for column in ("limit", "running", "waiting", "rate"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("paused until", no_wrap=True)
    for state in states:
        table.add_row(
            state.key,
            str(state.limit) if state.limit is not None else "-",
            str(state.running),
            str(state.waiting),
            rate(state.rate_per_second),
            paused(state.paused_until, now),
        )
    return table


def document(state: KeyState) -> documents.Document:
    """A key as ``--json`` prints it (the fields of ``GET /limits``)."""
    return {
        "key": state.key,
        "limit": state.limit,
        "running": state.running,
        "waiting": state.waiting,
        "rate_per_second": state.rate_per_second,
        "paused_until": documents.timestamp(state.paused_until),
    }


@limits_app.callback(invoke_without_command=True)
@reported
def limits_command(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Option("--key", help="Only this key.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List each key: its concurrency limit, slots held (running), steps waiting for it,
    its rate and its pause."""
    if ctx.invoked_subcommand is not None:
        return  # pause and resume check the schema themselves
    schema.require_migrated(get_database().settings)
    states = SyncEnhancedExecutionStateManager().run(
        limits.key_states, None if key is None else [key]
    )
    if as_json:
        documents.emit([document(state) for state in states])
        return
    if not states:
        stdout().print(
            f"No key {key!r}."
            if key is not None
            else "No keys: a key appears once a step or execution under it is admitted or held."
        )
        return
    stdout().print(limits_table(states))


def _pause(conn: Connection, key: str, until: datetime) -> None:
    if not limits.key_states(conn, [key]):
        raise KeyNotFound(key)
    limits.pause_key(conn, key, until)


@limits_app.command("pause")
@reported
@migrated
def pause_command(
    key: KeyArgument,
    until: Annotated[
        str,
        typer.Option(
            "--until",
            help="When starts under it may resume: ISO 8601 with a timezone "
            "(2026-12-07T10:00:00Z).",
            show_default=False,
        ),
    ],
) -> None:
    """Pause a key: nothing under it starts until --until (running steps run on)."""
    try:
        moment = datetime.fromisoformat(until)
    except ValueError:
        fail(f"--until {until!r} is not an ISO 8601 date-time")
    if moment.tzinfo is None:
        fail(f"--until {until!r} has no timezone: add Z or an offset such as +02:00")
    if moment <= datetime.now(UTC):
        fail(f"--until {until!r} is not in the future")
    SyncEnhancedExecutionStateManager().run(_pause, key, moment)
    stdout().print(f"Paused key {key} until {render.moment(moment)}.", soft_wrap=True)


@limits_app.command("resume")
@reported
@migrated
def resume_command(ctx: typer.Context, key: KeyArgument) -> None:
    """Resume a paused key now: what it held (steps, pending executions) is admitted."""
    made_due = SyncEnhancedExecutionStateManager().run(limits.resume_key, key)
    if made_due is None:
        raise KeyNotFound(key)
    ctx.ensure_object(CliState).app.engine.key_resumed(key)
    stdout().print(f"Resumed key {key}: {made_due} held step(s) due now.", soft_wrap=True)
