"""``conveyor resolve`` and ``conveyor skip``: repair a failed execution by hand
(``core.repair``): give a failed step an output, or skip it, and the execution goes on
from there. Recorded in its history with who did it (the command line's user) and why."""

from __future__ import annotations

from typing import Annotated

import typer

from conveyor.cli.main import (
    CliState,
    ExecutionId,
    StepArgument,
    actor,
    app,
    migrated,
    parse_input,
    reported,
)
from conveyor.cli.render import stdout

ReasonOption = Annotated[
    str | None, typer.Option("--reason", help="Why: recorded in the execution's history.")
]


@app.command("resolve")
@reported
@migrated
def resolve_command(
    ctx: typer.Context,
    execution_id: ExecutionId,
    step: StepArgument,
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            metavar="JSON",
            help="The step's output: JSON, @FILE, or - for stdin; checked against the "
            "step's return annotation.",
        ),
    ],
    reason: ReasonOption = None,
) -> None:
    """Complete failed STEP of an ended execution with --output and go on from there:
    its dependents run with that output (other unfinished steps run again too)."""
    value = parse_input(output, "--output")
    engine = ctx.ensure_object(CliState).app.engine
    done = engine.resolve(execution_id, step, value, actor=actor(), reason=reason)
    stdout().print(
        f"Resolved step {step} of {execution_id}; the execution goes on "
        f"({done.workflow}, pending its start).",
        soft_wrap=True,
    )


@app.command("skip")
@reported
@migrated
def skip_command(
    ctx: typer.Context, execution_id: ExecutionId, step: StepArgument, reason: ReasonOption = None
) -> None:
    """Skip failed STEP of an ended execution and go on from there: its all_success
    dependents are skipped, none_failed and all_done ones run."""
    engine = ctx.ensure_object(CliState).app.engine
    done = engine.skip(execution_id, step, actor=actor(), reason=reason)
    also = f"; skipped with it: {', '.join(done.skipped)}" if done.skipped else ""
    stdout().print(f"Skipped step {step} of {execution_id}{also}.", soft_wrap=True)
