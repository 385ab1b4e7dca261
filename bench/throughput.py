"""Durable steps per second against plain Celery, and the SQL and CPU each durable step costs.

Two workloads, each timed from the first enqueue to the last step finishing, on an
in-process worker (threads pool, concurrency 4) and the same Redis broker:

- ``linear``: one execution of a chain of N no-op steps (latency-bound: one step at a
  time), against one plain Celery ``chain`` of N no-op tasks;
- ``dag``: M executions of a four-step diamond, enqueued with one ``enqueue_many``
  (throughput-bound), against M plain chains of four no-op tasks.

The plain Celery app has conveyor's Celery configuration (JSON, acks_late, prefetch 1,
task events, priority queues on Redis) and its own queue, so the ratio is the price of
durability: the state transitions, their events and the commit-then-publish.

Plain and durable rounds alternate (plain, durable, plain, durable, ...), each with a
fresh worker, so that each ratio compares two runs made side by side; rates and ratios
are the medians over the rounds. Only one in-process worker runs at a time: stopping a
``celery.contrib.testing`` worker stops every worker of the process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, chain
from sqlalchemy import func, select

from bench import workflows
from bench.harness import (
    WORKER_CONCURRENCY,
    Backend,
    BenchError,
    CpuMeter,
    Services,
    SqlCounter,
    TaskCounter,
    bench_settings,
    conveyor_app,
    emit,
    flush_broker,
    median,
    note,
    running_worker,
    state_engine,
)
from core.database import get_db_session
from core.models import WorkflowExecution
from core.registry import WorkflowRegistry
from worker.app import ConveyorCelery
from worker.config import celery_config
from worker.engine import RUN_STEP
from worker.producer import enqueue_many

PLAIN_QUEUE = "bench-plain"
PLAIN_TASK = "bench.noop"
WAIT_SECONDS = 600.0


@dataclass(frozen=True)
class Workload:
    """One timed workload: ``executions`` runs of a workflow of ``steps_each`` steps."""

    name: str
    executions: int
    steps_each: int

    @property
    def steps(self) -> int:
        """Steps (or plain tasks) the workload runs in all."""
        return self.executions * self.steps_each


def workloads(linear_steps: int, dag_executions: int) -> list[Workload]:
    """The linear and the DAG workload at the given sizes."""
    return [
        Workload("linear", 1, linear_steps),
        Workload("dag", dag_executions, workflows.DAG_STEPS),
    ]


WARMUP = workloads(10, 10)


@dataclass
class Tally:
    """One workload's measurements over the rounds of one configuration."""

    plain: list[float] = field(default_factory=list)
    durable: list[float] = field(default_factory=list)
    plain_cpu: dict[str, float] = field(default_factory=dict)
    durable_cpu: CpuMeter | None = None
    sql: SqlCounter = field(default_factory=SqlCounter)


# --- conveyor -------------------------------------------------------------------------


def _workflow_of(workload: Workload) -> str:
    if workload.name == "linear":
        return workflows.linear_name(workload.steps_each)
    return workflows.DAG


def _run_conveyor(app: ConveyorCelery, workload: Workload) -> tuple[float, list[str]]:
    """Enqueue the workload and wait for its last step; (seconds, execution ids)."""
    inputs = [{"i": i} for i in range(workload.executions)]
    with TaskCounter(RUN_STEP) as finished:
        started = time.perf_counter()
        ids = enqueue_many(_workflow_of(workload), inputs, app=app)
        finished.wait_for(workload.steps, WAIT_SECONDS)
        elapsed = time.perf_counter() - started
    return elapsed, ids


def _check_succeeded(ids: list[str]) -> None:
    with get_db_session() as db:
        done = db.scalar(
            select(func.count())
            .select_from(WorkflowExecution)
            .where(WorkflowExecution.execution_id.in_(ids), WorkflowExecution.status == "succeeded")
        )
    if done != len(ids):
        raise BenchError(f"{len(ids) - (done or 0)} of {len(ids)} executions did not succeed")


def conveyor_round(
    backend: Backend,
    running: Services,
    plan: list[Workload],
    tallies: dict[str, Tally],
    overrides: dict[str, Any],
    concurrency: int,
) -> None:
    """One round on ``backend``: a fresh app and worker, a warm-up, then each workload."""
    registry = workflows.registry(*(w.steps_each for w in plan + WARMUP if w.name == "linear"))
    settings = bench_settings(backend.url, running.redis_url, **overrides)
    with conveyor_app(settings, registry) as app, running_worker(app, concurrency):
        for workload in WARMUP:
            _check_succeeded(_run_conveyor(app, workload)[1])
        for workload in plan:
            tally = tallies[workload.name]
            tally.durable_cpu = tally.durable_cpu or CpuMeter(running)
            with tally.sql.counting(state_engine()), tally.durable_cpu:
                elapsed, ids = _run_conveyor(app, workload)
            _check_succeeded(ids)
            tally.durable.append(workload.steps / elapsed)


