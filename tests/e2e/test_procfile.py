"""The Procfile, run as a deploy runs it: `release` first, then web, worker and beat under
honcho on the embedded default (a SQLite file and the filesystem broker); a workflow
enqueued over HTTP succeeds, and SIGTERM stops every process cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
PROCESSES = ("web", "worker", "beat")
# honcho SIGKILLs whatever still runs 5 s after its SIGTERM (KILL_WAIT, not an option).
# A prefork Celery worker's warm shutdown takes longer than that even when idle (billiard
# joins its pool's threads, and the filesystem broker is polled every 2 s), so the test
# gives it Heroku's 30 s: what it checks is that SIGTERM reaches each real process and
# each ends by itself, rc 0; how long a runner waits is the runner's setting.
HONCHO = (
    "import sys; import honcho.manager; honcho.manager.KILL_WAIT = 30; "
    "from honcho.command import main; sys.argv[0] = 'honcho'; main()"
)


def procfile_command(name: str) -> str:
    """The command of one Procfile process type."""
    for line in (REPO / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} process in the Procfile")


def conveyor(env: dict[str, str], cwd: Path, *args: str) -> str:
    """Run the `conveyor` command line; its standard output."""
    result = subprocess.run(
        ["conveyor", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@contextmanager
def honcho(
    env: dict[str, str], cwd: Path, port: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`honcho start web worker beat` with the repository's Procfile, until it ends."""
    command = [sys.executable, "-c", HONCHO, "--no-colour", "-f", str(REPO / "Procfile")]
    command += ["-d", str(cwd), "start", "-p", str(port), *PROCESSES]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        # honcho starts each process in a session of its own: end any left behind.
        for pid in re.findall(r"started \(pid=(\d+)\)", log.read_text()):
            with suppress(ProcessLookupError):
                os.killpg(int(pid), signal.SIGKILL)


@pytest.mark.timeout(90)
def test_the_procfile_runs_a_workflow_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "FLOWER_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        CONVEYOR_DATABASE_URL=f"sqlite:///{tmp_path / 'conveyor.db'}",
        CONVEYOR_BROKER_URL="filesystem://localhost/",
        CONVEYOR_BROKER_FOLDER=str(tmp_path / "broker"),
        CONVEYOR_WORKFLOW_MODULES="conveyor.examples.workflows",
    )
    release = subprocess.run(
        ["sh", "-c", procfile_command("release")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert release.returncode == 0, release.stderr
    conveyor(env, tmp_path, "users", "create", "ops@example.com", "--name", "Ops", "--admin")
    token = json.loads(conveyor(env, tmp_path, "tokens", "issue", "ops@example.com", "--json"))

    log = tmp_path / "honcho.log"
    with ExitStack() as stack:
        process = stack.enter_context(honcho(env, tmp_path, port, log))
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token['token']}"},
            timeout=10,
        )
        stack.callback(api.close)
        deadline = time.monotonic() + 45
        while True:
            assert process.poll() is None, log.read_text()
            with suppress(httpx.TransportError):
                health = api.get("/healthz")
                if health.status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert health.json()["database"]["status"] == "ok"

        created = api.post(
            "/executions",
            json={"workflow": "daily_report", "input": {"region": "eu"}, "priority": 0},
        )
        assert created.status_code == 201, created.text
        location = created.headers["Location"]
        assert location.endswith(created.json()["execution_id"])
        while True:
            execution = api.get(location).json()
            if execution["status"] not in ("pending", "running"):
                break
            assert time.monotonic() < deadline, (execution, log.read_text())
            time.sleep(0.1)
        assert execution["status"] == "succeeded", execution
        assert {s["status"] for s in execution["steps"]} == {"succeeded"}

        process.send_signal(signal.SIGTERM)
        process.wait(timeout=45)
        output = log.read_text()

    # honcho ends with the status of the signal that stopped it.
    assert process.returncode == 128 + signal.SIGTERM, output
    stopped = dict(re.findall(r"^\S+ system\s+\| (\w+)\.1 stopped \(rc=(-?\d+)\)$", output, re.M))
    assert "SIGKILL" not in output
    # Each main process got the signal itself (exec), not a shell: Celery's worker and
    # beat end with 0; uvicorn, after its graceful shutdown, re-raises the signal.
    assert stopped == {"web": "-15", "worker": "0", "beat": "0"}, output
    assert "Finished server process" in output
    assert "worker: Warm shutdown (MainProcess)" in output
    # The runner's SIGTERM to the group did not reach the pool processes.
    assert "exited with 'signal" not in output
