"""``conveyor replay``: run a recorded step's current code here, with exactly what its
execution recorded, and print what it returns or raises (``worker.replay``)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from conveyor.cli.main import CliState, ExecutionId, StepArgument, app, migrated, reported
from conveyor.cli.render import stderr, stdout
from worker.replay import replay


@app.command("replay")
@reported
@migrated
def replay_command(
    ctx: typer.Context,
    execution_id: ExecutionId,
    step: StepArgument,
    item: Annotated[
        int | None, typer.Option("--item", help="A map step's item (its index) to replay.")
    ] = None,
    debug: Annotated[
        bool,
        typer.Option(
            "--pdb", help="Stop in pdb at the step's first line; post-mortem if it raises."
        ),
    ] = False,
) -> None:
    """Run STEP's current code in this process with the input, upstream outputs and
    attempt EXECUTION recorded for it, changing nothing of the execution; print its
    output (JSON) or its traceback (exit 1). Refused, with the reason, when the
    execution's payloads were cleared or the step's contract changed since it ran."""
    state = ctx.ensure_object(CliState)
    manager = state.app.engine.manager
    result = replay(manager.run, state.workflows, execution_id, step, item=item, debug=debug)
    if result.failed:
        stderr().print(result.traceback or "", markup=False, highlight=False, end="")
        raise typer.Exit(1)
    stdout().print(json.dumps(result.output, indent=2, sort_keys=True), markup=False)
