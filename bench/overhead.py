"""Where a durable step's client-side CPU goes: single-threaded costs of its parts.

- building each statement a step sends (``core.statements``), before any execution;
- ``Workflow.sinks``, which the engine computes on every completion;
- one one-statement transaction through the state manager (session, retry wrapper,
  pool checkout and ping, BEGIN, statement, COMMIT) against the same through raw psycopg;
- a ``redis.Redis`` client, which kombu's Redis transport builds for every publish.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import psycopg
import redis
from sqlalchemy import make_url

from bench import workflows
from bench.harness import Services, bench_settings, conveyor_app, conveyor_database, emit, note
from core import statements as sql
from core import steps as step_units
from core.states import StepStatus
from core.step_statements import hot_path
from worker.producer import enqueue


def _cost_us(run: Callable[[], object], calls: int) -> float:
    """Mean CPU microseconds of ``run()`` (this thread), after a warm-up."""
    for _ in range(min(100, calls)):
        run()
    started = time.thread_time()
    for _ in range(calls):
        run()
    return 1e6 * (time.thread_time() - started) / calls


def statement_costs(calls: int) -> None:
    """CPU to build the statements that are still built per call (retries, failures and
    the reconciler's); the claim and completion are built once
    (``core.step_statements.hot_path``)."""
    running = frozenset({StepStatus.RUNNING})
    builders: dict[str, Callable[[], object]] = {
        "select_execution": lambda: sql.select_execution("e"),
        "transition_steps": lambda: sql.transition_steps(
            "e", ["s"], StepStatus.FAILED, running, attempt=1, values={"error": {}}
        ),
        "hot_path_lookup": lambda: hot_path("postgresql"),
    }
    for name, build in builders.items():
        emit("statement_build_us", _cost_us(build, calls), statement=name)


def sinks_costs(calls: int) -> None:
    """CPU of ``Workflow.sinks`` (and ``downstream``) for linear workflows of a few sizes."""
    for steps in (10, 200, 1000):
        workflow = workflows.linear(steps)
        emit(
            "workflow_sinks_us",
            _cost_us(partial(getattr, workflow, "sinks"), max(5, calls // steps)),
            steps=steps,
        )
        emit(
            "workflow_downstream_us",
            _cost_us(partial(workflow.downstream, "s0000"), calls),
            steps=steps,
        )


def transaction_costs(url: str, broker_url: str, calls: int) -> None:
    """CPU of a one-SELECT transaction: through the state manager, and through psycopg."""
    settings = bench_settings(url, broker_url)
    with conveyor_app(settings, workflows.registry()) as app:
        execution_id = enqueue(workflows.DAG, {"i": 0}, app=app)
        manager = app.engine.manager
        emit(
            "transaction_us",
            _cost_us(lambda: manager.run(step_units.step_status, execution_id, "a"), calls),
            backend="postgresql",
            via="state_manager",
        )
        dsn = make_url(url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(dsn) as connection:

            def raw() -> None:
                connection.execute("SELECT 1")  # what pool_pre_ping sends
                with connection.transaction():
                    connection.execute(
                        "SELECT status, attempt FROM execution_steps"
                        " WHERE execution_id = %s AND step_name = %s",
                        (execution_id, "a"),
                    ).fetchone()

            emit("transaction_us", _cost_us(raw, calls), backend="postgresql", via="psycopg")


def redis_client_cost(broker_url: str, calls: int) -> None:
    """CPU to build a ``redis.Redis`` on a shared pool (kombu's ``Channel._create_client``)."""
    pool = redis.ConnectionPool.from_url(broker_url)
    try:
        emit("redis_client_build_us", _cost_us(partial(redis.Redis, connection_pool=pool), calls))
    finally:
        pool.disconnect()


def overhead(running: Services, calls: int) -> None:
    """Every single-threaded cost above (the transaction on durable PostgreSQL)."""
    note("overhead: single-threaded CPU of a step's parts")
    statement_costs(calls)
    sinks_costs(calls)
    transaction_costs(conveyor_database(running, "bench_overhead"), running.broker_url, calls)
    redis_client_cost(running.broker_url, calls)
