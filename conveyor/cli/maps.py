"""``conveyor items``: the items of a map step, a page at a time."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from conveyor.cli import documents, render
from conveyor.cli.main import ExecutionId, JsonOption, StepArgument, app, fail, migrated, reported
from conveyor.cli.render import stdout
from core import maps
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.errors import StepNotFound
from core.states import StepStatus

ITEM_STATUSES = ("pending", "queued", "running", "succeeded", "failed", "cancelled")


@app.command("items")
@reported
@migrated
def items_command(
    execution_id: ExecutionId,
    step: StepArgument,
    status: Annotated[
        str | None, typer.Option(help=f"Only items in this status ({', '.join(ITEM_STATUSES)}).")
    ] = None,
    after: Annotated[
        int | None, typer.Option(min=0, help="Start after this item index (the next page).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List the items of a map step: index, status, attempt, duration, worker, error."""
    if status is not None and status not in ITEM_STATUSES:
        fail(f"--status {status!r} is no item status; use one of {', '.join(ITEM_STATUSES)}")
    manager = SyncEnhancedExecutionStateManager()
    found = next((s for s in manager.get_steps(execution_id) if s.step_name == step), None)
    if found is None:
        raise StepNotFound(execution_id, step)
    if found.wait_kind != "map":
        fail(f"step {step} is a {found.kind}, not a map: it has no items")
    page = manager.run(maps.item_page, execution_id, step, status=status, after=after, limit=limit)
    if as_json:
        documents.emit(
            {
                "items": [
                    {
                        "index": r.item_index,
                        "status": r.status,
                        "attempt": r.attempt,
                        "policy_attempt": r.attempt - r.recoveries,
                        "worker": r.worker,
                        "started_at": documents.timestamp(r.started_at),
                        "finished_at": documents.timestamp(r.finished_at),
                        "error": r.error,
                        "output": r.output_data,
                    }
                    for r in page.items
                ],
                "next": page.next,
            }
        )
        return
    console = stdout()
    if not page.items:
        console.print("No items found.")
        return
    table = Table(box=box.SIMPLE_HEAD)
    for name, justify in (
        ("item", "right"),
        ("status", "left"),
        ("attempt", "right"),
        ("took", "right"),
        ("worker", "left"),
        ("error", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "error")  # type: ignore[arg-type]
    for row in page.items:
        table.add_row(
            str(row.item_index),
            render.status_text(row.status),
            str(row.attempt - row.recoveries),
            render.elapsed(row.started_at, row.finished_at)
            if row.status != StepStatus.PENDING.value
            else "-",
            row.worker or "-",
            Text(render.error_summary(row.error), style="red"),
        )
    console.print(table)
    if page.next is not None:
        more = f" --status {status}" if status else ""
        console.print(
            f"More: conveyor items {execution_id} {step}{more} --after {page.next}",
            soft_wrap=True,
        )
