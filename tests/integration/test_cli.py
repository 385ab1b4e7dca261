"""The ``conveyor`` command line against a real database (no worker: nothing runs steps).

Commands get their Celery app through typer's context object (``CliState``): an app
on the test database and Kombu's in-memory broker, so publishing works and goes nowhere.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import types
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text, update
from sqlalchemy.engine import URL
from typer.testing import CliRunner, Result

from conveyor.cli import main as cli_main
from conveyor.cli.main import CliState, app
from core import database as core_database
from core.config import Settings, get_settings
from core.database import get_db_session
from core.errors import SchemaNotMigrated
from core.models import Base, ExecutionEvent, StepExecution, WorkflowExecution
from core.registry import WorkflowRegistry
from core.schedules import Schedule
from core.workflows import StepContext, Workflow
from migrations import alembic_config
from tests.conftest import TestDatabase
from tests.e2e.workflows import broken, linear
from tests.helpers.state import count, execution_row, force_step_status, step_row
from worker import producer
from worker.app import ConveyorCelery, create_app

PAYLOAD_LIMIT = 256
# Every table the models declare: what `conveyor migrate` must create.
TABLES = set(Base.metadata.tables)
_counter = itertools.count()

nightly = Workflow(
    "nightly",
    version=2,
    max_concurrency=3,
    deadline=timedelta(minutes=30),
    description="rebuild the search index",
    schedules=[Schedule(every=timedelta(hours=1), name="hourly")],
)


@nightly.step()
def collect(ctx: StepContext) -> int:
    return 1


@nightly.step(depends_on=["collect"])
def publish(ctx: StepContext, collect: int) -> int:
    return collect


def registry() -> WorkflowRegistry:
    """The workflows these tests run: two of the end-to-end ones and ``nightly``."""
    return WorkflowRegistry([linear, broken, nightly])


@pytest.fixture
def cli_app(database: TestDatabase) -> ConveyorCelery:
    """A Celery app on the test database and the in-memory broker, with a small payload limit."""
    settings = Settings(
        database_url=database.url,
        broker_url="memory://localhost/",
        max_payload_bytes=PAYLOAD_LIMIT,
        db_retry_initial_wait=0.01,
        db_retry_max_wait=0.2,
    )
    return create_app(settings, registry())


@pytest.fixture
def state(cli_app: ConveyorCelery) -> CliState:
    """What the commands run against."""
    return CliState(celery_app=cli_app)


def invoke(state: CliState | None, *args: str) -> Result:
    """Run ``conveyor ARGS``; an exception other than an exit fails the test with its traceback."""
    return CliRunner().invoke(app, list(args), obj=state, catch_exceptions=False)


def rows() -> dict[str, int]:
    """How many executions, steps and events the database holds."""
    return {
        "executions": count(WorkflowExecution),
        "steps": count(StepExecution),
        "events": count(ExecutionEvent),
    }


def enqueue(state: CliState, workflow: str, payload: str) -> str:
    """``conveyor run`` without waiting: the new execution's id."""
    result = invoke(state, "run", workflow, "--input", payload)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def table_rows(output: str) -> dict[str, list[str]]:
    """The words of each non-blank output line, by its first word."""
    return {line.split()[0]: line.split() for line in output.splitlines() if line.strip()}


def set_execution(execution_id: str, **values: Any) -> None:
    """Write an execution's columns behind the state machine's back (test setup only)."""
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == execution_id)
            .values(**values)
        )


# --- migrate -----------------------------------------------------------------------


