"""``conveyor versions``: the workflow shapes recorded, what uses each (open executions,
steps handed back for a compatible worker, live workers); ``check``, a deploy's CI gate
(exit 1 when the code at hand would strand open executions); ``migrate``, moving an
execution to the code at hand.

The code at hand is this process's registry (``CONVEYOR_WORKFLOW_MODULES``): run
``check`` with the release about to be deployed.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from conveyor.cli import documents, render
from conveyor.cli.main import (
    CliState,
    ExecutionId,
    JsonOption,
    actor,
    app,
    fail,
    migrated,
    reported,
)
from conveyor.cli.render import stdout
from core import schema, shapes
from core.database import get_database
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.shapes import SHORT, Shape, ShapeUse, Stranded, shape_of

versions_app = typer.Typer(
    help="Workflow shapes across deploys: what each runs, what a deploy would strand, "
    "moving an execution to the current code.",
    no_args_is_help=False,
)
app.add_typer(versions_app, name="versions")


def _current(state: CliState) -> dict[tuple[str, int], Shape]:
    return {(w.name, w.version): shape_of(w) for w in state.workflows}


def use_document(use: ShapeUse, current: set[str]) -> documents.Document:
    """A shape as ``--json`` prints it (the fields of ``GET /versions``)."""
    return {
        "shape": use.shape_hash,
        "workflow": use.workflow,
        "version": use.version,
        "recorded_at": documents.timestamp(use.created_at),
        "current": use.shape_hash in current,
        "open_executions": use.open_executions,
        "held_steps": use.held_steps,
        "live_workers": use.live_workers,
    }


def stranded_document(found: Stranded) -> documents.Document:
    """A stranded execution as ``check --json`` prints it."""
    return {
        "execution_id": found.execution_id,
        "workflow": found.workflow,
        "shape": found.shape,
        "status": found.status,
        "reason": found.reason,
    }


@versions_app.callback(invoke_without_command=True)
@reported
def versions_command(
    ctx: typer.Context,
    workflow: Annotated[str | None, typer.Option("--workflow", help="Only this workflow.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List the recorded shapes of each workflow: the one this code has (current), open
    executions on each, their steps held for a compatible worker, and live workers."""
    if ctx.invoked_subcommand is not None:
        return

    schema.require_migrated(get_database().settings)
    state = ctx.ensure_object(CliState)
    live_within = get_database().settings.stall_timeout
    uses = SyncEnhancedExecutionStateManager().run(shapes.shape_uses, live_within, workflow)
    current = {s.hash for s in _current(state).values()}
    if as_json:
        documents.emit([use_document(use, current) for use in uses])
        return
    if not uses:
        stdout().print(
            "No shapes recorded yet: a shape is recorded when an execution of it "
            "is created or a worker with it starts."
        )
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("workflow", "version", "shape", "recorded"):
        table.add_column(column, no_wrap=True)
    for column in ("open", "held", "live workers"):
        table.add_column(column, justify="right", no_wrap=True)
    for use in uses:
        mark = " (this code)" if use.shape_hash in current else ""
        table.add_row(
            use.workflow,
            str(use.version),
            use.shape_hash[:SHORT] + mark,
            render.moment(use.created_at),
            str(use.open_executions),
            str(use.held_steps),
            str(use.live_workers),
        )
    stdout().print(table)


@versions_app.command("check")
@reported
@migrated
def check_command(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Exit 1, listing them, when open executions could not be finished by this code
    (run it with the release about to be deployed: a CI gate); 0 when none."""
    state = ctx.ensure_object(CliState)
    current = _current(state)
    found = SyncEnhancedExecutionStateManager().run(
        shapes.stranded, current, {name for name, _ in current}
    )
    if as_json:
        documents.emit([stranded_document(s) for s in found])
    elif not found:
        stdout().print("Every open execution can be finished by this code.")
    else:
        table = Table(box=box.SIMPLE_HEAD)
        for column in ("execution", "workflow", "shape", "status", "why this code cannot"):
            table.add_column(column, no_wrap=column != "why this code cannot")
        for s in found:
            table.add_row(s.execution_id, s.workflow, (s.shape or "-")[:SHORT], s.status, s.reason)
        stdout().print(table)
        stdout().print(
            f"{len(found)} open execution(s) would wait for a worker of their own shape: "
            "keep such a worker up until they finish, or move them with "
            "`conveyor versions migrate EXECUTION`.",
            soft_wrap=True,
        )
    if found:
        raise typer.Exit(1)


@versions_app.command("migrate")
@reported
@migrated
def migrate_command(
    ctx: typer.Context,
    execution_id: ExecutionId,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar="SHAPE",
            help="The shape to move it to (at least 6 digits of its hash); it must be this "
            "code's shape of the workflow (the default).",
        ),
    ] = None,
) -> None:
    """Move an open execution to this code's shape of its workflow: steps the code no
    longer has are removed, steps it adds are created, and its held steps run."""
    state = ctx.ensure_object(CliState)
    engine = state.app.engine
    execution = engine.manager.get_execution(execution_id)
    candidates = [w for w in state.workflows if w.name == execution.workflow_id]
    if to is not None:
        wanted = to.lower()
        candidates = [w for w in candidates if shape_of(w).hash.startswith(wanted)]
        if len(wanted) < 6:
            fail(f"--to {to!r}: name a shape by at least 6 digits of its hash")
    if not candidates:
        fail(
            f"this code has no shape of workflow {execution.workflow_id!r}"
            + (f" starting {to!r}" if to else "")
            + ": run migrate with the release that has it (CONVEYOR_WORKFLOW_MODULES)"
        )
    workflow = max(candidates, key=lambda w: w.version)
    moved = engine.migrate(execution_id, workflow, actor=actor())
    details = [
        f"removed {', '.join(moved.removed)}" if moved.removed else "",
        f"added {', '.join(moved.added)}" if moved.added else "",
        f"queued {', '.join(moved.queued)}" if moved.queued else "",
    ]
    stdout().print(
        f"Moved {execution_id} to shape {shape_of(workflow).short} of {workflow.name}"
        + "".join(f"; {d}" for d in details if d)
        + ".",
        soft_wrap=True,
    )
