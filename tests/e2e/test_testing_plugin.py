"""conveyor's pytest plugin as a user meets it: a project of their own (a copy of
tests/e2e/plugin_project) whose tests use only the documented ``conveyor_test`` fixture,
run by pytest in a subprocess (the plugin found through its ``pytest11`` entry point,
warnings as errors, as the project's pytest.ini says), on the throwaway SQLite database
and on PostgreSQL when
``CONVEYOR_DATABASE_URL`` names one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.database import get_db_session
from core.models import WorkflowExecution
from tests.conftest import TestDatabase

PROJECT = Path(__file__).parent / "plugin_project"


def _pytest(project: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    shutil.copy(PROJECT / "pytest.ini", project / "pytest.ini")
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "-v"]
    return subprocess.run(
        [*command, "--durations=0", "."],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_users_tests_run_workflows_with_time_travel(
    database: TestDatabase, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    if database.is_postgres:
        env["CONVEYOR_DATABASE_URL"] = database.url
    result = _pytest(project, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    # The three-day sleep, seven-day timeout and hour of backoff: wall time printed
    # by the user's test (measured, not asserted: see the note).
    assert re.search(r"WALL \d+\.\d+s", result.stdout), result.stdout
    if database.is_postgres:
        # The plugin used the database it was given, and emptied it for each test: the
        # last test's execution is what is left.
        with get_db_session() as db:
            assert db.execute(select(func.count()).select_from(WorkflowExecution)).scalar() == 1


def test_a_fake_that_does_not_fit_the_step_is_refused(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_fake.py").write_text(
        "import pytest\n"
        "from conveyor import Workflow, DefinitionError\n"
        "wf = Workflow('fits')\n"
        "@wf.step()\n"
        "def a(ctx) -> int:\n"
        "    return 1\n"
        "@wf.step(depends_on=['a'])\n"
        "def b(ctx, a: int) -> int:\n"
        "    return a\n"
        "def test_refused(conveyor_test):\n"
        "    conveyor_test.register(wf)\n"
        "    with pytest.raises(DefinitionError, match='missing: a'):\n"
        "        conveyor_test.override_step('b', lambda ctx: 2)\n"
        "    with pytest.raises(DefinitionError, match='no registered workflow'):\n"
        "        conveyor_test.override_step('c', lambda ctx: 2)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    result = _pytest(project, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


pytestmark = pytest.mark.timeout(180)