@pytest.fixture
def empty_database(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[URL]:
    """A new database with no tables, which every core.database helper points at."""
    monkeypatch.setattr(core_database, "_current", None)  # put back afterwards
    name = f"cli_migrate_{os.getpid()}_{next(_counter)}"
    admin = None
    if backend == "postgresql":
        admin_url: URL = request.getfixturevalue("postgres_admin_url")
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = admin_url.set(database=name)
    else:
        url = URL.create("sqlite", database=str(tmp_path / f"{name}.db"))
    core_database.configure(Settings(database_url=url.render_as_string(hide_password=False)))
    try:
        yield url
    finally:
        core_database.get_database().dispose()
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


MIGRATE_FIRST = "run `conveyor migrate` first (with the same CONVEYOR_DATABASE_URL)"


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["list", "--json"],
        ["status", "some-id", "--json"],
        ["run", "linear", "--input", '{"start": 1}', "--wait"],
        ["cancel", "some-id"],
        ["retry", "some-id"],
        ["schedules"],
        ["schedules", "pause", "nightly", "hourly"],
    ],
    ids=lambda args: "-".join(a for a in args if a.isalpha()),
)
def test_every_command_on_an_unmigrated_database_says_to_migrate_and_creates_nothing(
    backend: str, empty_database: URL, args: list[str]
) -> None:
    result = invoke(CliState(registry=registry()), *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: the database has no conveyor tables")
    assert result.stderr.rstrip().endswith(MIGRATE_FIRST)
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""
    if backend == "sqlite":  # a read must not leave an empty database file behind
        assert empty_database.database is not None
        assert not Path(empty_database.database).exists()
    else:
        engine = create_engine(empty_database)
        try:
            assert inspect(engine).get_table_names() == []
        finally:
            engine.dispose()


def test_enqueue_on_an_unmigrated_database_gives_the_clis_hint_and_creates_nothing(
    backend: str, empty_database: URL
) -> None:
    # A producer's first call, before `conveyor migrate` (or from the wrong directory):
    # the same typed hint as the CLI's, not the driver's "no such table", and on SQLite
    # no empty database file left behind.
    settings = Settings(
        database_url=empty_database.render_as_string(hide_password=False), broker_url="memory://"
    )
    celery_app = create_app(settings, registry())
    with pytest.raises(SchemaNotMigrated, match=re.escape(MIGRATE_FIRST)):
        producer.enqueue(linear, {"start": 1}, app=celery_app)
    if backend == "sqlite":
        assert empty_database.database is not None
        assert not Path(empty_database.database).exists()
        Path(empty_database.database).touch()  # a file with no tables: the same hint
        with pytest.raises(SchemaNotMigrated, match=r"no conveyor tables \(no such table"):
            producer.enqueue(linear, {"start": 1}, app=celery_app)


@pytest.mark.sqlite_only
def test_an_empty_sqlite_file_says_to_migrate_and_is_left_untouched(empty_database: URL) -> None:
    assert empty_database.database is not None
    path = Path(empty_database.database)
    path.touch()
    result = invoke(None, "list")
    assert result.exit_code == 1
    assert result.stderr == f"error: the database has no conveyor tables: {MIGRATE_FIRST}\n"
    assert path.stat().st_size == 0  # opened read-only: not even switched to WAL
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_database_behind_head_says_to_migrate(empty_database: URL) -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    head = scripts.get_current_head()
    assert head is not None
    previous = scripts.get_revision(head).down_revision
    assert isinstance(previous, str)
    engine = create_engine(empty_database)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), previous)
    finally:
        engine.dispose()
    result = invoke(None, "list")
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: the database schema is behind (revision {previous}; this conveyor needs "
        f"{head}): {MIGRATE_FIRST}\n"
    )
    migrated = invoke(None, "migrate")
    assert migrated.exit_code == 0, migrated.output
    listed = invoke(None, "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout) == []


def test_migrate_creates_the_tables_on_an_empty_database(backend: str, empty_database: URL) -> None:
    first = invoke(None, "migrate")
    assert first.exit_code == 0, first.output
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert (
        f"Migrated the {backend} database from an empty schema to revision {head}" in first.stdout
    )
    engine = create_engine(empty_database)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
    finally:
        engine.dispose()
    again = invoke(None, "migrate")
    assert again.exit_code == 0, again.output
    assert f"already at revision {head} (head)" in again.stdout
    url = empty_database.render_as_string(hide_password=False)
    assert url not in first.output + again.output
    assert str(empty_database.database) not in first.output + again.output


# --- run: bad input is refused before anything is written --------------------------


@pytest.mark.parametrize(
    ("args", "exit_code", "message"),
    [
        (["run", "nope", "--input", "{}"], 1, "no workflow 'nope'; registered: broken, linear"),
        (["run", "linear", "--input", '{"start": "ten"}'], 1, "is not valid: start: Input should"),
        (["run", "linear", "--input", "{start: 1"], 2, "--input is not valid JSON"),
        (["run", "linear", "--input", '{"start": NaN}'], 2, "NaN is not valid JSON"),
        (
            ["run", "broken", "--input", '{"blob": "' + "x" * PAYLOAD_LIMIT + '"}'],
            1,
            f"input_data is {PAYLOAD_LIMIT + 12} bytes of JSON; the limit is {PAYLOAD_LIMIT}",
        ),
        (
            ["run", "linear", "--input", '{"start": 1}', "--idempotency-key", "k" * 256],
            1,
            "1 to 255",
        ),
        (
            ["run", "linear", "--input", '{"start": 1}', "--idempotency-key", "schedule:linear"],
            1,
            "begins with 'schedule:', a prefix reserved to the keys of schedules' ticks",
        ),
        (["run", "linear", "--input", "@/nonexistent/input.json"], 2, "cannot read --input file"),
    ],
    ids=[
        "unknown-workflow",
        "fails-model",
        "invalid-json",
        "nan",
        "oversize",
        "long-key",
        "schedule-key",
        "missing-file",
    ],
)
def test_run_refuses_bad_input_with_one_line_and_writes_nothing(
    state: CliState, args: list[str], exit_code: int, message: str
) -> None:
    result = invoke(state, *args)
    assert result.exit_code == exit_code
    assert message in result.stderr
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1  # one line, no traceback
    assert result.stdout == ""
    assert rows() == {"executions": 0, "steps": 0, "events": 0}


def test_run_refuses_a_priority_out_of_range_as_a_usage_error(state: CliState) -> None:
    result = invoke(state, "run", "linear", "--input", '{"start": 1}', "--priority", "10")
    assert result.exit_code == 2
    assert "--priority" in result.stderr
    assert rows()["executions"] == 0


# --- run: what is written ------------------------------------------------------------


def test_run_prints_the_id_of_a_committed_pending_execution(state: CliState) -> None:
    execution_id = enqueue(state, "linear", '{"start": 7}')
    row = execution_row(execution_id)
    assert row["status"] == "pending"
    assert row["workflow_id"] == "linear"
    assert row["input_data"] == {"start": 7, "times": 1}
    assert {step_row(execution_id, name)["status"] for name in linear.steps} == {"pending"}


def test_run_with_the_same_idempotency_key_gives_the_first_execution(state: CliState) -> None:
    args = ["run", "linear", "--input", '{"start": 1}', "--idempotency-key", "nightly-1"]
    first, second = invoke(state, *args), invoke(state, *args)
    assert first.exit_code == second.exit_code == 0
    assert first.stdout == second.stdout
    assert rows()["executions"] == 1


def test_run_reads_the_input_from_a_file_and_from_stdin(state: CliState, tmp_path: Path) -> None:
    path = tmp_path / "input.json"
    path.write_text('{"start": 5}', encoding="utf-8")
    from_file = enqueue(state, "linear", f"@{path}")
    from_stdin = CliRunner().invoke(
        app, ["run", "linear", "--input", "-"], input='{"start": 6}', obj=state
    )
    assert from_stdin.exit_code == 0, from_stdin.output
    assert execution_row(from_file)["input_data"]["start"] == 5
    assert execution_row(from_stdin.stdout.strip())["input_data"]["start"] == 6


@pytest.mark.parametrize("broker", ["memory", "filesystem"])
def test_run_wait_without_a_worker_hints_how_to_start_one_and_keeps_waiting(
    database: TestDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker: str
) -> None:
    monkeypatch.setattr(cli_main, "HINT_AFTER", 0.2)
    monkeypatch.setattr(cli_main, "PING_TIMEOUT", 0.5)
    settings = Settings(
        database_url=database.url,
        broker_url=f"{broker}://localhost/",
        broker_folder=str(tmp_path / "broker"),
    )
    state = CliState(celery_app=create_app(settings, registry()))
    result = invoke(state, "run", "linear", "--input", '{"start": 1}', "--wait", "--timeout", "2")
    assert result.exit_code == 1
    execution_id = result.stdout.strip()
    # The seconds waited are those of the poll that first saw it pending past HINT_AFTER,
    # which a loaded machine may round up to 1.
    hint = re.compile(
        r"hint: no worker has answered in \d+ s: start one with `celery -A worker.app worker` "
        r"from this folder, with the same CONVEYOR_DATABASE_URL, CONVEYOR_BROKER_URL and "
        r"CONVEYOR_WORKFLOW_MODULES \(the execution stays pending until one does\)"
    )
    hints = list(hint.finditer(result.stderr))
    assert len(hints) == 1, result.stderr
    # It went on waiting after the hint, until the timeout.
    assert hints[0].start() < result.stderr.index("gave up waiting after 2s")
    assert execution_row(execution_id)["status"] == "pending"


def test_run_wait_gives_up_after_the_timeout_and_leaves_the_execution(state: CliState) -> None:
    result = invoke(state, "run", "linear", "--input", '{"start": 1}', "--timeout", "0.3")
    assert result.exit_code == 1
    execution_id = result.stdout.strip()
    assert f"gave up waiting after 0.3s: execution {execution_id} is still pending" in result.stderr
    assert "0/3 steps" in result.stderr
    assert execution_row(execution_id)["status"] == "pending"


# --- unknown ids -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "cancel", "retry"])
def test_an_unknown_execution_id_is_named_and_exits_1(state: CliState, command: str) -> None:
    result = invoke(state, command, "0c1d-not-there")
    assert result.exit_code == 1
    assert result.stderr == "error: no workflow execution with id '0c1d-not-there'\n"
    assert result.stdout == ""


# --- list ------------------------------------------------------------------------------


def test_list_shows_each_execution_with_its_status_and_filters(state: CliState) -> None:
    done = enqueue(state, "linear", '{"start": 1}')
    failed = enqueue(state, "broken", "null")
    waiting = enqueue(state, "linear", '{"start": 2}')
    set_execution(done, status="succeeded")
    set_execution(failed, status="failed")

    everything = invoke(state, "list")
    assert everything.exit_code == 0, everything.output
    lines = {
        line.split()[0]: line.split() for line in everything.stdout.splitlines() if line.strip()
    }
    assert lines[done][1:4] == ["linear", "v1", "succeeded"]
    assert lines[failed][1:4] == ["broken", "v1", "failed"]
    assert lines[waiting][1:4] == ["linear", "v1", "pending"]

    only_failed = invoke(state, "list", "--status", "failed").stdout
    assert failed in only_failed
    assert done not in only_failed
    assert waiting not in only_failed

    only_linear = invoke(state, "list", "--workflow", "linear").stdout
    assert done in only_linear
    assert waiting in only_linear
    assert failed not in only_linear

    limited = invoke(state, "list", "--limit", "1").stdout
    assert sum(i in limited for i in (done, failed, waiting)) == 1

    nothing = invoke(state, "list", "--status", "timed_out")
    assert nothing.exit_code == 0
    assert "No executions found." in nothing.stdout


def test_list_json_is_one_document_of_executions(state: CliState) -> None:
    done = enqueue(state, "linear", '{"start": 1}')
    waiting = enqueue(state, "broken", "null")
    set_execution(done, status="succeeded", output_data={"describe": 3})

    result = invoke(state, "list", "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [e["execution_id"] for e in listed] == [waiting, done]  # newest first
    first = listed[1]
    assert first["workflow"] == "linear"
    assert first["workflow_version"] == 1
    assert first["status"] == "succeeded"
    assert first["input"] == {"start": 1, "times": 1}
    assert first["output"] == {"describe": 3}
    assert first["started_at"] is None
    assert datetime.fromisoformat(first["created_at"]).utcoffset() == timedelta(0)
    assert "\x1b" not in result.stdout

    only_pending = json.loads(invoke(state, "list", "--json", "--status", "pending").stdout)
    assert [e["execution_id"] for e in only_pending] == [waiting]
    nothing = invoke(state, "list", "--json", "--status", "timed_out")
    assert json.loads(nothing.stdout) == []


def test_list_refuses_an_unknown_status_as_a_usage_error(state: CliState) -> None:
    result = invoke(state, "list", "--status", "exploded")
    assert result.exit_code == 2
    assert "'exploded' is not one of" in result.stderr


# --- status ----------------------------------------------------------------------------


def failed_linear(state: CliState) -> str:
    """A linear execution whose middle step failed: double ok, add_one failed, describe skipped."""
    execution_id = enqueue(state, "linear", '{"start": 20}')
    error = {"type": "ValueError", "message": "the data is bad", "traceback": "Traceback: ..."}
    force_step_status(execution_id, "double", "succeeded", output_data=40)
    force_step_status(execution_id, "add_one", "failed", attempt=2, error=error)
    force_step_status(execution_id, "describe", "skipped")
    set_execution(execution_id, status="failed", error={"step": "add_one", **error})
    return execution_id


def test_status_shows_the_execution_its_steps_and_its_dag(state: CliState) -> None:
    execution_id = failed_linear(state)
    result = invoke(state, "status", execution_id)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"execution  {execution_id}" in out
    assert "status     failed  (attempt 1)" in out
    assert "step add_one: ValueError: the data is bad" in out
    table = table_rows(out)
    assert table["double"][1:3] == ["succeeded", "1/1"]
    assert table["add_one"][1:3] == ["failed", "2/1"]
    assert table["add_one"][-1] == "ValueError"
    assert table["describe"][1] == "skipped"
    tree = out[out.index("linear v1\n") :].splitlines()
    assert tree[1:4] == [
        "└── double  succeeded",
        "    └── add_one  failed (attempt 2)",
        "        └── describe  skipped",
    ]


def test_status_without_the_definition_lists_the_steps_from_their_rows(
    cli_app: ConveyorCelery,
) -> None:
    execution_id = failed_linear(CliState(celery_app=cli_app))
    unregistered = CliState(celery_app=cli_app, registry=WorkflowRegistry())
    result = invoke(unregistered, "status", execution_id)
    assert result.exit_code == 0, result.output
    assert "definition not registered here: dependencies unknown" in result.stdout
    for line in (
        "├── add_one  failed (attempt 2)",
        "├── describe  skipped",
        "└── double  succeeded",
    ):
        assert line in result.stdout


def test_status_json_holds_the_execution_its_steps_and_their_dependencies(
    state: CliState,
) -> None:
    execution_id = failed_linear(state)
    result = invoke(state, "status", execution_id, "--json", "--history")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["execution_id"] == execution_id
    assert document["status"] == "failed"
    assert document["error"]["step"] == "add_one"
    assert document["error"]["traceback"] == "Traceback: ..."
    steps = {s["name"]: s for s in document["steps"]}
    assert [s["name"] for s in document["steps"]] == ["double", "add_one", "describe"]
    assert steps["double"]["depends_on"] == []
    assert steps["add_one"]["depends_on"] == ["double"]
    assert (steps["double"]["status"], steps["double"]["output"]) == ("succeeded", 40)
    assert (steps["add_one"]["status"], steps["add_one"]["attempt"]) == ("failed", 2)
    assert steps["add_one"]["error"]["type"] == "ValueError"
    assert steps["describe"]["status"] == "skipped"
    assert document["history"][0]["to"] == "pending"
    datetime.fromisoformat(document["history"][0]["at"])

    without = json.loads(invoke(state, "status", execution_id, "--json").stdout)
    assert "history" not in without


def test_status_json_of_an_unknown_id_is_an_error_on_stderr(state: CliState) -> None:
    result = invoke(state, "status", "0c1d-not-there", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "error: no workflow execution with id '0c1d-not-there'\n"


def test_status_shows_the_history_and_the_traceback_on_request(state: CliState) -> None:
    execution_id = failed_linear(state)
    result = invoke(state, "status", execution_id, "--history", "--traceback")
    assert result.exit_code == 0, result.output
    assert "(new) -> pending" in result.stdout
    assert result.stdout.rstrip().endswith("Traceback: ...")


# --- cancel and retry ------------------------------------------------------------------


def test_cancel_then_retry_moves_the_execution_and_its_steps(state: CliState) -> None:
    execution_id = enqueue(state, "linear", '{"start": 1}')

    cancelled = invoke(state, "cancel", execution_id)
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout == f"Cancelled {execution_id}.\n"
    assert execution_row(execution_id)["status"] == "cancelled"
    assert {step_row(execution_id, name)["status"] for name in linear.steps} == {"cancelled"}

    again = invoke(state, "cancel", execution_id)
    assert again.exit_code == 0
    assert "already cancelled" in again.stdout

    retried = invoke(state, "retry", execution_id)
    assert retried.exit_code == 0, retried.output
    assert retried.stdout == f"Retrying {execution_id} (attempt 2).\n"
    # Back to pending, its steps too: its start message admits it like a new one.
    row = execution_row(execution_id)
    assert (row["status"], row["attempt"]) == ("pending", 2)
    assert {step_row(execution_id, name)["status"] for name in linear.steps} == {"pending"}

    refused = invoke(state, "retry", execution_id)
    assert refused.exit_code == 1
    assert "is pending: only failed, cancelled or timed-out executions" in refused.stderr


def test_cancel_refuses_a_finished_execution(state: CliState) -> None:
    execution_id = enqueue(state, "linear", '{"start": 1}')
    set_execution(execution_id, status="succeeded")
    result = invoke(state, "cancel", execution_id)
    assert result.exit_code == 1
    assert "is succeeded: only pending or running executions can be cancelled" in result.stderr
    assert execution_row(execution_id)["status"] == "succeeded"


# --- workflows -------------------------------------------------------------------------


def test_workflows_lists_each_definition(state: CliState) -> None:
    result = invoke(state, "workflows")
    assert result.exit_code == 0, result.output
    table = table_rows(result.stdout)
    assert table["nightly"][1:] == ["2", "2", "3", "30m00s", "rebuild", "the", "search", "index"]
    assert table["linear"][1:] == ["1", "3", "-", "-"]
    assert table["broken"][1:] == ["1", "3", "-", "-"]


def test_workflows_json_holds_steps_input_schema_and_schedules(state: CliState) -> None:
    result = invoke(state, "workflows", "--json")
    assert result.exit_code == 0, result.output
    documents = {w["name"]: w for w in json.loads(result.stdout)}
    assert set(documents) == {"linear", "broken", "nightly"}
    linear_doc = documents["linear"]
    assert linear_doc["version"] == 1
    assert [(s["name"], s["depends_on"]) for s in linear_doc["steps"]] == [
        ("double", []),
        ("add_one", ["double"]),
        ("describe", ["add_one"]),
    ]
    schema = linear_doc["input_schema"]
    assert schema["required"] == ["start"]
    assert schema["properties"]["start"]["type"] == "integer"
    assert linear_doc["schedules"] == []
    nightly_doc = documents["nightly"]
    assert nightly_doc["input_schema"] is None
    assert (nightly_doc["max_concurrency"], nightly_doc["deadline_seconds"]) == (3, 1800)
    assert nightly_doc["schedules"] == [
        {"name": "hourly", "cron": None, "every_seconds": 3600, "timezone": "UTC", "input": None}
    ]


def test_workflows_says_when_none_are_registered() -> None:
    result = invoke(CliState(registry=WorkflowRegistry()), "workflows")
    assert result.exit_code == 0
    assert "No workflows registered" in result.stdout
    assert "CONVEYOR_WORKFLOW_MODULES" in result.stdout


# --- secrets and settings ----------------------------------------------------------------


@pytest.fixture
def unreachable_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every core.database helper pointed at a PostgreSQL that refuses connections."""
    monkeypatch.setattr(core_database, "_current", None)  # put back afterwards
    password = "s3cret-pw"
    url = f"postgresql://conveyor:{password}@127.0.0.1:9/conveyor"
    core_database.configure(Settings(database_url=url, db_retry_attempts=1))
    try:
        yield password
    finally:
        core_database.get_database().dispose()


@pytest.mark.parametrize("args", [["list"], ["status", "some-id"], ["migrate"]])
def test_an_unreachable_database_is_one_line_without_the_password(
    unreachable_database: str, args: list[str]
) -> None:
    result = invoke(CliState(registry=WorkflowRegistry()), *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: database unavailable: ")
    assert result.stderr.count("\n") == 1
    assert unreachable_database not in result.output


def test_invalid_settings_are_named_without_their_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_database, "_current", None)
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", "mysql://conveyor:s3cret-pw@db.invalid/conveyor")
    get_settings.cache_clear()
    try:
        result = invoke(None, "list")
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "CONVEYOR_DATABASE_URL" in result.stderr
    assert "unsupported database" in result.stderr
    assert "s3cret" not in result.output


# --- demo ------------------------------------------------------------------------------


def test_demo_runs_cli_demo_main_and_exits_with_its_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def main() -> int:
        calls.append("main")
        return 3

    fake = types.ModuleType("conveyor.cli.demo")
    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "conveyor.cli.demo", fake)
    result = invoke(None, "demo")
    assert calls == ["main"]
    assert result.exit_code == 3
