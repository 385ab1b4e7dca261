"""``conveyor failures``: failed steps grouped by failure (workflow, step, error type,
normalised message), most first; retrying or resolving a whole group (``core.failures``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from conveyor.cli import documents, render
from conveyor.cli.main import (
    CliState,
    JsonOption,
    actor,
    app,
    fail,
    migrated,
    parse_input,
    reported,
)
from conveyor.cli.render import stdout
from core import failures, schema
from core.database import get_database
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.failures import BulkAction, FailureGroup

failures_app = typer.Typer(
    help="Failed steps grouped by failure; retry or resolve a whole group.",
    no_args_is_help=False,
)
app.add_typer(failures_app, name="failures")
GroupArgument = Annotated[
    str, typer.Argument(help="The group (see conveyor failures).", show_default=False)
]
AsOfOption = Annotated[
    str | None,
    typer.Option(
        "--as-of",
        help="Only steps that failed at or before this ISO 8601 time (default: now).",
    ),
]
PAGE = 500


def document(group: FailureGroup) -> documents.Document:
    """A group as ``--json`` prints it (the fields of ``GET /failures``)."""
    return {
        "group": group.group,
        "workflow": group.workflow,
        "step": group.step,
        "error_type": group.error_type,
        "message": group.message,
        "count": group.count,
        "first_seen": documents.timestamp(group.first_seen),
        "last_seen": documents.timestamp(group.last_seen),
        "example_execution_id": group.example_execution_id,
    }


@failures_app.callback(invoke_without_command=True)
@reported
def failures_command(
    ctx: typer.Context,
    workflow: Annotated[str | None, typer.Option("--workflow", help="Only this workflow.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List the failure groups: how many steps failed the same way, first and last
    time, an example execution."""
    if ctx.invoked_subcommand is not None:
        return
    schema.require_migrated(get_database().settings)
    found = SyncEnhancedExecutionStateManager().run(
        failures.failure_groups, workflow=workflow, limit=500
    )
    if as_json:
        documents.emit([document(group) for group in found])
        return
    if not found:
        stdout().print("No failed steps.")
        return
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("count", justify="right", no_wrap=True)
    for column in ("group", "workflow", "step", "error"):
        table.add_column(column, no_wrap=column != "error")
    for column in ("first", "last", "example"):
        table.add_column(column, no_wrap=True)
    for group in found:
        table.add_row(
            str(group.count),
            group.group,
            group.workflow,
            group.step,
            f"{group.error_type}: {group.message}",
            render.moment(group.first_seen) if group.first_seen else "-",
            render.moment(group.last_seen) if group.last_seen else "-",
            group.example_execution_id,
        )
    stdout().print(table)


def _as_of(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--as-of {text!r} is not an ISO 8601 date-time")
    if moment.tzinfo is None:
        fail(f"--as-of {text!r} has no timezone: add Z or an offset such as +02:00")
    return moment


def _report(what: str, group: str, total: int, last: BulkAction) -> None:
    left = f"; {last.remaining} left that could not be" if last.remaining else ""
    stdout().print(f"{what} {total} execution(s) of group {group}{left}.", soft_wrap=True)


@failures_app.command("retry")
@reported
@migrated
def retry_command(ctx: typer.Context, group: GroupArgument, as_of: AsOfOption = None) -> None:
    """Retry every execution whose step failed in GROUP (at or before --as-of): each
    once, a page at a time."""
    engine = ctx.ensure_object(CliState).app.engine
    moment, total = _as_of(as_of), 0
    while True:
        done = engine.retry_group(group, as_of=moment, limit=PAGE)
        total += done.applied
        if done.remaining == 0 or done.applied == 0:
            break
    _report("Retried", group, total, done)


@failures_app.command("resolve")
@reported
@migrated
def resolve_command(
    ctx: typer.Context,
    group: GroupArgument,
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", metavar="JSON", help="The output: JSON, @FILE, or - for stdin."
        ),
    ],
    reason: Annotated[
        str | None, typer.Option("--reason", help="Recorded in each history.")
    ] = None,
    as_of: AsOfOption = None,
) -> None:
    """Resolve every step that failed in GROUP (at or before --as-of) with --output:
    each execution goes on from there."""
    value = parse_input(output, "--output")
    engine = ctx.ensure_object(CliState).app.engine
    moment, total = _as_of(as_of), 0
    while True:
        done = engine.resolve_group(
            group, value, actor=actor(), reason=reason, as_of=moment, limit=PAGE
        )
        total += done.applied
        if done.remaining == 0 or done.applied == 0:
            break
    _report("Resolved", group, total, done)
