"""``make run``: the example workflows on the embedded default, start to finish.

Migrates a fresh SQLite file, starts ``celery -A worker.app worker`` and ``beat`` on
the filesystem broker, enqueues the five workflows of ``conveyor.examples.workflows`` (and
signals the approval the invoice waits for), shows their progress, and checks that
each ended as expected (``charge_order`` is meant to fail). Everything lives in
``./.conveyor-demo/``, recreated on every run, unless CONVEYOR_DATABASE_URL,
CONVEYOR_BROKER_URL or CONVEYOR_BROKER_FOLDER name others.
Exit status: 0 when every execution ended as expected, 1 otherwise, 130 if interrupted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from sqlalchemy import Connection, create_engine, make_url, select
from sqlalchemy.pool import NullPool

from conveyor.examples.workflows import DECLINED_CARD, SUPPLIER_RECOVERS_ON_ATTEMPT, THUMBNAILS
from core.config import Settings, get_settings
from core.database import get_database
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.errors import ConveyorError, TransientDatabaseError
from core.models import StepExecution, WorkflowExecution
from core.registry import configure_registry
from core.states import EXECUTION_TRANSITIONS, STEP_TRANSITIONS, ExecutionStatus, StepStatus

if TYPE_CHECKING:
    from worker.app import ConveyorCelery

DEMO_FOLDER = ".conveyor-demo"
DEMO_MODULE = "conveyor.examples.workflows"
# The demo is meant to take seconds; past this, something is wrong and it says so.
WAIT_TIMEOUT = 45.0
POLL_INTERVAL = 0.2
STOP_GRACE = 10.0
WORKER_CONCURRENCY = 4
# Final: no way out in the state machines (short of an explicit retry).
FINAL_EXECUTION = frozenset(s for s, targets in EXECUTION_TRANSITIONS.items() if not targets)
FINAL_STEP = frozenset(s for s, targets in STEP_TRANSITIONS.items() if not targets)
STATUS_STYLE = {"succeeded": "green", "failed": "red", "running": "yellow", "pending": "dim"}


@dataclass(frozen=True)
class Outcome:
    """An execution as it ended, with its steps by name."""

    execution: WorkflowExecution
    steps: dict[str, StepExecution]


Check = Callable[[Outcome], list[str]]
# Execution id -> (its status, [(step name, step status, attempt), ...]).
Snapshot = dict[str, tuple[str, list[tuple[str, str, int]]]]


@dataclass(frozen=True)
class DemoRun:
    """One execution the demo enqueues, and what it must end as."""

    workflow: str
    input: dict[str, Any]
    expected_status: ExecutionStatus
    check: Check


def _report_check(outcome: Outcome) -> list[str]:
    line = (outcome.execution.output_data or {}).get("render_report", "")
    return [] if str(line).startswith("emea, last 7 days: 84 orders") else [f"report {line!r}"]


def _gallery_check(outcome: Outcome) -> list[str]:
    gallery = (outcome.execution.output_data or {}).get("publish_gallery") or {}
    done = sum(
        1
        for name, step in outcome.steps.items()
        if name.startswith("resize_") and step.status == StepStatus.SUCCEEDED
    )
    if gallery.get("thumbnails") != THUMBNAILS or done != THUMBNAILS:
        return [f"expected {THUMBNAILS} thumbnails and resizes, got {gallery} from {done}"]
    return []


def _supplier_check(outcome: Outcome) -> list[str]:
    pull = outcome.steps.get("pull_stock_levels")
    if pull is None or pull.attempt != SUPPLIER_RECOVERS_ON_ATTEMPT:
        attempt = pull.attempt if pull else None
        return [f"expected success on attempt {SUPPLIER_RECOVERS_ON_ATTEMPT}, not {attempt}"]
    return []


def _charge_check(outcome: Outcome) -> list[str]:
    error = outcome.execution.error or {}
    problems = []
    if error.get("type") != "PaymentDeclined" or error.get("step") != "charge_card":
        problems.append(f"expected PaymentDeclined from charge_card, got {error.get('type')}")
    receipt = outcome.steps.get("send_receipt")
    if receipt is None or receipt.status != StepStatus.SKIPPED:
        problems.append("expected send_receipt to be skipped")
    return problems


def _approval_check(outcome: Outcome) -> list[str]:
    paid = (outcome.execution.output_data or {}).get("pay_invoice", "")
    if "approved by demo@example.com" not in str(paid):
        return [f"expected the invoice paid on the demo's approval, got {paid!r}"]
    return []


RUNS = (
    DemoRun(
        "daily_report",
        {"region": "emea", "days": 7},
        ExecutionStatus.SUCCEEDED,
        _report_check,
    ),
    DemoRun(
        "gallery_thumbnails",
        {"album": "holiday-2026", "size": 256},
        ExecutionStatus.SUCCEEDED,
        _gallery_check,
    ),
    DemoRun(
        "supplier_sync",
        {"supplier": "acme", "skus": ["bolt-m4", "nut-m4", "washer-m4"]},
        ExecutionStatus.SUCCEEDED,
        _supplier_check,
    ),
    DemoRun(
        "charge_order",
        {"order_id": "ord-1042", "amount_cents": 12_900, "card": DECLINED_CARD},
        ExecutionStatus.FAILED,
        _charge_check,
    ),
    DemoRun(
        "invoice_approval",
        {"invoice_id": "inv-42", "amount_cents": 99_00},
        ExecutionStatus.SUCCEEDED,
        _approval_check,
    ),
)
# What the demo sends as a person approving the invoice (a signal to its wait).
APPROVAL = {"approved": True, "approver": "demo@example.com", "note": "looks right"}


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop what the demo started and exit 130."""


