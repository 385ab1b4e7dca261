"""The ``conveyor`` command: migrate, run, status, list, cancel, retry, wake, signal,
events, workflows, schedules, limits, demo.

Commands are thin: reads go through core's state manager, writes through the worker's
producer and engine. Every ConveyorError becomes one red line on stderr and exit
status 1; usage errors exit 2. Nothing here prints the database or broker URL. Each
command that touches state first checks that the schema is at head (``core.schema``),
so an unmigrated database is met with "run `conveyor migrate`", and is never created.
"""

from __future__ import annotations

import functools
import getpass
import importlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec, TypeVar
from urllib.parse import unquote, urlsplit

import typer
from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from pydantic import ValidationError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text
from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from conveyor.cli import documents, render
from conveyor.cli import schedules as cli_schedules
from conveyor.cli.render import stderr, stdout
from core import limits, maps, schema
from core.conditions import skip_reasons
from core.database import get_database
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.errors import ConveyorError, translate
from core.executions import ListedStatus
from core.executions import list_executions as list_rows
from core.models import StepExecution, WorkflowExecution
from core.registry import WorkflowRegistry, get_registry
from core.states import EXECUTIONS, STEPS, ExecutionStatus, StepStatus
from core.workflows import Workflow
from migrations import alembic_config
from worker.producer import enqueue, send_event, signal, wake
from worker.queues import live_queues

if TYPE_CHECKING:
    from worker.app import ConveyorCelery

P = ParamSpec("P")
R = TypeVar("R")

FAILED = 1
USAGE = 2
INTERRUPTED = 130
POLL_SECONDS = 0.2
# Seconds an execution may stay pending under --wait before asking whether any worker
# is up: long enough that a normal start never pays for the ping.
HINT_AFTER = 5.0
PING_TIMEOUT = 1.0
START_WORKER = "celery -A worker.app worker"
FINAL_EXECUTION = frozenset(status.value for status in EXECUTIONS.final)
FINAL_STEP = frozenset(status.value for status in STEPS.final)


@dataclass
class CliState:
    """What the commands run against; tests pass their own as typer's ``obj``."""

    celery_app: ConveyorCelery | None = None
    registry: WorkflowRegistry | None = None

    @property
    def app(self) -> ConveyorCelery:
        """The given Celery app, else ``worker.app.app`` (built on first use)."""
        if self.celery_app is None:
            from worker.app import app as default_app  # builds the app: only when needed

            self.celery_app = default_app
        return self.celery_app

    @property
    def workflows(self) -> WorkflowRegistry:
        """The given registry, else the app's, else the one CONVEYOR_WORKFLOW_MODULES names."""
        if self.registry is not None:
            return self.registry
        if self.celery_app is not None:
            return self.celery_app.engine.registry
        return get_registry()


def _secrets() -> list[str]:
    try:
        settings = get_database().settings
    except Exception:  # settings that do not load have nothing to hide yet
        return []
    found: list[str] = []
    for url in (settings.database_url.get_secret_value(), settings.broker_url.get_secret_value()):
        found.append(url)
        password = urlsplit(url).password
        if password:
            found.extend({password, unquote(password)})
    return sorted(found, key=len, reverse=True)


def redact(message: str) -> str:
    """``message`` without the configured URLs or their passwords."""
    for secret in _secrets():
        message = message.replace(secret, "***")
    return message


def fail(message: str, code: int = FAILED) -> NoReturn:
    """Print ``message`` as one red line on stderr and exit with ``code``."""
    line = " ".join(redact(message).split())
    stderr().print(Text(f"error: {line}", style="bold red"), soft_wrap=True)
    raise typer.Exit(code)


def _invalid(error: ValidationError) -> str:
    prefix = "CONVEYOR_" if error.title == "Settings" else ""
    problems = "; ".join(
        f"{prefix}{'_'.join(str(part) for part in e['loc']).upper()}: {e['msg']}"
        for e in error.errors()
    )
    return f"invalid {error.title.lower()}: {problems}"


