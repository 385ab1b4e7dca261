"""The three systems compared, each driven the same way from this process.

A system starts its workers (subprocesses), submits executions of a shape (a chain, a
1 -> 8 -> 1 fan-out, or a 1 -> N -> 1 map of no-op steps), waits for them, checks they
succeeded, and reads when each execution's first step started and when each finished;
``broker_depth`` counts the messages waiting in its queue's Redis lists. Producers run
here: Celery's ``apply_async``, conveyor's ``enqueue_many`` / ``enqueue``, DBOS's
``DBOSClient``. ``conveyor-bf`` is conveyor in breadth-first order
(``CONVEYOR_ORDER=breadth_first``), run in the burst only.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import redis
from celery import Celery, chain, chord, signature
from celery.canvas import Signature
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench import plain_app, workflows
from bench.harness import (
    BenchError,
    Services,
    bench_settings,
    conveyor_app,
    conveyor_database,
    create_database,
    flush_redis,
)
from bench.meter import Observer, poll_until
from bench.processes import Workers, celery_worker
from core import database as core_database
from core.config import Settings
from core.registry import WorkflowRegistry
from worker.producer import enqueue, enqueue_many


@dataclass(frozen=True)
class Shape:
    """What one execution runs: a ``chain`` of ``steps`` steps, the 1 -> 8 -> 1 fan-out,
    or a 1 -> N -> 1 ``map`` (``steps`` - 2 items: conveyor's ``@wf.map``, a chord of
    that width for Celery)."""

    name: str
    kind: Literal["chain", "fanout", "map"]
    steps: int


CHAIN10 = Shape("chain10", "chain", workflows.CHAIN_STEPS)
FANOUT = Shape("fanout", "fanout", workflows.FANOUT_WIDTH + 2)


def map_shape(items: int) -> Shape:
    """1 -> ``items`` -> 1, named ``map1k`` for 1,000 items (``map250`` for 250)."""
    name = f"map{items // 1000}k" if items % 1000 == 0 else f"map{items}"
    return Shape(name, "map", items + 2)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists of a Celery queue with priority steps 0-9 (``sep`` ``:``): the
    queue's own name holds priority 0, ``queue:1`` .. ``queue:9`` the others."""
    return [queue, *(f"{queue}:{priority}" for priority in range(1, 10))]