@dataclass
class DemoPlace:
    """Where the demo keeps its files and which CONVEYOR_ variables it sets."""

    folder: Path
    python_path: str
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def worker_log(self) -> Path:
        """The worker's output."""
        return self.folder / "worker.log"

    @property
    def beat_log(self) -> Path:
        """Beat's output."""
        return self.folder / "beat.log"


def prepare(cwd: Path, environ: Mapping[str, str]) -> DemoPlace:
    """A fresh demo folder, and the variables that point conveyor at it."""
    folder = (cwd / DEMO_FOLDER).resolve()
    # Old broker messages or rows from a previous run must not leak into this one.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    place = DemoPlace(folder, python_path(environ))
    given_url = environ.get("CONVEYOR_DATABASE_URL")
    if not given_url:
        place.variables["CONVEYOR_DATABASE_URL"] = f"sqlite:///{folder / 'conveyor.db'}"
    else:
        url = make_url(given_url)
        path = url.database
        # The worker and beat run in the demo folder: a relative SQLite path must not move.
        if url.get_backend_name() == "sqlite" and path and path != ":memory:":
            absolute = url.set(database=str((cwd / path).resolve()))
            place.variables["CONVEYOR_DATABASE_URL"] = absolute.render_as_string(
                hide_password=False
            )
    given_folder = environ.get("CONVEYOR_BROKER_FOLDER")
    broker_folder = (cwd / given_folder).resolve() if given_folder else folder / "broker"
    place.variables["CONVEYOR_BROKER_FOLDER"] = str(broker_folder)
    modules = [m.strip() for m in environ.get("CONVEYOR_WORKFLOW_MODULES", "").split(",")]
    modules = [m for m in modules if m]
    if DEMO_MODULE not in modules:
        modules.append(DEMO_MODULE)
    place.variables["CONVEYOR_WORKFLOW_MODULES"] = ",".join(modules)
    return place


