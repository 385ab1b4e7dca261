"""Enqueue throughput: one ``enqueue_many`` batch against a loop of ``enqueue`` calls.

No worker runs: what is timed is validation, the INSERTs and their commit, and the
publishing of each start message to Redis (commit, then publish). The workflow is the
four-step diamond, so each execution also inserts four step rows and one event.
"""

from __future__ import annotations

import time

from bench import workflows
from bench.harness import (
    Backend,
    SqlCounter,
    bench_settings,
    conveyor_app,
    emit,
    flush_broker,
    median,
    note,
    state_engine,
)
from worker.app import ConveyorCelery
from worker.producer import enqueue, enqueue_many


def _batch(app: ConveyorCelery, count: int) -> float:
    inputs = [{"i": i} for i in range(count)]
    started = time.perf_counter()
    enqueue_many(workflows.DAG, inputs, app=app)
    return time.perf_counter() - started


def _loop(app: ConveyorCelery, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        enqueue(workflows.DAG, {"i": i}, app=app)
    return time.perf_counter() - started


def enqueue_throughput(
    backend: Backend, broker_url: str, batch: int, calls: int, repeats: int
) -> None:
    """Executions per second of ``enqueue_many(batch)`` and of ``calls`` ``enqueue`` calls
    (median of ``repeats`` each), with the SQL each execution cost."""
    note(f"enqueue: {backend.name}, enqueue_many of {batch} vs {calls} enqueue calls")
    settings = bench_settings(backend.url, broker_url)
    with conveyor_app(settings, workflows.registry()) as app:
        _batch(app, 50)  # warm-up: connections, compiled statements, the broker's pool
        _loop(app, 20)
        for mode, count, run in (("enqueue_many", batch, _batch), ("enqueue", calls, _loop)):
            flush_broker(broker_url)
            with SqlCounter().counting(state_engine()) as sql:
                rates = [count / run(app, count)]
            for _ in range(repeats - 1):
                flush_broker(broker_url)
                rates.append(count / run(app, count))
            labels = {"backend": backend.name, "mode": mode, "executions": count}
            emit("enqueue_executions_per_second", median(rates), **labels)
            sql.emit_per("execution", count, **labels)
        flush_broker(broker_url)