def waiting_messages(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue`` (every priority list), not yet taken by a worker."""
    with client.pipeline(transaction=False) as pipe:
        for name in queue_lists(queue):
            pipe.llen(name)
        return sum(int(n) for n in pipe.execute())


@dataclass
class Submission:
    """Executions submitted together: their ids and when each was handed to its producer."""

    shape: Shape
    ids: list[str] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    first_ids: list[str] = field(default_factory=list)


class System(Protocol):
    """What the scenarios need from each system."""

    name: str
    databases: tuple[str, ...]

    def supports(self, shape: Shape) -> bool:
        """Whether this system runs ``shape``."""
        ...

    def workers(self) -> Workers:
        """Its worker processes (not started)."""
        ...

    def submit(self, shape: Shape, count: int, interval: float | None = None) -> Submission:
        """Submit ``count`` executions: in one batch, or one every ``interval`` seconds."""
        ...

    def wait(self, submission: Submission, timeout: float) -> None:
        """Block until every execution of ``submission`` has finished."""
        ...

    def check(self, submission: Submission) -> None:
        """Raise BenchError unless every execution succeeded."""
        ...

    def first_starts(self, submission: Submission) -> list[float]:
        """When each execution's first step started (seconds since the epoch)."""
        ...

    def burst(self, count: int) -> Submission:
        """An empty broker, then ``count`` chain10 executions submitted at once (no worker
        running)."""
        ...

    def finish_times(self, submission: Submission) -> list[float]:
        """When each chain execution finished (seconds since the epoch), in submission order."""
        ...

    def enqueue_rate(self, count: int) -> float:
        """Executions per second its producer enqueues, with no worker running."""
        ...

    def broker_depth(self) -> int:
        """Messages waiting in its broker queue now (0 for a system without one)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def _spaced(count: int, interval: float | None, send: Callable[[int], None]) -> None:
    for index in range(count):
        if interval is not None and index:
            time.sleep(interval)
        send(index)


# --- plain Celery -------------------------------------------------------------------------


class PlainCelery:
    """Plain Celery: chains of no-op tasks, and a chord with the Redis result backend."""

    name = "celery"
    databases: tuple[str, ...] = ()

    def __init__(self, running: Services, folder: Path, concurrency: int) -> None:
        self._running = running
        self._folder = folder
        self._concurrency = concurrency
        self.app: Celery = plain_app.create_plain_app(
            running.broker_url, running.result_url, producer=True
        )
        self._results = redis.Redis.from_url(running.result_url)
        self._broker = redis.Redis.from_url(running.broker_url)

    def supports(self, shape: Shape) -> bool:
        return True

    def broker_depth(self) -> int:
        return waiting_messages(self._broker, plain_app.QUEUE)

    def workers(self) -> Workers:
        command = celery_worker(
            "bench.plain_app", self._concurrency, "bench-plain", plain_app.QUEUE
        )
        env = {"BENCH_BROKER_URL": self._running.broker_url}
        env["BENCH_RESULT_URL"] = self._running.result_url
        return Workers(self.name, [command], env, self._folder)

    def _task(self, name: str) -> Signature[Any]:
        return signature(name, app=self.app, immutable=True)

    def _canvas(self, shape: Shape, first_id: str | None) -> Signature[Any]:
        first = self._task(plain_app.STAMP if first_id else plain_app.NOOP)
        if first_id:
            first = first.set(task_id=first_id)
        if shape.kind in ("fanout", "map"):
            parts = [self._task(plain_app.NOOP_RESULT) for _ in range(shape.steps - 2)]
            return chain(first, chord(parts, self._task(plain_app.NOOP_RESULT)))
        middle = [self._task(plain_app.NOOP) for _ in range(shape.steps - 2)]
        # The last task stores when it ran: the chain's finish time, under the chain's id.
        return chain(first, *middle, self._task(plain_app.STAMP))

    def submit(self, shape: Shape, count: int, interval: float | None = None) -> Submission:
        submission = Submission(shape)
        stamped = interval is not None
        with self.app.producer_or_acquire() as producer:

            def send(index: int) -> None:
                first_id = f"bench-first-{time.time_ns()}-{index}" if stamped else None
                canvas = self._canvas(shape, first_id)
                submission.sent_at.append(time.time())
                result = canvas.apply_async(producer=producer)
                submission.ids.append(result.id)
                if first_id:
                    submission.first_ids.append(first_id)

            _spaced(count, interval, send)
        return submission

    def _meta_keys(self, ids: list[str]) -> list[str]:
        return [f"celery-task-meta-{task_id}" for task_id in ids]

    def wait(self, submission: Submission, timeout: float) -> None:
        keys = self._meta_keys(submission.ids)
        poll_until(lambda: int(self._results.exists(*keys)), len(keys), timeout, self.name)

    def _metas(self, ids: list[str]) -> list[dict[str, Any]]:
        raw = self._results.mget(self._meta_keys(ids))
        return [json.loads(value) if value else {} for value in raw]

    def check(self, submission: Submission) -> None:
        failed = [m for m in self._metas(submission.ids) if m.get("status") != "SUCCESS"]
        if failed:
            raise BenchError(f"{len(failed)} plain Celery canvases did not succeed: {failed[0]}")

    def first_starts(self, submission: Submission) -> list[float]:
        return [float(m["result"]) for m in self._metas(submission.first_ids)]

    def burst(self, count: int) -> Submission:
        flush_redis(self._running.broker_url)
        return self.submit(CHAIN10, count)

    def finish_times(self, submission: Submission) -> list[float]:
        return [float(m["result"]) for m in self._metas(submission.ids)]

    def enqueue_rate(self, count: int) -> float:
        flush_redis(self._running.broker_url)
        started = time.perf_counter()
        self.submit(CHAIN10, count)
        rate = count / (time.perf_counter() - started)
        flush_redis(self._running.broker_url)
        return rate

    def close(self) -> None:
        self._results.close()
        self._broker.close()
        self.app.close()


# --- conveyor -------------------------------------------------------------------------------

TERMINAL = ["succeeded", "failed", "cancelled", "timed_out"]
CONVEYOR_FINISHED = (
    "SELECT count(*) FROM workflow_executions WHERE execution_id = ANY(%s) AND status = ANY(%s)"
)
CONVEYOR_FIRST = (
    "SELECT execution_id, output_data FROM execution_steps"
    " WHERE execution_id = ANY(%s) AND step_name = %s"
)
CONVEYOR_FINISHES = (
    "SELECT execution_id, extract(epoch FROM finished_at)::float8 FROM workflow_executions"
    " WHERE execution_id = ANY(%s)"
)
# The most steps of one key running at once, over every key: each step's
# [started_at, finished_at] as +1 at its start and -1 at its finish, summed in time order
# per key (a finish before a start at the same instant: the slot was handed over).
CONVEYOR_MOST_PER_KEY = """
    WITH spans AS (
        SELECT e.input_data ->> 'key' AS key, s.started_at, s.finished_at
        FROM execution_steps AS s JOIN workflow_executions AS e USING (execution_id)
        WHERE s.execution_id = ANY(%s) AND s.step_name = %s
    ), edges AS (
        SELECT key, started_at AS at, 1 AS delta FROM spans
        UNION ALL
        SELECT key, finished_at, -1 FROM spans
    ), running AS (
        SELECT sum(delta) OVER (PARTITION BY key ORDER BY at, delta ROWS UNBOUNDED PRECEDING)
            AS n
        FROM edges
    )
    SELECT coalesce(max(n), 0) FROM running
"""
Order = Literal["depth_first", "breadth_first"]


class Conveyor:
    """conveyor: ``celery -A worker.app worker -P prefork -c N`` on durable PostgreSQL.

    In depth-first order (the default) it is ``conveyor``; in breadth-first order,
    ``conveyor-bf``, on a database of its own (producer and workers in that order).
    """

    def __init__(
        self,
        running: Services,
        folder: Path,
        concurrency: int,
        long_steps: int,
        order: Order = "depth_first",
    ) -> None:
        suffix = "" if order == "depth_first" else "_bf"
        self.name = "conveyor" + suffix.replace("_", "-")
        self.database = "bench_conveyor" + suffix
        self.databases: tuple[str, ...] = (self.database,)
        self._order = order
        self._running = running
        self._folder = folder
        self._concurrency = concurrency
        self._long_steps = long_steps
        self._url = conveyor_database(running, self.database)
        self._settings = bench_settings(self._url, running.broker_url, order=order)
        registry: WorkflowRegistry = workflows.registry(long_steps)
        self._app_context = conveyor_app(self._settings, registry)
        self.app = self._app_context.__enter__()
        self._observer = Observer(running, self.database)
        self._broker = redis.Redis.from_url(running.broker_url)

    @property
    def url(self) -> str:
        """Its database's URL."""
        return self._url

    @property
    def settings(self) -> Settings:
        """Its settings (production defaults on the bench's servers)."""
        return self._settings

    def supports(self, shape: Shape) -> bool:
        return True

    def broker_depth(self) -> int:
        return waiting_messages(self._broker, self._settings.default_queue)

    def workers(self) -> Workers:
        command = celery_worker("worker.app", self._concurrency, f"bench-{self.name}")
        env = {
            "CONVEYOR_DATABASE_URL": self._url,
            "CONVEYOR_BROKER_URL": self._running.broker_url,
            "CONVEYOR_ORDER": self._order,
            "CONVEYOR_WORKFLOW_MODULES": "bench.workflows",
            "BENCH_LONG_STEPS": str(self._long_steps),
        }
        return Workers(self.name, [command], env, self._folder)

    @staticmethod
    def _workflow(shape: Shape) -> str:
        if shape.kind == "map":
            return workflows.MAP
        return workflows.FANOUT if shape.kind == "fanout" else workflows.linear_name(shape.steps)

    @staticmethod
    def _input(shape: Shape, index: int) -> dict[str, int]:
        if shape.kind == "map":
            return {"i": index, "n": shape.steps - 2}
        return {"i": index}

    def _produce_here(self) -> None:
        """Point ``core.database`` (which the producer's state manager follows) at this
        system's database: ``conveyor`` and ``conveyor-bf`` share this process."""
        if core_database.get_database().settings is not self._settings:
            core_database.configure(self._settings)

    def submit(self, shape: Shape, count: int, interval: float | None = None) -> Submission:
        self._produce_here()
        submission = Submission(shape)
        name = self._workflow(shape)
        if interval is None:
            submission.sent_at = [time.time()] * count
            inputs = [self._input(shape, i) for i in range(count)]
            submission.ids = enqueue_many(name, inputs, app=self.app)
            return submission

        def send(index: int) -> None:
            submission.sent_at.append(time.time())
            submission.ids.append(enqueue(name, self._input(shape, index), app=self.app))

        _spaced(count, interval, send)
        return submission

    def submit_inputs(self, shape: Shape, workflow: str, inputs: list[Any]) -> Submission:
        """Executions of ``workflow``, one per input, in one ``enqueue_many``."""
        self._produce_here()
        submission = Submission(shape)
        submission.sent_at = [time.time()] * len(inputs)
        submission.ids = enqueue_many(workflow, inputs, app=self.app)
        return submission

    def most_running_per_key(self, submission: Submission, step: str) -> int:
        """The most ``step`` steps of ``submission`` running at once under one input
        ``key``, from their started and finished times."""
        return int(self._observer.scalar(CONVEYOR_MOST_PER_KEY, (submission.ids, step)))

    def _count(self, ids: list[str], statuses: list[str]) -> int:
        return int(self._observer.scalar(CONVEYOR_FINISHED, (ids, statuses)))

    def wait(self, submission: Submission, timeout: float) -> None:
        ids = submission.ids
        poll_until(lambda: self._count(ids, TERMINAL), len(ids), timeout, self.name)

    def check(self, submission: Submission) -> None:
        succeeded = self._count(submission.ids, ["succeeded"])
        if succeeded != len(submission.ids):
            raise BenchError(f"{len(submission.ids) - succeeded} conveyor executions failed")

    def first_starts(self, submission: Submission) -> list[float]:
        first = "root" if submission.shape.kind == "fanout" else "s0000"
        rows = self._observer.rows(CONVEYOR_FIRST, (submission.ids, first))
        started = {str(execution_id): float(output) for execution_id, output in rows}
        return [started[execution_id] for execution_id in submission.ids]

    def burst(self, count: int) -> Submission:
        flush_redis(self._running.broker_url)
        return self.submit(CHAIN10, count)

    def finish_times(self, submission: Submission) -> list[float]:
        rows = self._observer.rows(CONVEYOR_FINISHES, (submission.ids,))
        finished = {str(execution_id): float(at) for execution_id, at in rows}
        return [finished[execution_id] for execution_id in submission.ids]

    def enqueue_rate(self, count: int) -> float:
        flush_redis(self._running.broker_url)
        started = time.perf_counter()
        submission = self.submit(CHAIN10, count)
        rate = count / (time.perf_counter() - started)
        flush_redis(self._running.broker_url)
        admin = create_engine(self._url, poolclass=NullPool)
        try:
            with admin.begin() as connection:
                connection.execute(
                    text("DELETE FROM workflow_executions WHERE execution_id = ANY(:ids)"),
                    {"ids": submission.ids},
                )
        finally:
            admin.dispose()
        return rate

    def close(self) -> None:
        self._observer.close()
        self._broker.close()
        self._app_context.__exit__(None, None, None)


# --- DBOS ---------------------------------------------------------------------------------

DBOS_FINISHED = (
    "SELECT count(*) FROM dbos.workflow_status WHERE workflow_uuid = ANY(%s) AND status = ANY(%s)"
)
DBOS_TERMINAL = ["SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED"]
DBOS_PROCESSES = 2


class Dbos:
    """DBOS queued workflows: ``DBOS_PROCESSES`` processes, one workflow at a time each."""

    name = "dbos"
    database = "bench_dbos"
    databases: tuple[str, ...] = (database,)

    def __init__(self, running: Services, folder: Path) -> None:
        from dbos import DBOSClient

        from bench import dbos_app

        self._app = dbos_app
        self._running = running
        self._folder = folder
        create_database(running, self.database)
        self._dsn = running.dsn(self.database)
        self._client_type = DBOSClient
        self._client: Any = None
        self._observer: Observer | None = None

    def supports(self, shape: Shape) -> bool:
        return shape.kind == "chain"

    def broker_depth(self) -> int:
        return 0  # DBOS queues are rows in its database

    def workers(self) -> Workers:
        base = ["-m", "bench.dbos_app", self._dsn]
        commands = [
            [sys.executable, *base, f"bench-dbos-{index}"] for index in range(DBOS_PROCESSES)
        ]
        return Workers(self.name, commands, {}, self._folder, ready_marker=self._app.READY)

    def _connect(self) -> Any:
        # The system database is migrated by the first worker's launch.
        if self._client is None:
            self._client = self._client_type(system_database_url=self._dsn)
            self._observer = Observer(self._running, self.database)
        return self._client

    def submit(self, shape: Shape, count: int, interval: float | None = None) -> Submission:
        return self._submit(shape, count, interval, self._app.QUEUE)

    def _submit(self, shape: Shape, count: int, interval: float | None, queue: str) -> Submission:
        client = self._connect()
        submission = Submission(shape)
        options = {"workflow_name": self._app.WORKFLOW, "queue_name": queue}

        def send(index: int) -> None:
            submission.sent_at.append(time.time())
            handle = client.enqueue(options, shape.steps)
            submission.ids.append(handle.get_workflow_id())

        _spaced(count, interval, send)
        return submission

    def _count(self, ids: list[str], statuses: list[str]) -> int:
        assert self._observer is not None
        return int(self._observer.scalar(DBOS_FINISHED, (ids, statuses)))

    def wait(self, submission: Submission, timeout: float) -> None:
        ids = submission.ids
        poll_until(lambda: self._count(ids, DBOS_TERMINAL), len(ids), timeout, self.name)

    def check(self, submission: Submission) -> None:
        succeeded = self._count(submission.ids, ["SUCCESS"])
        if succeeded != len(submission.ids):
            raise BenchError(f"{len(submission.ids) - succeeded} DBOS workflows failed")

    def first_starts(self, submission: Submission) -> list[float]:
        client = self._connect()
        return [float(client.retrieve_workflow(i).get_result()) for i in submission.ids]

    def burst(self, count: int) -> Submission:
        raise BenchError("DBOS does not run the burst")

    def finish_times(self, submission: Submission) -> list[float]:
        raise BenchError("DBOS does not run the burst")

    def enqueue_rate(self, count: int) -> float:
        started = time.perf_counter()
        self._submit(CHAIN10, count, None, self._app.IDLE_QUEUE)
        rate = count / (time.perf_counter() - started)
        admin = create_engine(self._running.admin_url(self.database), poolclass=NullPool)
        try:
            with admin.begin() as connection:
                connection.execute(
                    text("DELETE FROM dbos.workflow_status WHERE queue_name = :queue"),
                    {"queue": self._app.IDLE_QUEUE},
                )
        finally:
            admin.dispose()
        return rate

    def close(self) -> None:
        if self._observer is not None:
            self._observer.close()
        if self._client is not None:
            self._client.destroy()
