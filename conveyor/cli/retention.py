"""``conveyor prune``: one retention pass now (``core.retention``), or with
``--dry-run`` what it would delete and clear, by workflow."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from conveyor.cli import documents, render
from conveyor.cli.main import CliState, JsonOption, app, migrated, reported
from conveyor.cli.render import stdout
from core.retention import PruneReport

WHAT = {
    "succeeded": "succeeded executions deleted",
    "failed": "failed, cancelled and timed-out executions deleted",
    "payloads": "executions' payloads cleared",
}


def report_document(report: PruneReport) -> documents.Document:
    """A pass as ``--json`` prints it."""
    return {
        "dry_run": report.dry_run,
        "capped": report.capped,
        "parts": [
            {
                "workflow": part.workflow,
                "what": part.what,
                "ended_before": documents.timestamp(part.cutoff),
                "count": part.count,
                "batches": part.batches,
            }
            for part in report.parts
        ],
    }


@app.command("prune")
@reported
@migrated
def prune_command(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what a pass would remove; change nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete finished executions past their workflow's retention (with their steps,
    items and history) and clear payloads past theirs, as beat's conveyor.prune does."""
    engine = ctx.ensure_object(CliState).app.engine
    report = engine.prune(dry_run=dry_run)
    if as_json:
        documents.emit(report_document(report))
        return
    verb = "Would remove" if dry_run else "Removed"
    shown = [p for p in report.parts if p.count]
    if not shown:
        stdout().print("Nothing is past its retention." if dry_run else "Nothing to remove.")
        return
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("workflow", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("what")
    table.add_column("ended before", no_wrap=True)
    for part in shown:
        table.add_row(part.workflow, str(part.count), WHAT[part.what], render.moment(part.cutoff))
    stdout().print(f"{verb}:")
    stdout().print(table)
    if report.capped:
        stdout().print("Stopped at CONVEYOR_PRUNE_MAX_BATCHES: run it again for the rest.")