def reported(fn: Callable[P, R]) -> Callable[P, R]:
    """Report conveyor's errors, bad settings and database failures as one line, no traceback."""

    @functools.wraps(fn)
    def command_body(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ConveyorError as error:
            fail(str(error))
        except sa_exc.DBAPIError as error:  # only migrate talks to the database directly
            fail(str(translate(error)))
        except ValidationError as error:  # only messages: pydantic's text repeats the input
            fail(_invalid(error))
        except CommandError as error:  # alembic, e.g. a database at an unknown revision
            fail(f"migration failed: {error}")

    return command_body


def migrated(fn: Callable[P, R]) -> Callable[P, R]:
    """Refuse to run ``fn`` unless the database's schema is at head (goes under ``reported``)."""

    @functools.wraps(fn)
    def command_body(*args: P.args, **kwargs: P.kwargs) -> R:
        schema.require_migrated(get_database().settings)
        return fn(*args, **kwargs)

    return command_body


app = typer.Typer(
    name="conveyor",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold settings, secrets included
)


@app.callback()
def main(ctx: typer.Context) -> None:
    """Durable workflows on Celery, with every execution's state in SQL."""
    # As `celery -A` and `uvicorn` do: modules of the current directory can be imported
    # (CONVEYOR_WORKFLOW_MODULES=myapp.workflows run from the project's folder).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    ctx.ensure_object(CliState)


@app.command()
@reported
def migrate() -> None:
    """Create or upgrade conveyor's tables in the configured database (alembic upgrade head)."""
    url = get_database().settings.sync_database_url
    backend = url.get_backend_name()
    # A plain engine, as alembic's env.py uses: no pool outlives the command, and no
    # SQLite foreign keys, under which batch mode's table copies would cascade.
    connect_args = {"connect_timeout": 10} if backend == "postgresql" else {}
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.begin() as connection:
            before = MigrationContext.configure(connection).get_current_revision()
            config = alembic_config(connection)
            command.upgrade(config, "head")
            head = ScriptDirectory.from_config(config).get_current_head()
    finally:
        engine.dispose()
    if before == head:
        stdout().print(f"The {backend} database is already at revision {head} (head).")
    else:
        origin = f"revision {before}" if before else "an empty schema"
        stdout().print(f"Migrated the {backend} database from {origin} to revision {head} (head).")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_input(text: str, option: str = "--input") -> Any:
    """The ``--input`` (or ``option``'s) value as JSON data (``@FILE`` reads a file, ``-``
    stdin); else exit 2."""
    source = option
    if text == "-":
        text, source = sys.stdin.read(), f"{option} from stdin"
    elif text.startswith("@"):
        path = Path(text[1:])
        source = f"{option} file {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            fail(f"cannot read {source}: {getattr(error, 'strerror', None) or error}", USAGE)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:  # JSONDecodeError included
        fail(f"{source} is not valid JSON: {error}", USAGE)


def workers_answering(celery_app: ConveyorCelery) -> int | None:
    """How many workers answer a ping; None when the broker cannot tell (no broadcast)."""
    try:
        return len(celery_app.control.ping(timeout=PING_TIMEOUT) or ())
    except Exception:  # a hint only: a transport without broadcast, or a broker hiccup
        return None


def no_worker_hint(celery_app: ConveyorCelery, waited: float) -> str | None:
    """What to tell someone whose execution has been pending ``waited`` seconds, if anything."""
    answering = workers_answering(celery_app)
    if answering:  # a worker is up: the execution waits on a concurrency limit or a backlog
        return None
    if answering == 0:
        return (
            f"no worker has answered in {waited:.0f} s: start one with `{START_WORKER}` "
            "from this folder, with the same CONVEYOR_DATABASE_URL, CONVEYOR_BROKER_URL and "
            "CONVEYOR_WORKFLOW_MODULES (the execution stays pending until one does)"
        )
    return (
        f"the execution is still pending after {waited:.0f} s: if no worker runs, start one "
        f"with `{START_WORKER}` (it stays pending until one does)"
    )


def watch(
    execution_id: str, timeout: float | None, celery_app: ConveyorCelery
) -> WorkflowExecution:
    """Poll the execution with a progress bar of its steps until it ends or ``timeout`` passes;
    if it stays pending past HINT_AFTER and no worker answers, say how to start one."""
    manager = SyncEnhancedExecutionStateManager()
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    hinted = False
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=stderr()) as progress:
        task = progress.add_task(execution_id, total=None)
        while True:
            execution = manager.get_execution(execution_id)
            steps = manager.get_steps(execution_id)
            progress.update(
                task,
                description=f"{execution.workflow_id}: {execution.status}",
                completed=sum(1 for step in steps if step.status in FINAL_STEP),
                total=len(steps) or None,
            )
            if execution.status in FINAL_EXECUTION:
                return execution
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return execution
            pending = execution.status == ExecutionStatus.PENDING
            if pending and not hinted and now - started >= HINT_AFTER:
                hinted = True  # once: the wait goes on, and so would the pings
                hint = no_worker_hint(celery_app, now - started)
                if hint is not None:
                    progress.console.print(f"hint: {hint}", markup=False, soft_wrap=True)
            time.sleep(POLL_SECONDS)


