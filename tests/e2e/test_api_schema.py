"""Every endpoint of the API fuzzed against its own OpenAPI schema by schemathesis.

The API is served for real (uvicorn, tests/helpers/api.serve) on the test PostgreSQL
and Redis; ``schemathesis run`` (its CLI, in a subprocess) loads ``/openapi.json`` and
sends every operation schema-valid and schema-violating requests with an admin's token
(and requests without it), then checks every response against the schema. What it runs
and what it found is recorded in docs/api-security.md.

Why the CLI: schemathesis' pytest integration (``schemathesis.pytest.from_fixture``)
fails under pytest 9.2 (it sets ``Function._nodeid``, which pytest no longer has); the
CLI is its primary interface and reports counts we assert on (``--report json``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from conveyor.api.app import create_app
from core import accounts
from core.accounts import Role
from core.database import get_db_session
from tests.conftest import TestDatabase
from tests.helpers.api import serve, user_with_token
from worker.app import ConveyorCelery
from worker.producer import enqueue

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")

# Bounded for ~30 s on two cores: 20 fuzzed cases per operation on top of the coverage
# phase's boundary cases; deterministic, so a run repeats the last one exactly.
CONFIG = """
workers = 1
continue-on-failure = true

[generation]
max-examples = 20
deterministic = true

[phases.examples]
enabled = true
[phases.coverage]
enabled = true
[phases.fuzzing]
enabled = true
[phases.stateful]
enabled = false

[checks]
enabled = true

[dictionaries]
{dictionaries}

# Half the requests name objects that exist, so the operations on one are reached (the
# other half are generated: unknown ids, 404).
[parameters]
"path.execution_id" = {{ dictionary = "executions", probability = 0.5 }}
"path.user_id" = {{ dictionary = "users", probability = 0.5 }}
"path.token_id" = {{ dictionary = "tokens", probability = 0.5 }}
"path.name" = {{ dictionary = "workflows", probability = 0.5 }}
"path.step" = {{ dictionary = "steps", probability = 0.5 }}
"query.workflow" = {{ dictionary = "workflows", probability = 0.5 }}
"query.user_id" = {{ dictionary = "users", probability = 0.5 }}
"body.workflow" = {{ dictionary = "workflows", probability = 0.5 }}
"body.user_id" = {{ dictionary = "users", probability = 0.5 }}

# positive_data_acceptance expects every schema-valid request to succeed. These
# also validate against state no static schema can hold: the registered workflows (an
# unknown one is 422), CONVEYOR_API_TOKEN_TTL_DAYS (a longer expiry is 422), cursors
# only the API issues (an invented one is 422), and a step's kind and its wait's payload
# schema (a signal to a task step, a wake of an event wait: 422). Every other check
# still runs on them.
[[operations]]
include-name = [
    "POST /executions",
    "POST /tokens",
    "GET /executions",
    "POST /executions/{{execution_id}}/signals/{{step}}",
    "POST /executions/{{execution_id}}/steps/{{step}}/wake",
]
checks.positive_data_acceptance.enabled = false
"""


def run_schemathesis(
    url: str, token: str, workdir: Path, known: dict[str, list[str]]
) -> dict[str, Any]:
    """Run schemathesis over every operation as ``token``, drawing ids from ``known``
    (dictionary name -> values); its JSON report."""
    config = workdir / "schemathesis.toml"
    dictionaries = "\n".join(f"{name}.values = {json.dumps(v)}" for name, v in known.items())
    config.write_text(CONFIG.format(dictionaries=dictionaries))
    result = subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(config),
            "--no-color",
            "run",
            f"{url}/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--report",
            "json",
            "--report-json-path",
            str(workdir / "report.json"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "NO_COLOR": "1"},
        check=False,
        cwd=workdir,
    )
    (workdir / "stdout.txt").write_text(result.stdout + result.stderr)
    assert (workdir / "report.json").exists(), result.stdout + result.stderr
    report: dict[str, Any] = json.loads((workdir / "report.json").read_text())
    report["stdout"] = result.stdout
    report["returncode"] = result.returncode
    return report


def spare_token(user_id: str) -> str:
    """The id of a new token of ``user_id``."""
    with get_db_session(commit=True) as db:
        user = accounts.get_user(db, user_id)
        return accounts.issue_token(db, user, ttl=timedelta(days=1)).session.id


@pytest.mark.postgresql_only
def test_every_endpoint_answers_as_its_schema_says(
    database: TestDatabase, conveyor_app: ConveyorCelery, tmp_path: Path
) -> None:
    admin_id, token = user_with_token("root@example.com", Role.ADMIN)
    member_id, _ = user_with_token("member@example.com")
    # A token schemathesis may revoke (DELETE /tokens/{id}): not the one it calls with.
    spare = spare_token(admin_id)
    executions = [
        enqueue("linear", {"start": n}, triggered_by=admin_id, app=conveyor_app) for n in range(3)
    ] + [enqueue("broken", None, triggered_by=member_id, app=conveyor_app)]
    # Executions with wait nodes, for the signal and wake operations (pending: no worker).
    executions += [
        enqueue("nap", None, triggered_by=admin_id, app=conveyor_app),
        enqueue(
            "invoice-approval", {"invoice_id": "inv-1"}, triggered_by=admin_id, app=conveyor_app
        ),
    ]
    known = {
        "executions": executions,
        "users": [admin_id, member_id],
        "tokens": [spare],
        "steps": ["approval", "nap", "double"],
        "workflows": sorted({w.name for w in conveyor_app.engine.registry}),
    }
    with serve(create_app(conveyor_app)) as url:
        report = run_schemathesis(url, token, tmp_path, known)
    print(report["stdout"])
    summary = {k: report[k] for k in ("operations", "test_cases", "failures", "errors")}
    assert report["operations"]["tested"] == report["operations"]["total"], summary
    assert report["test_cases"]["generated"] > 0, summary
    assert report["failures"] == [], summary
    assert report["errors"] == [], summary
    assert report["returncode"] == 0, summary
