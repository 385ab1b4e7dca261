"""Flower, started as the Procfile starts it: it refuses requests without its basic auth,
and shows a failed step's task as failed and a retried one's as retried."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest

from core.registry import configure_registry
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, e2e_registry, running_worker, wait_for
from tests.servers import free_port
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue

REPO = Path(__file__).resolve().parents[2]


def _procfile_command(name: str) -> str:
    for line in (REPO / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} process in the Procfile")


USER, PASSWORD = "ops", "s3cret-for-the-test"


@contextmanager
def flower(redis_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Flower started as the Procfile starts it, on ``redis_url``: its URL and log, once
    it answers HTTP."""
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
        "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
        "FLOWER_PORT": str(port),
    }
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-c", _procfile_command("flower")],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                httpx2.get(url, timeout=2)
                break
            except httpx2.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield url, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


def test_flower_requires_basic_auth(redis_url: str, tmp_path: Path) -> None:
    with flower(redis_url, tmp_path) as (url, log):
        anonymous = httpx2.get(url, timeout=5)
        assert anonymous.status_code == 401
        wrong = httpx2.get(url, auth=(USER, "guess"), timeout=5)
        assert wrong.status_code == 401
        right = httpx2.get(url, auth=(USER, PASSWORD), timeout=5)
        assert right.status_code == 200
        assert "Flower" in right.text
        assert PASSWORD.encode() not in log.read_bytes()
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        assert token not in log.read_text()


def _tasks_of(url: str, execution_id: str) -> list[dict[str, Any]]:
    """The tasks Flower knows for an execution (its id is in their kwargs), oldest first."""
    found = httpx2.get(f"{url}api/tasks", auth=(USER, PASSWORD), timeout=5)
    found.raise_for_status()
    tasks = [t for t in found.json().values() if execution_id in (t.get("kwargs") or "")]
    return sorted(tasks, key=lambda t: t.get("received") or 0)


def _flower_shows(
    url: str, execution_id: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float
) -> list[dict[str, Any]]:
    """Poll Flower until its tasks of the execution satisfy ``done``; those tasks."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = _tasks_of(url, execution_id)
        if done(tasks) or time.monotonic() > deadline:
            return tasks
        time.sleep(0.1)


@pytest.fixture
def stepwise_worker(database: TestDatabase, redis_url: str) -> Iterator[ConveyorCelery]:
    """A worker that continues nothing: every step is its own Celery task."""
    settings = clean_app_settings(database, redis_url).model_copy(update={"continue_max_steps": 0})
    registry = e2e_registry()
    configure_registry(registry)
    with running_worker(create_app(settings, registry)) as app:
        yield app


def test_flower_shows_failed_and_retried_steps_as_such(
    stepwise_worker: ConveyorCelery, redis_url: str, tmp_path: Path
) -> None:
    with flower(redis_url, tmp_path) as (url, _):
        # Flower sees only the events sent after it subscribed: until it shows one,
        # send another.
        deadline = time.monotonic() + 60
        while True:
            probe = enqueue("quick", None, app=stepwise_worker)
            if _flower_shows(url, probe, bool, timeout=3):
                break
            assert time.monotonic() < deadline, "Flower showed no task in 60s"

        broken = enqueue("broken", None, app=stepwise_worker)
        flaky = enqueue("flaky", None, app=stepwise_worker)
        assert wait_for(broken).status == "failed"
        assert wait_for(flaky).status == "succeeded"

        def states(tasks: list[dict[str, Any]]) -> list[tuple[str, str]]:
            return [(t["name"], t["state"]) for t in tasks]

        failed = _flower_shows(url, broken, lambda t: len(states(t)) == 2, timeout=30)
        assert states(failed) == [
            ("conveyor.start_execution:broken", "SUCCESS"),  # ran step fine
            ("conveyor.run_step:broken.explode", "FAILURE"),
        ]
        assert "step explode of execution" in failed[1]["exception"]
        assert "ValueError: the data is bad" in failed[1]["exception"]

        retried = _flower_shows(url, flaky, lambda t: len(states(t)) == 3, timeout=30)
        assert states(retried) == [
            ("conveyor.start_execution:flaky", "RETRY"),  # attempt 1 of step sometimes
            ("conveyor.run_step:flaky.sometimes", "RETRY"),
            ("conveyor.run_step:flaky.sometimes", "SUCCESS"),
        ]
        assert "will retry, attempt 2/3" in retried[0]["exception"]
        assert "Glitch: attempt 2 glitched" in retried[1]["exception"]


def test_flower_will_not_start_without_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    result = subprocess.run(
        ["bash", "-c", _procfile_command("flower")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "set FLOWER_BASIC_AUTH" in result.stderr