def follow(execution_id: str, timeout: float | None, celery_app: ConveyorCelery) -> NoReturn:
    """Wait for the execution, print its outcome and output; exit 0 only if it succeeded."""
    try:
        execution = watch(execution_id, timeout, celery_app)
    except KeyboardInterrupt:
        stderr().print(f"Stopped waiting; execution {execution_id} goes on.", soft_wrap=True)
        raise typer.Exit(INTERRUPTED) from None
    if execution.status not in FINAL_EXECUTION:
        fail(
            f"gave up waiting after {timeout:g}s: execution {execution_id} is still "
            f"{execution.status} and goes on (conveyor status {execution_id})"
        )
    console = stdout()
    console.print(render.outcome(execution), soft_wrap=True)
    if execution.error:
        console.print(Text(render.error_summary(execution.error), style="red"), soft_wrap=True)
    if execution.output_data is not None:
        typer.echo(json.dumps(execution.output_data, indent=2, ensure_ascii=False))
    raise typer.Exit(0 if execution.status == ExecutionStatus.SUCCEEDED else FAILED)


WaitOption = Annotated[
    bool, typer.Option("--wait", help="Follow it to the end; exit 0 only if it succeeds.")
]
TimeoutOption = Annotated[
    float | None, typer.Option(min=0, help="Stop waiting after this many seconds (implies --wait).")
]
ExecutionId = Annotated[str, typer.Argument(help="The execution's id.", show_default=False)]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")
]


@app.command()
@reported
@migrated
def run(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(help="A registered workflow's name.")],
    input_json: Annotated[
        str,
        typer.Option(
            "--input", "-i", metavar="JSON", help="The input: JSON, @FILE, or - for stdin."
        ),
    ] = "null",
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Run once per key: the same key again prints the first execution's id."),
    ] = None,
    priority: Annotated[
        int | None, typer.Option(min=0, max=9, help="0-9; higher runs sooner.")
    ] = None,
    wait: WaitOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """Enqueue an execution of WORKFLOW and print its id."""
    data = parse_input(input_json)
    celery_app = ctx.ensure_object(CliState).app
    execution_id = enqueue(
        workflow, data, idempotency_key=idempotency_key, priority=priority, app=celery_app
    )
    typer.echo(execution_id)
    if celery_app.engine.registry.get(workflow).debounce is not None:
        execution = celery_app.engine.manager.get_execution(execution_id)
        if execution.debounce_key is not None:  # on stderr: stdout is the id alone
            starts = render.when(execution.start_at)
            typer.echo(
                f"debounced (key {execution.debounce_key!r}): starts {starts} UTC unless "
                "enqueued again",
                err=True,
            )
    if wait or timeout is not None:
        follow(execution_id, timeout, celery_app)


def definition_of(state: CliState, execution: WorkflowExecution) -> Workflow | None:
    """The execution's workflow version, or None where it is not registered."""
    try:
        return state.workflows.get(execution.workflow_id, execution.workflow_version)
    except ConveyorError:  # not registered, or CONVEYOR_WORKFLOW_MODULES does not import
        return None


