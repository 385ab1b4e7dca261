"""End-to-end fixtures: a real Celery worker (in this process) on the real Redis broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx2 as httpx
import pytest
import redis
from celery.contrib.testing.worker import start_worker

from conveyor.api.app import create_app as create_api
from core.accounts import Role
from core.config import Settings
from core.execution_state_manager import SyncExecutionStateManager
from core.models import WorkflowExecution
from core.registry import WorkflowRegistry, configure_registry
from tests.conftest import TestDatabase
from tests.e2e import map_workflows, wait_workflows, workflows
from tests.helpers.api import client, serve, user_with_token
from worker.app import ConveyorCelery, create_app

# A user's project, run by test_testing_plugin.py with pytest of its own.
collect_ignore = ["plugin_project"]


def e2e_registry() -> WorkflowRegistry:
    """Every workflow of tests/e2e/workflows.py, wait_workflows.py and map_workflows.py."""
    registry = WorkflowRegistry()
    registry.load_module(workflows.__name__)
    registry.load_module(wait_workflows.__name__)
    registry.load_module(map_workflows.__name__)
    return registry


def clean_app_settings(database: TestDatabase, redis_url: str) -> Settings:
    """Settings of a test app on the test database and a Redis emptied for it."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return Settings(
        database_url=database.url,
        broker_url=redis_url,
        heartbeat_interval=0.5,
        # Short enough that a test's server (and so its uptime) is older than it: the
        # reconciler judges no step stalled within a stall timeout of a database start.
        stall_timeout=5.0,
        db_retry_initial_wait=0.01,
        db_retry_max_wait=0.2,
    )


@pytest.fixture
def conveyor_app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    """An app on the test database and a clean Redis."""
    settings = clean_app_settings(database, redis_url)
    registry = e2e_registry()
    # Executions created through core (the seed's manager, the ORM) use these workflows.
    configure_registry(registry)
    app = create_app(settings, registry)
    # An idle in-process worker's consumer sits in a BRPOP that stopping it waits out
    # (kombu's default: 1 s, a second of teardown per test); 0.1 s keeps stops quick.
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "polling_interval": 0.1,
    }
    return app


@contextmanager
def running_worker(app: ConveyorCelery, concurrency: int = 4) -> Iterator[ConveyorCelery]:
    """Run an in-process worker (threads pool) on ``app`` for the block."""
    with start_worker(
        app, pool="threads", concurrency=concurrency, perform_ping_check=False, shutdown_timeout=30
    ) as controller:
        yield app
    # start_worker stops the worker cold, and a cold stop of the threads pool does not
    # wait for running steps: a step still finishing would write through a connection
    # while the test's database is disposed and dropped, which leaks that connection
    # into the discarded pool (a ResourceWarning in whichever test collects it).
    _join_running_steps(controller.pool.executor, timeout=30)
    app.engine.heartbeats.stop()


def _join_running_steps(executor: ThreadPoolExecutor, timeout: float) -> None:
    """Wait until the pool's running steps return; queued ones are dropped unrun."""
    joining = threading.Thread(
        target=executor.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True
    )
    joining.start()
    joining.join(timeout)
    if joining.is_alive():
        raise RuntimeError(f"a step of the test worker was still running {timeout} s after stop")


@pytest.fixture
def worker(conveyor_app: ConveyorCelery) -> Iterator[ConveyorCelery]:
    """A running in-process worker (threads pool) consuming conveyor_app's queue."""
    with running_worker(conveyor_app) as app:
        yield app


def wait_for(
    execution_id: str,
    done: Callable[[WorkflowExecution], bool] | None = None,
    timeout: float = 30.0,
) -> WorkflowExecution:
    """Poll the execution until ``done`` (default: a final status) or fail the test."""
    manager = SyncExecutionStateManager()
    finished = done or (lambda e: e.status in ("succeeded", "failed", "cancelled", "timed_out"))
    deadline = time.monotonic() + timeout
    while True:
        execution = manager.get_execution(execution_id)
        if finished(execution):
            return execution
        if time.monotonic() > deadline:
            pytest.fail(f"execution {execution_id} still {execution.status} after {timeout}s")
        time.sleep(0.05)


@pytest.fixture
def api_url(conveyor_app: ConveyorCelery) -> Iterator[str]:
    """The HTTP API (and dashboard) of conveyor_app, served by uvicorn; its base URL."""
    with serve(create_api(conveyor_app)) as url:
        yield url


@pytest.fixture
def admin(api_url: str) -> Iterator[httpx.Client]:
    """A client of the API holding an admin's token."""
    _, token = user_with_token("root@example.com", Role.ADMIN)
    with client(api_url, token) as http:
        yield http