def python_path(environ: Mapping[str, str]) -> str:
    """PYTHONPATH that imports ``worker`` and ``conveyor`` (its examples) from any
    working directory."""
    roots: list[str] = []
    for package in ("worker", "conveyor"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            roots.append(str(Path(spec.origin).resolve().parent.parent))
    roots += environ.get("PYTHONPATH", "").split(os.pathsep)
    return os.pathsep.join(dict.fromkeys(root for root in roots if root))


def child_environment(environ: Mapping[str, str], place: DemoPlace) -> dict[str, str]:
    """The environment of the worker and beat: the demo's variables, importable packages."""
    # The children run in the demo folder: the packages' root must be on their path.
    return {**environ, **place.variables, "PYTHONPATH": place.python_path, "PYTHONUNBUFFERED": "1"}


def migrate(settings: Settings) -> None:
    """``alembic upgrade head`` on the demo's database."""
    from alembic import command

    from migrations import alembic_config

    # A plain engine, as alembic's env.py uses: no pool outlives the upgrade.
    engine = create_engine(settings.sync_database_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")
    finally:
        engine.dispose()


@dataclass
class Child:
    """A process the demo started, with its log."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]


@contextmanager
def children(env: dict[str, str], place: DemoPlace) -> Iterator[list[Child]]:
    """Start the worker and beat; on the way out, always stop them (TERM, then KILL)."""
    celery = [sys.executable, "-m", "celery", "-A", "worker.app"]
    commands = {
        "worker": [
            *celery,
            "worker",
            "--loglevel=WARNING",
            "--pool=threads",
            f"--concurrency={WORKER_CONCURRENCY}",
            "--hostname=demo@%h",
            # One worker on a broker without broadcasts: nothing to sync or gossip with.
            "--without-mingle",
            "--without-gossip",
        ],
        "beat": [
            *celery,
            "beat",
            "--loglevel=WARNING",
            f"--schedule={place.folder / 'celerybeat-schedule'}",
        ],
    }
    started: list[Child] = []
    try:
        for name, command in commands.items():
            log_path = place.folder / f"{name}.log"
            log = log_path.open("ab")
            try:
                process = subprocess.Popen(
                    command,
                    cwd=place.folder,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own session: Ctrl-C reaches the demo only, which stops it in order.
                    start_new_session=True,
                )
            except BaseException:
                log.close()
                raise
            started.append(Child(name, process, log_path, log))
        yield started
    finally:
        stop(started)


def stop(started: Sequence[Child]) -> None:
    """Terminate every child, wait for each, kill whichever does not exit in time."""
    for child in started:
        if child.process.poll() is None:
            child.process.terminate()
    deadline = time.monotonic() + STOP_GRACE
    hurry: BaseException | None = None
    for child in started:
        try:
            if hurry is None:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        except (KeyboardInterrupt, Interrupted) as interrupt:
            hurry = interrupt  # asked again while waiting: stop waiting, kill the rest
        if child.process.poll() is None:
            # The whole group (its own session): a prefork worker's pool goes with it.
            with suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
        child.log.close()
    if hurry is not None:
        raise hurry


def read_snapshot(conn: Connection, ids: Sequence[str]) -> Snapshot:
    """Each execution's status and its steps' (name, status, attempt), in two reads."""
    executions = conn.execute(
        select(WorkflowExecution.execution_id, WorkflowExecution.status).where(
            WorkflowExecution.execution_id.in_(ids)
        )
    ).all()
    steps = conn.execute(
        select(
            StepExecution.execution_id,
            StepExecution.step_name,
            StepExecution.status,
            StepExecution.attempt,
        ).where(StepExecution.execution_id.in_(ids))
    ).all()
    found: Snapshot = {row.execution_id: (row.status, []) for row in executions}
    for row in steps:
        found[row.execution_id][1].append((row.step_name, row.status, row.attempt))
    return found


def describe(status: str, steps: list[tuple[str, str, int]]) -> str:
    """The progress line's note: retries, failures and skips as they happen."""
    notes = [f"{name} attempt {attempt}" for name, _, attempt in steps if attempt > 1]
    notes += [f"{name} failed" for name, st, _ in steps if st == StepStatus.FAILED]
    skipped = sum(1 for _, st, _ in steps if st == StepStatus.SKIPPED)
    if skipped:
        notes.append(f"{skipped} skipped")
    style = STATUS_STYLE.get(status, "white")
    return f"[{style}]{status}[/]" + (f"  [dim]{escape(', '.join(notes))}[/]" if notes else "")


def watch(
    console: Console,
    manager: SyncEnhancedExecutionStateManager,
    executions: Sequence[tuple[DemoRun, str]],
    started: Sequence[Child],
) -> str | None:
    """Show progress until every execution is final; why it stopped early, if it did."""
    ids = [execution_id for _, execution_id in executions]
    progress = Progress(
        TextColumn("{task.description:<20}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("steps  {task.fields[note]}"),
        console=console,
    )
    tasks: dict[str, TaskID] = {
        execution_id: progress.add_task(run.workflow, total=None, note="[dim]pending[/]")
        for run, execution_id in executions
    }
    deadline = time.monotonic() + WAIT_TIMEOUT
    with progress:
        while True:
            try:
                snapshot = manager.run(read_snapshot, ids)
            except TransientDatabaseError:  # the worker holds the write lock: next tick
                snapshot = {}
            for execution_id, (status, steps) in snapshot.items():
                done = sum(1 for _, st, _ in steps if st in FINAL_STEP)
                progress.update(
                    tasks[execution_id],
                    total=len(steps),
                    completed=done,
                    note=describe(status, steps),
                )
            if len(snapshot) == len(ids) and all(
                status in FINAL_EXECUTION for status, _ in snapshot.values()
            ):
                return None
            for child in started:
                if child.process.poll() is not None:
                    return f"the {child.name} exited with status {child.process.returncode}"
            if time.monotonic() > deadline:
                return f"not finished after {WAIT_TIMEOUT:.0f}s"
            time.sleep(POLL_INTERVAL)


def summary(outcome: Outcome) -> str:
    """What an execution produced: its output, or its error and what it skipped."""
    execution = outcome.execution
    if execution.status == ExecutionStatus.FAILED:
        error = execution.error or {}
        skipped = [n for n, s in outcome.steps.items() if s.status == StepStatus.SKIPPED]
        text = f"error: {error.get('type')} in step {error.get('step')}: {error.get('message')}"
        if skipped:
            text += f"; skipped: {', '.join(skipped)}"
    elif execution.status == ExecutionStatus.SUCCEEDED:
        text = f"output: {json.dumps(execution.output_data, default=str)}"
    else:
        final = sum(1 for step in outcome.steps.values() if step.status in FINAL_STEP)
        text = f"{final} of {len(outcome.steps)} steps final"
    retried = [f"{n} took {s.attempt} attempts" for n, s in outcome.steps.items() if s.attempt > 1]
    return text + (f" ({', '.join(retried)})" if retried else "")


def report(
    console: Console,
    manager: SyncEnhancedExecutionStateManager,
    executions: Sequence[tuple[DemoRun, str]],
) -> bool:
    """Print each execution's outcome; whether all ended as expected."""
    console.print("\n[bold]Outcomes[/]")
    all_expected = True
    for run, execution_id in executions:
        execution = manager.get_execution(execution_id)
        steps = {step.step_name: step for step in manager.get_steps(execution_id)}
        outcome = Outcome(execution, steps)
        if execution.status != run.expected_status:
            problems = [f"expected {run.expected_status.value}"]
        else:
            problems = run.check(outcome)
        verdict = "as expected" if not problems else "NOT as expected: " + "; ".join(problems)
        all_expected = all_expected and not problems
        style = STATUS_STYLE.get(execution.status, "white")
        console.print(
            f"  {run.workflow:<20} [{style}]{execution.status:<10}[/] "
            f"{'[green]' if not problems else '[red]'}{escape(verdict)}[/]  [dim]{execution_id}[/]",
            soft_wrap=True,
        )
        console.print(f"      {escape(summary(outcome))}", soft_wrap=True)
    return all_expected


def venv_command(name: str = "conveyor") -> str:
    """How to call a script of this venv from here: its path when it is not on PATH."""
    script = Path(sys.executable).parent / name
    if not script.exists() or shutil.which(name) == str(script):
        return name
    return os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)


def next_steps(
    console: Console, place: DemoPlace, executions: Sequence[tuple[DemoRun, str]]
) -> None:
    """Where to look next: the CLI with the demo's variables, and the logs."""
    variables = {**place.variables, "PYTHONPATH": place.python_path}
    exports = " ".join(f"{name}={shlex.quote(value)}" for name, value in variables.items())
    ids = {run.workflow: execution_id for run, execution_id in executions}
    conveyor = venv_command()
    console.print("\n[bold]Look closer[/] (in this shell, first the export)")
    lines = [
        f"export {exports}",
        f"{conveyor} list",
        f"{conveyor} status {ids.get('charge_order', 'ID')} --traceback",
        f"{conveyor} status {ids.get('supplier_sync', 'ID')} --history",
        f"{conveyor} users create you@example.com --admin",
        f"{conveyor} tokens issue you@example.com    # the dashboard's login token",
        f"{venv_command('uvicorn')} conveyor.api.app:app      # then open http://127.0.0.1:8000/ui",
        f"worker log: {place.worker_log}",
        f"beat log:   {place.beat_log}",
    ]
    for line in lines:
        console.print(f"  {escape(line)}", soft_wrap=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run_demo(console: Console) -> bool:
    """The demo itself; whether every execution ended as expected."""
    place = prepare(Path.cwd(), os.environ)
    # Before worker.app is imported: it builds its app from the environment at import.
    os.environ.update(place.variables)
    get_settings.cache_clear()
    configure_registry(None)
    settings = get_settings()
    database = settings.sync_database_url.render_as_string(hide_password=True)
    console.print(f"[bold]conveyor demo[/] in {place.folder}", soft_wrap=True)
    migrate(settings)
    console.print(f"  database  {database} (migrated to head)", soft_wrap=True, highlight=False)

    from worker.app import app
    from worker.producer import enqueue, signal

    console.print(f"  broker    {broker_line(app, settings)}", soft_wrap=True, highlight=False)
    env = child_environment(os.environ, place)
    manager = SyncEnhancedExecutionStateManager()
    with children(env, place) as started:
        for child in started:
            console.print(
                f"  {child.name:<9} pid {child.process.pid}, log {child.log_path}",
                soft_wrap=True,
                highlight=False,
            )
        executions = [(run, enqueue(run.workflow, run.input, app=app)) for run in RUNS]
        # A person approves the invoice at once: the signal is kept until the wait for
        # it is established (its request step may not have run yet), then delivered.
        for run, execution_id in executions:
            if run.workflow == "invoice_approval":
                signal(execution_id, "approval", APPROVAL, actor="demo@example.com", app=app)
        console.print(f"\nEnqueued {len(executions)} executions; waiting for them:\n")
        problem = watch(console, manager, executions, started)
    console.print(
        "Stopped " + ", ".join(f"{c.name} (pid {c.process.pid})" for c in started) + ".",
        highlight=False,
    )
    if problem is not None:
        console.print(f"[red]The demo did not finish: {escape(problem)}[/]")
        tail = place.worker_log.read_text(errors="replace")[-3000:]
        console.print(f"[dim]last lines of {place.worker_log}:[/]\n{escape(tail)}", soft_wrap=True)
    expected = report(console, manager, executions)
    next_steps(console, place, executions)
    return problem is None and expected


def broker_line(app: ConveyorCelery, settings: Settings) -> str:
    """The broker, read back from the transport itself (so its poll interval is the real one)."""
    connection = app.connection_for_write()
    try:
        transport = connection.transport
        url = connection.as_uri()
        interval = getattr(transport, "polling_interval", None)
    finally:
        connection.release()
    if url.startswith("filesystem"):
        return f"filesystem, folder {settings.broker_folder} (polled every {interval} s)"
    return url


def main() -> int:
    """Run the demo; 0 when every execution ended as expected, 1 if not, 130 if stopped."""
    console = Console(highlight=False)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        ok = run_demo(console)
    except (KeyboardInterrupt, Interrupted):
        console.print("\n[yellow]Interrupted; the worker and beat were stopped.[/]")
        return 130
    except ConveyorError as error:
        console.print(f"[red]The demo failed: {escape(str(error))}[/]", soft_wrap=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        get_database().dispose()
    elapsed = time.monotonic() - started
    verdict = "[green]all as expected[/]" if ok else "[red]not all as expected[/]"
    console.print(f"\nDemo finished in {elapsed:.1f}s: {verdict}.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
