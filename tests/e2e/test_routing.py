"""Routing steps to worker pools (``queue=``): real worker processes on different queues
(``celery worker -Q``), each step recording the pool that ran it."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from conveyor.api.app import create_app as create_api
from conveyor.cli.main import CliState
from conveyor.cli.main import app as cli
from core.accounts import Role
from core.database import get_database
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.registry import configure_registry
from core.sql import utcnow
from tests.conftest import TestDatabase
from tests.e2e import routing_workflows
from tests.e2e.conftest import clean_app_settings, e2e_registry, wait_for
from tests.e2e.routing_workflows import POOL, alternating, mapped, split_roots
from tests.helpers.api import client, serve, user_with_token
from tests.helpers.processes import worker_process
from tests.helpers.state import force_step_status, step_row
from worker.app import ConveyorCelery, create_app
from worker.config import MAX_PRIORITY
from worker.engine import RUN_STEP
from worker.metrics import api_registry
from worker.producer import enqueue

MODULES = f"tests.e2e.workflows,{routing_workflows.__name__}"


@pytest.fixture
def routing_app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    """An app (the producer's side) that knows the routing workflows, on a clean Redis."""
    registry = e2e_registry()
    registry.load_module(routing_workflows.__name__)
    configure_registry(registry)
    return create_app(clean_app_settings(database, redis_url), registry)


@contextmanager
def pools(database: TestDatabase, redis_url: str, tmp_path: Path, *queues: str) -> Iterator[None]:
    """One worker process per queue: ``-Q queue``, its own node name, and ROUTING_POOL
    set to the queue, which its steps return."""
    with ExitStack() as stack:
        for queue in queues:
            stack.enter_context(
                worker_process(
                    database,
                    redis_url,
                    tmp_path / f"{queue}.log",
                    env={"CONVEYOR_WORKFLOW_MODULES": MODULES, POOL: queue},
                    options=["-Q", queue, "-n", f"{queue}@%h"],
                )
            )
        yield


def events_with_reasons(execution_id: str) -> list[tuple[str | None, str]]:
    """(step, reason) of every event of the execution."""
    return [
        (event.step_name, event.reason)
        for event in SyncEnhancedExecutionStateManager().get_history(execution_id)
    ]


def run_messages(redis_url: str, queue: str, *, take: bool = False) -> list[str]:
    """Step names of the ``conveyor.run_step`` messages waiting in ``queue`` (every
    priority level of it); with ``take``, the queue is emptied (the broker lost it)."""
    client = redis.Redis.from_url(redis_url)
    try:
        names = []
        for key in [queue, *(f"{queue}:{level}" for level in range(1, MAX_PRIORITY + 1))]:
            for raw in client.lrange(key, 0, -1):
                message = json.loads(raw)
                if message["headers"]["task"] == RUN_STEP:
                    _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
                    names.append(kwargs["step_name"])
            if take:
                client.delete(key)
        return sorted(names)
    finally:
        client.close()


def test_every_step_runs_on_a_worker_of_its_queue(
    database: TestDatabase, redis_url: str, routing_app: ConveyorCelery, tmp_path: Path
) -> None:
    with pools(database, redis_url, tmp_path, "a", "b"):
        runs = [(enqueue("alternating", app=routing_app), alternating) for _ in range(4)]
        runs += [(enqueue("split_roots", app=routing_app), split_roots) for _ in range(3)]
        runs += [(enqueue("mapped_routing", app=routing_app), mapped) for _ in range(2)]
        finished = [(wait_for(execution_id, timeout=60), flow) for execution_id, flow in runs]

    for execution, flow in finished:
        assert execution.status == "succeeded"
        if flow is mapped:
            # Each item ran on the map's queue; the steps around it on the workflow's.
            gathered = step_row(execution.execution_id, "gathered")["output_data"]
            assert (gathered["pool"], gathered["items"]) == ("a", ["b"])
            continue
        ran_on = {
            name: step_row(execution.execution_id, name)["output_data"]["pool"]
            for name in flow.steps
        }
        assert ran_on == {name: flow.queue_of(name) for name in flow.steps}
        if flow is alternating:
            # Within a queue the worker still continues (no message): s6 -> fan_b on b
            # (fan_c held beside it, or handed off to b); fan_a was published to a.
            history = events_with_reasons(execution.execution_id)
            assert ("fan_b", "continued in worker") in history
            assert step_row(execution.execution_id, "fan_a")["celery_task_id"] is not None


def test_the_reconciler_republishes_a_lost_step_to_its_queue(
    database: TestDatabase, redis_url: str, routing_app: ConveyorCelery, tmp_path: Path
) -> None:
    engine = routing_app.engine
    with pools(database, redis_url, tmp_path, "a"):
        execution_id = enqueue("alternating", app=routing_app)
        # s1 ran on a; s2 (queue b, no worker yet) was published to b after the commit
        # that queued it, not continued.
        wait_for(execution_id, lambda _: run_messages(redis_url, "b") == ["s2"])
        assert step_row(execution_id, "s2")["status"] == "queued"
        assert run_messages(redis_url, "b", take=True) == ["s2"]  # the broker loses it

        long_ago = utcnow(-engine.settings.republish_after - 1)
        force_step_status(execution_id, "s2", "queued", queued_at=long_ago)
        report = engine.reconcile()

        assert report.republish == [(execution_id, "s2")]
        assert run_messages(redis_url, "b") == ["s2"]
        assert run_messages(redis_url, "a") == []
        assert run_messages(redis_url, engine.settings.default_queue) == []
        with pools(database, redis_url, tmp_path, "b"):
            execution = wait_for(execution_id, timeout=60)
    assert execution.status == "succeeded"
    assert step_row(execution_id, "s2")["output_data"]["pool"] == "b"
    assert step_row(execution_id, "s2")["republishes"] == 1


def test_a_queue_no_worker_consumes_shows_its_steps_until_a_worker_takes_it(
    database: TestDatabase, redis_url: str, routing_app: ConveyorCelery, tmp_path: Path
) -> None:
    engine = routing_app.engine
    default = engine.settings.default_queue
    with pools(database, redis_url, tmp_path, default):
        execution_id = enqueue("stranded", app=routing_app)
        # Published (after its commit) to its queue, where no worker takes it: queued,
        # not run elsewhere.
        wait_for(execution_id, lambda _: run_messages(redis_url, "nobody") == ["behind"])
        assert step_row(execution_id, "ahead")["status"] == "succeeded"
        assert step_row(execution_id, "behind")["status"] == "queued"

        shown = CliRunner().invoke(
            cli, ["status", execution_id], obj=CliState(celery_app=routing_app)
        )
        assert shown.exit_code == 0, shown.output
        assert "nobody (no worker)" in shown.stdout
        assert "-Q nobody" in shown.stdout
        assert "(no worker)" not in shown.stdout.replace("nobody (no worker)", "")

        gauges = api_registry(get_database(), engine.queue_of)
        queued = {"workflow": "stranded", "queue": "nobody"}
        assert gauges.get_sample_value("conveyor_steps_queued", queued) == 1.0

        _, token = user_with_token("ops@example.com", Role.ADMIN)
        with serve(create_api(routing_app)) as url, client(url, token) as http:
            steps = {s["name"]: s for s in http.get(f"/executions/{execution_id}").json()["steps"]}
            assert (steps["behind"]["queue"], steps["ahead"]["queue"]) == ("nobody", default)
            declared = http.get("/workflows/stranded").json()["steps"]
            assert {s["name"]: s["queue"] for s in declared} == {
                "ahead": default,
                "behind": "nobody",
            }

        with pools(database, redis_url, tmp_path, "nobody"):
            execution = wait_for(execution_id, timeout=60)
    assert execution.status == "succeeded"
    assert step_row(execution_id, "behind")["output_data"]["pool"] == "nobody"
    assert gauges.get_sample_value("conveyor_steps_queued", queued) is None
