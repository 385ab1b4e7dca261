"""Rich renderings for the command line: tables of executions, steps and workflows, DAG trees."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console, RenderableType
from rich.json import JSON
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from core.limits import why_held
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from core.shapes import VERSION_WAIT, VERSION_WHY
from core.workflows import Workflow

STATUS_STYLES: dict[str, str] = {
    "pending": "dim",
    "queued": "blue",
    "running": "cyan",
    "waiting": "bright_blue",
    "succeeded": "green",
    "failed": "bold red",
    "skipped": "dim",
    "cancelled": "yellow",
    "timed_out": "magenta",
}
ID_WIDTH = 36
# Tables written to a pipe are not cut to 80 columns: one row stays one line for grep.
PIPE_WIDTH = 160
# A step joining more branches than this lists how many, not their names.
NAMED_UPSTREAMS = 3


def stdout() -> Console:
    """A console on stdout, wide enough when piped for a table row to stay one line."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


def stderr() -> Console:
    """A console on stderr (errors, progress)."""
    return Console(stderr=True, highlight=False)


def status_text(status: str) -> Text:
    """A status, coloured by where it stands."""
    return Text(status, style=STATUS_STYLES.get(status, ""))


def when(value: datetime | None) -> str:
    """A timestamp in UTC to the second, or '-'."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def duration(seconds: float) -> str:
    """Seconds as '0.42s', '12.3s', '4m05s' or '2h03m'."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def moment(value: datetime) -> str:
    """A moment to the minute, named in UTC: '2026-12-07 10:00 UTC'."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def relative(value: datetime, now: datetime | None = None) -> str:
    """How far ``value`` is from now in its two largest units: 'in 2d 3h', 'in 4m 05s',
    '12s ago'."""
    seconds = int((value - (now or datetime.now(UTC))).total_seconds())
    left = abs(seconds)
    days, left = divmod(left, 86400)
    hours, left = divmod(left, 3600)
    minutes, secs = divmod(left, 60)
    if days:
        text = f"{days}d {hours}h"
    elif hours:
        text = f"{hours}h {minutes:02d}m"
    elif minutes:
        text = f"{minutes}m {secs:02d}s"
    else:
        text = f"{secs}s"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


HELD = {
    "concurrency": "no free slot",
    "rate": "rate limited until {}",
    "paused": "paused until {}",
}


def waits_for(
    step: StepExecution,
    children: Mapping[str, str] | None = None,
    now: datetime | None = None,
    pauses: Mapping[str, datetime | None] | None = None,
) -> str:
    """What a waiting step waits for ('until 2026-12-07 10:00 UTC (in 2d 3h)', 'event
    invoice.approved key inv-42 (times out ...)', 'child <id> (running)', 'key openai (no
    free slot)'); '' for a step that is not waiting. ``children``: child execution
    statuses by id; ``pauses``: the pause of each key holding a step back."""
    if step.status != "waiting" or step.wait_kind is None:
        return ""
    if step.wait_kind == "key":
        return held_by(step, now or datetime.now(UTC), pauses)
    if step.wait_kind == VERSION_WAIT:
        return VERSION_WHY
    if step.wait_kind == "sleep":
        if step.wake_at is None:
            return "sleep (not armed yet)"
        return f"until {moment(step.wake_at)} ({relative(step.wake_at, now)})"
    if step.wait_kind == "event":
        if step.wait_event is None:
            return "event (not armed yet)"
        text = f"event {step.wait_event}"
        if step.wait_key:
            text += f" key {step.wait_key}"
        if step.wake_at is not None:
            text += f" (times out {moment(step.wake_at)}, {relative(step.wake_at, now)})"
        return text
    if step.child_execution_id is None:
        return "child (not started yet)"
    status = (children or {}).get(step.child_execution_id)
    return f"child {step.child_execution_id}" + (f" ({status})" if status else "")


def held_by(
    step: StepExecution, now: datetime, pauses: Mapping[str, datetime | None] | None
) -> str:
    """What holds back a step behind limits: 'key openai (no free slot)', 'key openai
    (rate limited until 2026-12-07 10:00 UTC, in 4s)', 'key openai (paused until ...)';
    with no key, its admission is due (as after a retry's backoff)."""
    if step.wait_key is None:
        due = f" at {moment(step.wake_at)} ({relative(step.wake_at, now)})" if step.wake_at else ""
        return f"admission under its limits{due}"
    why = why_held(step.wake_at, (pauses or {}).get(step.wait_key), now)
    until = f"{moment(step.wake_at)}, {relative(step.wake_at, now)}" if step.wake_at else ""
    return f"key {step.wait_key} ({HELD[why].format(until)})"


ITEM_ORDER = ("queued", "running", "succeeded", "failed", "cancelled", "pending")


def map_summary(step: StepExecution, counts: Mapping[str, int] | None) -> str:
    """A map step's items in one line: '37/100 done: queued 4 · running 4 · succeeded 36
    · failed 1 (tolerated <= 3)'; '' for any other step."""
    if step.wait_kind != "map":
        return ""
    if step.map_total is None:
        return "items: not expanded yet"
    done = step.map_total - (step.map_left or 0)
    parts = [f"{s} {counts[s]:,}" for s in ITEM_ORDER if counts and counts.get(s)]
    text = f"{done:,}/{step.map_total:,} done" + (": " + " · ".join(parts) if parts else "")
    if step.map_max_failed:
        text += f" (tolerated <= {step.map_max_failed:,})"
    return text


def elapsed(started: datetime | None, finished: datetime | None) -> str:
    """How long something ran (so far, while it runs), or '-' if it has not started."""
    if started is None:
        return "-"
    end = finished or datetime.now(UTC)
    return duration(max(0.0, (end - started).total_seconds()))


def error_summary(error: Any) -> str:
    """'Type: message' of a stored error record, or '' when there is none."""
    if not error:
        return ""
    if not isinstance(error, dict):
        return str(error)
    kind = str(error.get("type") or "Error")
    message = error.get("message")
    summary = f"{kind}: {message}" if message else kind
    step = error.get("step")
    return f"step {step}: {summary}" if step else summary


def error_type(error: Any) -> str:
    """The exception type of a stored error record, or ''."""
    if isinstance(error, dict):
        return str(error.get("type") or "")
    return ""


def executions_table(executions: Iterable[WorkflowExecution]) -> Table:
    """One row per execution: id, workflow, status, attempt, created, duration."""
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("execution", no_wrap=True, min_width=ID_WIDTH)
    table.add_column("workflow", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("attempt", justify="right")
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    for execution in executions:
        status = status_text(execution.status)
        if execution.status == "running" and execution.parked_at is not None:
            status.append(" (waiting)", style=STATUS_STYLES["waiting"])  # every open step waits
        if execution.status == "pending" and execution.debounce_key is not None:
            status.append(" (debounced)", style="default")  # its window is open
        table.add_row(
            execution.execution_id,
            f"{execution.workflow_id} v{execution.workflow_version}",
            status,
            str(execution.attempt),
            when(execution.created_at),
            elapsed(execution.started_at, execution.finished_at),
        )
    return table


def outcome(execution: WorkflowExecution) -> Text:
    """'succeeded: linear <id> after 1.20s', with the attempt when it is not the first."""
    line = status_text(execution.status)
    took = elapsed(execution.started_at, execution.finished_at)
    line.append(f": {execution.workflow_id} {execution.execution_id} after {took}", style="default")
    if execution.attempt > 1:
        line.append(f" (attempt {execution.attempt})", style="default")
    return line


def execution_summary(execution: WorkflowExecution) -> Table:
    """The execution's own fields, one per line; output as JSON."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    status = status_text(execution.status)
    status.append(f"  (attempt {execution.attempt})", style="default")
    rows: list[tuple[str, RenderableType]] = [
        ("execution", execution.execution_id),
        *([("parent", execution.parent_execution_id)] if execution.parent_execution_id else []),
        ("workflow", f"{execution.workflow_id} v{execution.workflow_version}"),
        ("status", status),
        ("created", when(execution.created_at)),
        ("started", when(execution.started_at)),
        ("finished", when(execution.finished_at)),
        ("took", elapsed(execution.started_at, execution.finished_at)),
    ]
    if execution.parked_at is not None and execution.status == "running":
        rows.append(("waiting since", when(execution.parked_at)))
    if execution.debounce_key is not None and execution.status == "pending":
        # An open debounce window: later enqueues with its key replace the input and push
        # the start a period on, up to the latest start.
        rows.append(("debounce key", execution.debounce_key))
        rows.append(("starts", when(execution.start_at)))
        if execution.latest_start_at is not None:
            rows.append(("starts at the latest", when(execution.latest_start_at)))
    if execution.deadline_at is not None:
        rows.append(("deadline", when(execution.deadline_at)))
    if execution.priority:
        rows.append(("priority", str(execution.priority)))
    if execution.idempotency_key:
        rows.append(("idempotency key", execution.idempotency_key))
    if execution.error:
        rows.append(("error", Text(error_summary(execution.error), style="red")))
    if execution.output_data is not None:
        rows.append(("output", JSON.from_data(execution.output_data)))
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def steps_table(
    steps: Sequence[StepExecution],
    order: Sequence[str] = (),
    children: Mapping[str, str] | None = None,
    items: Mapping[str, Mapping[str, int]] | None = None,
    queues: Mapping[str, str] | None = None,
    unconsumed: Collection[str] = (),
    skip_reasons: Mapping[str, str] | None = None,
    pauses: Mapping[str, datetime | None] | None = None,
) -> Table:
    """One row per step (in DAG order when ``order`` is given): status, attempt, time,
    error, and, while any step waits, what each waiting one waits for (``children``:
    child execution statuses by id); a map step's items counted by status (``items``);
    with ``queues``, each step's queue, flagged on a queued step when it is one of
    ``unconsumed`` (no live worker consumes it); when a step was skipped, why
    (``skip_reasons``, by step name); ``pauses``: the pause of each key holding a step
    back."""
    position = {name: index for index, name in enumerate(order)}
    ranked = sorted(steps, key=lambda s: (position.get(s.step_name, len(position)), s.step_name))
    now = datetime.now(UTC)
    waits = {
        s.step_name: map_summary(s, (items or {}).get(s.step_name))
        if s.wait_kind == "map"
        else waits_for(s, children, now, pauses)
        for s in ranked
    }
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("step", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("attempt", justify="right", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    if queues is not None:
        table.add_column("queue", no_wrap=True)
    table.add_column("error")
    waiting = any(waits.values())
    if waiting:
        table.add_column(
            "waits for" if not any(s.wait_kind == "map" for s in ranked) else "waits for / items"
        )
    why = {s.step_name: (skip_reasons or {}).get(s.step_name, "") for s in ranked}
    skipped = any(s.status == "skipped" for s in ranked)
    if skipped:
        table.add_column("skipped because")
    for step in ranked:
        cells: list[RenderableType] = [
            step.step_name,
            status_text(step.status),
            f"{step.policy_attempt}/{step.max_attempts}",
            elapsed(step.started_at, step.finished_at),
        ]
        if queues is not None:
            cells.append(queue_text(step, queues.get(step.step_name, "-"), unconsumed))
        # A step that succeeded after a retry keeps its last error on the row: not shown.
        shown = step.error if step.status != "succeeded" else None
        cells.append(Text(error_type(shown), style="red"))
        if waiting:
            cells.append(waits[step.step_name])
        if skipped:
            cells.append(Text(why[step.step_name] if step.status == "skipped" else "", "dim"))
        table.add_row(*cells)
    return table


def queue_text(step: StepExecution, queue: str, unconsumed: Collection[str]) -> Text:
    """A step's queue; flagged when the step is queued there and no live worker consumes it."""
    if step.status == "queued" and queue in unconsumed:
        return Text(f"{queue} (no worker)", style="bold red")
    return Text(queue)


def unconsumed_hint(stuck: Mapping[str, int]) -> Text:
    """What to do about steps queued (``stuck``: how many, by queue) on queues no live
    worker consumes."""
    parts = ", ".join(f"{count} on {queue!r}" for queue, count in sorted(stuck.items()))
    queues = ",".join(sorted(stuck))
    return Text(
        f"Queued step(s) no live worker consumes ({parts}): they wait until a worker "
        f"takes the queue, e.g. `celery -A worker.app worker -Q {queues}`.",
        style="yellow",
    )


def _step_label(
    name: str, row: StepExecution | None, also_after: Sequence[str], kind: str | None = None
) -> Text:
    label = Text(name, style="bold")
    if kind is not None and kind != "task":
        label.append(f" [{kind}]", style="bright_blue")  # a wait node: it holds no worker
    label.append("  ")
    if row is None:
        label.append("(no row)", style="dim")
    else:
        label.append_text(status_text(row.status))
        if row.attempt > 1:
            label.append(f" (attempt {row.attempt})")
    if also_after:
        names = (
            ", ".join(also_after)
            if len(also_after) <= NAMED_UPSTREAMS
            else f"{len(also_after)} more steps"
        )
        label.append(f"  also after {names}", style="dim")
    return label


def dag_tree(
    execution: WorkflowExecution, steps: Sequence[StepExecution], workflow: Workflow | None
) -> Tree:
    """The DAG as a tree: each step once, under the upstream step that comes last.

    Without the workflow's definition the dependencies are unknown: the steps are
    listed flat, from their rows.
    """
    rows = {step.step_name: step for step in steps}
    label = Text(f"{execution.workflow_id} v{execution.workflow_version}", style="bold")
    if workflow is None:
        label.append("  (definition not registered here: dependencies unknown)", style="dim")
    root = Tree(label)
    if workflow is None:
        for name in sorted(rows):
            root.add(_step_label(name, rows[name], (), rows[name].kind))
        return root
    order = list(workflow.order())
    position = {name: index for index, name in enumerate(order)}
    nodes: dict[str, Tree] = {}
    for name in order:
        upstream = sorted(workflow.steps[name].depends_on, key=position.__getitem__)
        parent = nodes[upstream[-1]] if upstream else root
        kind = workflow.steps[name].kind
        nodes[name] = parent.add(_step_label(name, rows.get(name), upstream[:-1], kind))
    for name in sorted(set(rows) - set(order)):  # rows the definition no longer has
        root.add(_step_label(name, rows[name], (), rows[name].kind))
    return root


def history_table(events: Iterable[ExecutionEvent]) -> Table:
    """Every recorded transition, oldest first."""
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("step", no_wrap=True)
    table.add_column("transition", no_wrap=True)
    table.add_column("attempt", justify="right")
    table.add_column("reason")
    for event in events:
        transition = Text(event.from_status or "(new)")
        transition.append(" -> ")
        transition.append_text(status_text(event.to_status))
        table.add_row(
            when(event.created_at),
            event.step_name or "(execution)",
            transition,
            str(event.attempt or ""),
            event.reason or "",
        )
    return table


def workflows_table(workflows: Iterable[Workflow]) -> Table:
    """One row per registered workflow version."""
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("workflow", no_wrap=True)
    table.add_column("version", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("max concurrency", justify="right")
    table.add_column("deadline", justify="right")
    table.add_column("description")
    for workflow in workflows:
        deadline = workflow.deadline
        table.add_row(
            workflow.name,
            str(workflow.version),
            str(len(workflow.steps)),
            str(workflow.max_concurrency) if workflow.max_concurrency else "-",
            duration(deadline.total_seconds()) if deadline else "-",
            workflow.description,
        )
    return table
