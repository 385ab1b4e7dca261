"""Stumbles of a newcomer's first hour (issue 19), each fixed: README's recipe for one's
own workflows runs as written; the `conveyor` command imports workflow modules from the
current directory as `celery` and `uvicorn` do; a worker says what it runs and warns of
what would fail; a step that succeeded after retries shows no error in `conveyor
status`; a typo in `depends_on` is named with what was meant."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conveyor.cli.main import CliState, app
from core.errors import DefinitionError
from core.workflows import Workflow
from tests.e2e.conftest import wait_for
from tests.helpers.state import step_row
from worker.app import ConveyorCelery
from worker.producer import enqueue

MODULE = """
from conveyor import Workflow

mine = Workflow("mine_in_cwd")


@mine.step()
def hello(ctx) -> str:
    return "hello"
"""


def test_the_conveyor_command_imports_workflow_modules_from_the_current_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "mymodule.py").write_text(MODULE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.pop("PYTHONPATH", None)
    env.update(
        CONVEYOR_DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}",
        CONVEYOR_WORKFLOW_MODULES="mymodule",
    )
    conveyor = str(Path(sys.executable).parent / "conveyor")
    migrated = subprocess.run(
        [conveyor, "migrate"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert migrated.returncode == 0, migrated.stderr
    listed = subprocess.run(
        [conveyor, "workflows", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert "mine_in_cwd" in listed.stdout


def test_a_step_that_succeeded_after_retries_shows_no_error(worker: ConveyorCelery) -> None:
    execution_id = enqueue("flaky", app=worker)
    assert wait_for(execution_id).status == "succeeded"
    result = CliRunner().invoke(
        app, ["status", execution_id], obj=CliState(celery_app=worker), catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "Glitch" not in result.stdout
    assert "3/3" in result.stdout
    # Nor does the API or anything reading the row: the failures are in its history.
    assert step_row(execution_id, "sometimes")["error"] is None


def test_a_typo_in_depends_on_says_what_was_meant() -> None:
    wf = Workflow("typo")

    @wf.step()
    def load(ctx: object) -> int:
        return 1

    with pytest.raises(DefinitionError, match="depends_on names 'lod': did you mean 'load'"):

        @wf.step(depends_on=["lod"])
        def use(ctx: object, load: int) -> int:
            return load


def test_a_worker_says_what_it_runs_and_warns_of_what_would_fail(
    conveyor_app: ConveyorCelery, caplog: pytest.LogCaptureFixture
) -> None:
    from core.registry import WorkflowRegistry
    from worker.app import create_app
    from worker.startup import report

    caplog.set_level(logging.INFO, logger="worker.startup")
    report(conveyor_app.engine, "w1@host")
    (said,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "conveyor worker w1@host: workflows" in said
    assert "linear v1" in said
    assert "broker redis://" in said
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    empty = create_app(conveyor_app.engine.settings, WorkflowRegistry())
    report(empty.engine, "w2@host")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("CONVEYOR_WORKFLOW_MODULES" in w for w in warnings)


def test_a_worker_on_an_unmigrated_database_warns_to_migrate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from core.config import Settings
    from core.registry import WorkflowRegistry
    from worker.engine import Engine
    from worker.startup import report

    caplog.set_level(logging.INFO, logger="worker.startup")
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'never-migrated.db'}",
        broker_url="redis://:secret@127.0.0.1:1/0",
        dispatcher="",
    )

    class App:
        pass

    engine = Engine(App(), settings, WorkflowRegistry())  # type: ignore[arg-type]
    try:
        report(engine, "w3@host")
    finally:
        engine.manager.database.dispose()
    messages = [r.getMessage() for r in caplog.records]
    assert any("conveyor migrate" in m for m in messages), messages
    assert not any("secret" in m for m in messages), messages
    assert not (tmp_path / "never-migrated.db").exists()


def test_the_api_lists_an_executions_steps_in_dag_order(worker: ConveyorCelery) -> None:
    from conveyor.api.app import create_app as create_api
    from core.accounts import Role
    from tests.helpers.api import client, serve, user_with_token

    execution_id = enqueue("linear", {"start": 1}, app=worker)
    wait_for(execution_id)
    _, token = user_with_token("ops@example.com", Role.ADMIN)
    with serve(create_api(worker)) as url, client(url, token) as http:
        steps = http.get(f"/executions/{execution_id}").json()["steps"]
    # Alphabetically add_one, describe, double; in the DAG double runs first.
    assert [s["name"] for s in steps] == ["double", "add_one", "describe"]


def _recipe() -> tuple[str, str]:
    """README's "Your own workflows": the module it writes and the shell block it runs."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    after = readme.split("<!-- recipe:", 1)[1]
    module = after.split("```python\n", 1)[1].split("```", 1)[0]
    commands = after.split("```bash\n", 1)[1].split("```", 1)[0]
    return module, commands


def test_the_readmes_own_workflows_recipe_runs_as_written(tmp_path: Path) -> None:
    # A newcomer's path, as README gives it: their module in a fresh directory, the
    # block copied into a shell (migrate, a worker and beat in the background, then
    # `conveyor run --wait`). The sleep in the recipe's workflow ends only if beat's waker
    # runs, so every process the recipe starts has to work for the run to finish.
    module, commands = _recipe()
    (tmp_path / "flows.py").write_text(module)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONVEYOR_", "CELERY_")) and k != "PYTHONPATH"
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Files, not pipes: the worker and beat hold the shell's output open after it ends.
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        shell = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", commands],
            cwd=tmp_path,
            env=env,
            stdout=out_file,
            stderr=err_file,
            start_new_session=True,  # the worker and beat it starts: one group to stop
        )
        try:
            shell.wait(timeout=90)
        finally:
            _stop_group(shell)
    out, err = out_path.read_text(), err_path.read_text()
    assert shell.returncode == 0, err[-3000:]
    assert '"shout": "HELLO, ADA"' in out, out
    assert (tmp_path / "conveyor.db").exists()


def _stop_group(shell: subprocess.Popen[bytes]) -> None:
    """SIGKILL what the recipe started (the test has its answer; a warm shutdown would
    only add its 8 s), reap the shell, then wait until the whole group is gone (the
    worker and beat, reparented, are reaped by init)."""
    import signal
    import time

    pgid = shell.pid
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    finally:
        shell.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process group {pgid} outlived SIGKILL")