def step_queues(
    state: CliState, steps: Sequence[StepExecution], workflow: Workflow | None
) -> tuple[dict[str, str] | None, frozenset[str]]:
    """Each step's queue (None: not worth a column: a workflow with no ``queue=`` whose
    queued steps some worker takes), and the queues of queued steps no live worker
    consumes, asked of the workers (``worker.queues``) only when a step is queued."""
    if workflow is None:
        return None, frozenset()
    queues = {name: workflow.queue_of(name) for name in workflow.steps}
    # A step row is a step of its execution's version, whose definition this is.
    waiting = {queues[s.step_name] for s in steps if s.status == StepStatus.QUEUED}
    unconsumed: frozenset[str] = frozenset()
    if waiting:
        live = live_queues(state.app)
        unconsumed = frozenset() if live is None else frozenset(waiting - live)
    return (queues if workflow.routed or unconsumed else None), unconsumed


@app.command()
@reported
@migrated
def status(
    ctx: typer.Context,
    execution_id: ExecutionId,
    history: Annotated[
        bool, typer.Option("--history", help="Also list every recorded transition.")
    ] = False,
    traceback: Annotated[
        bool, typer.Option("--traceback", help="Also print the failure's traceback.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Show an execution: status, output or error, its steps, and its DAG."""
    manager = SyncEnhancedExecutionStateManager()
    execution = manager.get_execution(execution_id)
    steps = manager.get_steps(execution_id)
    workflow = definition_of(ctx.ensure_object(CliState), execution)
    # Why each skipped step was skipped: the reasons of their events.
    skipped = any(s.status == "skipped" for s in steps)
    events = manager.get_history(execution_id) if history or skipped else None
    why = skip_reasons(events or ())
    held = sorted(
        {s.wait_key for s in steps if s.status == "waiting" and s.wait_kind == "key" and s.wait_key}
    )
    # The pause of each key holding a step back: it tells a pause from a rate's wait.
    pauses = {k.key: k.paused_until for k in manager.run(limits.key_states, held)} if held else {}
    if as_json:  # the error, traceback included, is in the document already
        documents.emit(
            documents.execution_with_steps(
                execution, steps, workflow, events if history else None, why, pauses
            )
        )
        return
    # The status of each child a waiting child node waits for.
    children = {
        s.child_execution_id: manager.get_execution(s.child_execution_id).status
        for s in steps
        if s.child_execution_id is not None and s.status == "waiting"
    }
    items = manager.run(maps.map_counts_of, execution_id)
    queues, unconsumed = step_queues(ctx.ensure_object(CliState), steps, workflow)
    console = stdout()
    console.print(render.execution_summary(execution))
    order = list(workflow.order()) if workflow else ()
    console.print(
        render.steps_table(steps, order, children, items, queues, unconsumed, why, pauses)
    )
    if queues is not None:
        stuck = Counter(
            queues[s.step_name]
            for s in steps
            if s.status == StepStatus.QUEUED and queues.get(s.step_name) in unconsumed
        )
        if stuck:
            console.print(render.unconsumed_hint(stuck), soft_wrap=True)
    console.print(render.dag_tree(execution, steps, workflow))
    if history:
        console.print(render.history_table(manager.get_history(execution_id)))
    if traceback:
        error = execution.error if isinstance(execution.error, dict) else {}
        typer.echo(error.get("traceback") or "No traceback recorded.")


@app.command("list")
@reported
@migrated
def list_executions(
    status: Annotated[
        ListedStatus | None,
        typer.Option(
            help="Only executions in this status (waiting: running, every open step waiting)."
        ),
    ] = None,
    workflow: Annotated[str | None, typer.Option(help="Only executions of this workflow.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """List executions, newest first."""
    manager = SyncEnhancedExecutionStateManager()
    if status is ListedStatus.WAITING:
        executions = manager.run(list_rows, None, workflow, limit, waiting=True)
    else:
        executions = manager.list_executions(
            status=status.value if status else None, workflow_id=workflow, limit=limit
        )
    if as_json:
        documents.emit([documents.execution(execution) for execution in executions])
        return
    if not executions:
        stdout().print("No executions found.")
        return
    stdout().print(render.executions_table(executions))


@app.command()
@reported
@migrated
def cancel(
    ctx: typer.Context,
    execution_id: ExecutionId,
    reason: Annotated[
        str, typer.Option(help="Recorded in the execution's history.")
    ] = "cancelled from the command line",
) -> None:
    """Cancel a pending or running execution; running steps stop when they check."""
    engine = ctx.ensure_object(CliState).app.engine
    if engine.cancel(execution_id, reason=reason):
        stdout().print(f"Cancelled {execution_id}.", soft_wrap=True)
        return
    current = engine.manager.get_execution(execution_id).status
    if current == ExecutionStatus.CANCELLED:
        stdout().print(f"{execution_id} was already cancelled.", soft_wrap=True)
        return
    fail(
        f"execution {execution_id!r} is {current}: "
        "only pending or running executions can be cancelled"
    )


@app.command()
@reported
@migrated
def retry(
    ctx: typer.Context,
    execution_id: ExecutionId,
    failed_items: Annotated[
        bool,
        typer.Option(
            "--failed-items",
            help="Run only the failed (and cancelled) items of its failed map steps again; "
            "succeeded items keep their outputs.",
        ),
    ] = False,
    wait: WaitOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """Re-run a failed, cancelled or timed-out execution from its unfinished steps (it
    starts again like a new one: within its workflow's max_concurrency)."""
    celery_app = ctx.ensure_object(CliState).app
    engine = celery_app.engine
    retried = engine.retry(execution_id, failed_items=failed_items)
    execution = engine.manager.get_execution(execution_id)
    if not retried:
        fail(
            f"execution {execution_id!r} is {execution.status}: "
            "only failed, cancelled or timed-out executions can be retried"
        )
    stdout().print(f"Retrying {execution_id} (attempt {execution.attempt}).", soft_wrap=True)
    if wait or timeout is not None:
        follow(execution_id, timeout, celery_app)


def actor() -> str:
    """Who acts from this command line, for the execution's history."""
    try:
        return f"{getpass.getuser()} (command line)"
    except (OSError, KeyError):  # no login name: a container's anonymous uid
        return "the command line"


StepArgument = Annotated[str, typer.Argument(help="The step's name.", show_default=False)]
PayloadOption = Annotated[
    str,
    typer.Option(
        "--payload", "-p", metavar="JSON", help="The payload: JSON, @FILE, or - for stdin."
    ),
]


@app.command("wake")
@reported
@migrated
def wake_command(ctx: typer.Context, execution_id: ExecutionId, step: StepArgument) -> None:
    """Wake a sleeping step now: it succeeds with the time it woke, and the execution's
    history records who woke it early."""
    wake(execution_id, step, actor=actor(), app=ctx.ensure_object(CliState).app)
    stdout().print(f"Woke {step} of {execution_id}.", soft_wrap=True)


@app.command("signal")
@reported
@migrated
def signal_command(
    ctx: typer.Context, execution_id: ExecutionId, step: StepArgument, payload: PayloadOption
) -> None:
    """Send a payload to one execution's event wait STEP: it completes now if it waits,
    or takes the payload when it begins to."""
    data = parse_input(payload, "--payload")
    receipt = signal(execution_id, step, data, actor=actor(), app=ctx.ensure_object(CliState).app)
    if receipt.consumed_by:
        stdout().print(f"Signalled {step} of {execution_id}: it completed.", soft_wrap=True)
    else:
        kept = f"kept until it waits (signal #{receipt.event_id})"
        stdout().print(f"Signalled {step} of {execution_id}: {kept}.", soft_wrap=True)


events_app = typer.Typer(
    help="Events: send one to the execution waiting for it (wf.wait), now or later.",
    no_args_is_help=True,
)
app.add_typer(events_app, name="events")


@events_app.command("send")
@reported
@migrated
def send_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The event's name.", show_default=False)],
    key: Annotated[str, typer.Argument(help="The key it carries.", show_default=False)],
    payload: PayloadOption = "null",
    idempotency_key: Annotated[
        str | None, typer.Option(help="Send once per key: the same key again stores nothing.")
    ] = None,
) -> None:
    """Send event NAME for KEY: the oldest execution waiting for it takes it now; with
    none waiting it is kept for one that begins to (CONVEYOR_EVENT_TTL): a wait of an
    execution created before the event, never of a later one."""
    data = parse_input(payload, "--payload")
    celery_app = ctx.ensure_object(CliState).app
    receipt = send_event(
        name, key=key, payload=data, idempotency_key=idempotency_key, actor=actor(), app=celery_app
    )
    if receipt.duplicate:
        line = f"Event #{receipt.event_id} was sent before with idempotency key {idempotency_key}"
        line += f" (taken by {receipt.consumed_by})." if receipt.consumed_by else "."
    elif receipt.consumed_by:
        line = f"Event #{receipt.event_id} taken by {receipt.consumed_by}."
    else:
        ttl = render.duration(celery_app.engine.settings.event_ttl)
        line = (
            f"Event #{receipt.event_id} stored: no execution waits for {name} key {key} yet; "
            f"kept {ttl} for one that does (an execution created before now: later ones "
            "never take an earlier event)."
        )
    stdout().print(line, soft_wrap=True)


@app.command()
@reported
def workflows(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the registered workflows (from CONVEYOR_WORKFLOW_MODULES)."""
    registry = ctx.ensure_object(CliState).workflows
    if as_json:  # definitions only: nothing here reads the database
        documents.emit([documents.workflow(definition) for definition in registry])
        return
    if not len(registry):
        stdout().print("No workflows registered: list their modules in CONVEYOR_WORKFLOW_MODULES.")
        return
    stdout().print(render.workflows_table(registry))


schedules_app = typer.Typer(
    help="The workflows' schedules: list them with their next run; pause and resume.",
    no_args_is_help=False,
)
app.add_typer(schedules_app, name="schedules")
ScheduleWorkflow = Annotated[str, typer.Argument(help="The workflow's name.", show_default=False)]
ScheduleName = Annotated[
    str, typer.Argument(help="The schedule's name (see conveyor schedules).", show_default=False)
]


@schedules_app.callback(invoke_without_command=True)
@reported
def schedules(ctx: typer.Context) -> None:
    """List each schedule: when it fires, its next and last run, whether it is paused."""
    if ctx.invoked_subcommand is not None:
        return  # pause and resume check the schema themselves
    schema.require_migrated(get_database().settings)
    table = cli_schedules.schedules_table(ctx.ensure_object(CliState).workflows)
    if table is None:
        stdout().print("No schedules: declare them with Workflow(..., schedules=[Schedule(...)]).")
        return
    stdout().print(table)


@schedules_app.command()
@reported
@migrated
def pause(ctx: typer.Context, workflow: ScheduleWorkflow, name: ScheduleName) -> None:
    """Pause a schedule: no tick of it runs until it is resumed (no deploy needed)."""
    registry = ctx.ensure_object(CliState).workflows
    stdout().print(cli_schedules.set_paused(registry, workflow, name, True), soft_wrap=True)


@schedules_app.command()
@reported
@migrated
def resume(ctx: typer.Context, workflow: ScheduleWorkflow, name: ScheduleName) -> None:
    """Resume a paused schedule at its next tick (the ticks it missed do not run)."""
    registry = ctx.ensure_object(CliState).workflows
    stdout().print(cli_schedules.set_paused(registry, workflow, name, False), soft_wrap=True)


@app.command()
@reported
def demo() -> None:
    """Run the demo: example workflows on the embedded default, with live progress."""
    try:
        module = importlib.import_module(
            "conveyor.cli.demo"
        )  # imported here: it starts its own workers
    except ModuleNotFoundError as error:
        if error.name != "conveyor.cli.demo":
            raise
        fail("the demo is not part of this installation (cli/demo.py is missing)")
    raise typer.Exit(int(module.main()))


if __name__ == "__main__":
    app()


# ``conveyor users`` and ``conveyor tokens``, ``conveyor items`` and ``conveyor limits``
# live in modules of their own that add them to ``app``; imported last because they use
# its decorators.
from conveyor.cli import accounts as _accounts  # noqa: E402, F401
from conveyor.cli import failures as _failures  # noqa: E402, F401
from conveyor.cli import limits as _limits  # noqa: E402, F401
from conveyor.cli import maps as _maps  # noqa: E402, F401
from conveyor.cli import repair as _repair  # noqa: E402, F401
from conveyor.cli import replay as _replay  # noqa: E402, F401
from conveyor.cli import retention as _retention  # noqa: E402, F401
from conveyor.cli import versions as _versions  # noqa: E402, F401
