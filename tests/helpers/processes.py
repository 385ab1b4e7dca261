"""Real `celery worker` processes for the tests that need one apart from pytest's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import TestDatabase

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def worker_process(
    database: TestDatabase,
    broker_url: str,
    log: Path,
    concurrency: int = 2,
    env: dict[str, str] | None = None,
    options: Sequence[str] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """A prefork `celery -A worker.app worker` in its own process group, until ready;
    ``options`` are more of the command's (``-Q gpu``, ``-n gpu@%h``)."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CONVEYOR_DATABASE_URL": database.url,
        "CONVEYOR_BROKER_URL": broker_url,
        "CONVEYOR_WORKFLOW_MODULES": "tests.e2e.workflows",
        "CONVEYOR_HEARTBEAT_INTERVAL": "0.5",
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "info",
        "--without-mingle",
        "--without-gossip",
        *options,
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