# --- plain Celery -----------------------------------------------------------------------


def plain_app(broker_url: str) -> Celery:
    """A plain Celery app with conveyor's worker settings and one no-op task."""
    settings = bench_settings("sqlite://", broker_url, default_queue=PLAIN_QUEUE)
    app = Celery("bench_plain", set_as_current=False)
    config = celery_config(settings, WorkflowRegistry())
    config["beat_schedule"] = {}
    app.conf.update(config)

    @app.task(name=PLAIN_TASK, ignore_result=True, shared=False)
    def noop() -> None:
        """Do nothing."""

    return app


def _run_plain(app: Celery, workload: Workload) -> float:
    """Send the workload's chains and wait for their last task; seconds taken."""
    task: Any = app.tasks[PLAIN_TASK]
    with TaskCounter(PLAIN_TASK) as finished:
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for _ in range(workload.executions):
                chain(*[task.si() for _ in range(workload.steps_each)]).apply_async(
                    producer=producer
                )
        finished.wait_for(workload.steps, WAIT_SECONDS)
        return time.perf_counter() - started


def plain_round(
    running: Services, plan: list[Workload], tallies: dict[str, Tally], concurrency: int
) -> None:
    """One round of plain Celery chains shaped like each workload, on a fresh worker."""
    flush_broker(running.redis_url)
    app = plain_app(running.redis_url)
    try:
        with running_worker(app, concurrency):
            for workload in WARMUP:
                _run_plain(app, workload)
            for workload in plan:
                with CpuMeter(running) as cpu:
                    elapsed = _run_plain(app, workload)
                tally = tallies[workload.name]
                tally.plain.append(workload.steps / elapsed)
                for process, seconds in cpu.used.items():
                    tally.plain_cpu[process] = tally.plain_cpu.get(process, 0.0) + seconds
    finally:
        app.close()


# --- comparison -------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, object]:
    return {"rounds": len(values), "min": f"{min(values):.1f}", "max": f"{max(values):.1f}"}


def _report(backend: Backend, workload: Workload, tally: Tally, overrides: dict[str, Any]) -> None:
    rounds = len(tally.durable)
    labels: dict[str, object] = {"workload": workload.name, **overrides}
    emit(
        "plain_celery_tasks_per_second",
        median(tally.plain),
        **labels,
        tasks=workload.steps,
        paired_with=backend.name,
        **_spread(tally.plain),
    )
    for process in ("bench", "redis"):
        emit(
            "cpu_ms_per_task",
            1000 * tally.plain_cpu[process] / (workload.steps * rounds),
            **labels,
            paired_with=backend.name,
            process=process,
        )
    durable_labels = {"backend": backend.name, **labels, "steps": workload.steps}
    emit(
        "durable_steps_per_second",
        median(tally.durable),
        **durable_labels,
        **_spread(tally.durable),
    )
    tally.sql.emit_per("step", workload.steps * rounds, **durable_labels)
    if tally.durable_cpu is not None:
        processes = ("bench", "redis", *(("postgres",) if backend.name == "postgresql" else ()))
        tally.durable_cpu.emit_per("step", workload.steps * rounds, processes, **durable_labels)
    ratios = [d / p for d, p in zip(tally.durable, tally.plain, strict=True)]
    emit("durable_over_plain_ratio", median(ratios), **durable_labels, rounds=rounds)


def compare(
    backend: Backend,
    running: Services,
    plan: list[Workload],
    rounds: int,
    concurrency: int,
    **overrides: Any,
) -> None:
    """Alternate plain and durable rounds on ``backend``; print rates, SQL, CPU and ratios.

    ``overrides`` are conveyor settings for this comparison (printed as labels).
    """
    shown = "".join(f" {k}={v}" for k, v in overrides.items())
    note(
        f"throughput: {backend.name}{shown}, {rounds} round(s) of plain then durable, "
        f"threads pool of {concurrency}"
    )
    tallies = {workload.name: Tally() for workload in plan}
    for _ in range(rounds):
        plain_round(running, plan, tallies, concurrency)
        conveyor_round(backend, running, plan, tallies, overrides, concurrency)
    labels = (
        overrides if concurrency == WORKER_CONCURRENCY else {**overrides, "threads": concurrency}
    )
    for workload in plan:
        _report(backend, workload, tallies[workload.name], labels)
