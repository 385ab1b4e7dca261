"""Waits are rows: what a sleeping or waiting execution costs, and how fast an event
moves one on (PostgreSQL; ``--extras waits``).

- *asleep*: ``--wait-sleepers`` (default 100,000) running executions whose ``nap``
  sleeps for 30 days, bulk-loaded as rows (``INSERT ... SELECT generate_series``; the
  waker reads the same rows ``wf.sleep`` writes). An empty waker pass (``wake_due``,
  and ``Engine.wake()``, the ``conveyor.wake`` task's body) is timed, median of
  ``PASSES``, with the statements it sends and the due scan's plan; the broker's
  messages are counted after those passes: a sleeping execution is no message.
- *due at once*: ``--wait-due`` (default 10,000) of them made due together; the time
  ``Engine.wake()`` calls (batches of ``CONVEYOR_WAKE_BATCH``) take to wake all. No
  worker runs: each woken nap queues its ``after`` step, published to the broker.
- *event latency*: with 2 worker processes running, ``--wait-events`` (default 30)
  executions of ``go`` (an event wait) -> ``started``, all waiting; then, in turn,
  ``INTERVAL`` s apart, one chain10 enqueued and one ``send_event``: send -> ``started``
  began, against conveyor's own enqueue -> first step began (same workers, same
  moments; the statements each producer call sends are counted), and DBOS's
  ``DBOSClient.send`` -> ``DBOS.recv`` returned in a waiting workflow (on the same
  PostgreSQL; when DBOS is installed).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import text

from bench import workflows
from bench.harness import (
    BenchError,
    Services,
    SqlCounter,
    bench_settings,
    conveyor_app,
    conveyor_database,
    create_database,
    emit,
    flush_redis,
    median,
    note,
    number,
    percentile,
    state_engine,
)
from bench.meter import Observer, poll_until
from bench.processes import Workers, celery_worker
from core import waker
from core.outcomes import WaitOutcome
from core.wait_statements import wait_statements
from worker.app import ConveyorCelery
from worker.producer import enqueue, enqueue_many, send_event

DATABASE = "bench_waits"
PASSES = 20
INTERVAL = 0.1
CONCURRENCY = 2
TIMEOUT = 600.0

# Running executions of bench_sleeper: ``nap`` waiting (a sleep of 30 days, armed),
# ``after`` pending behind it; parked (no slot held), as the waits' settle leaves them.
SEED_SLEEPERS = text(
    """
    WITH executions AS (
        INSERT INTO workflow_executions (
            execution_id, workflow_id, workflow_version, input_data, status,
            previous_status, attempt, priority, idempotency_scope, starts_resent, depth,
            started_at, parked_at, created_at, updated_at)
        SELECT
            gen_random_uuid()::text, :workflow, 1, jsonb_build_object('i', g), 'running',
            'pending', 1, 0, '', 0, 0, now(), now(), now(), now()
        FROM generate_series(1, CAST(:count AS integer)) AS g
        RETURNING execution_id
    )
    INSERT INTO execution_steps (
        execution_id, step_name, status, previous_status, attempt, max_attempts,
        recoveries, attempt_base, unmet_deps, republishes, wait_kind, waiting_since,
        wake_at, created_at, updated_at)
    SELECT
        e.execution_id, s.name,
        CASE WHEN s.nap THEN 'waiting' ELSE 'pending' END,
        CASE WHEN s.nap THEN 'pending' END,
        1, 1, 0, 0,
        CASE WHEN s.nap THEN 0 ELSE 1 END,
        0,
        CASE WHEN s.nap THEN 'sleep' END,
        CASE WHEN s.nap THEN now() END,
        CASE WHEN s.nap THEN now() + interval '30 days' END,
        now(), now()
    FROM executions AS e
    CROSS JOIN (VALUES ('nap', true), ('after', false)) AS s(name, nap)
    """
)

# ``count`` of the sleepers fall due now (as if their 30 days had passed).
FALL_DUE = text(
    """
    UPDATE execution_steps SET wake_at = now() - interval '1 second'
    WHERE (execution_id, step_name) IN (
        SELECT execution_id, step_name FROM execution_steps
        WHERE step_name = 'nap' AND status = 'waiting' AND wake_at IS NOT NULL
        LIMIT CAST(:count AS integer))
    """
)

CONVEYOR_OUTPUTS = (
    "SELECT execution_id, output_data FROM execution_steps"
    " WHERE execution_id = ANY(%s) AND step_name = %s AND status = 'succeeded'"
)
CONVEYOR_SUCCEEDED = (
    "SELECT count(*) FROM workflow_executions WHERE execution_id = ANY(%s) AND status = 'succeeded'"
)
CONVEYOR_ARMED = (
    "SELECT count(*) FROM execution_steps WHERE execution_id = ANY(%s) AND step_name = 'go'"
    " AND status = 'waiting' AND wait_event IS NOT NULL"
)
DBOS_READY = (
    "SELECT count(*) FROM dbos.operation_outputs"
    " WHERE workflow_uuid = ANY(%s) AND function_name LIKE %s"
)
DBOS_DONE = (
    "SELECT count(*) FROM dbos.workflow_status WHERE workflow_uuid = ANY(%s) AND status = %s"
)


def broker_messages(url: str) -> int:
    """Messages waiting in every queue of the broker (kombu's priority lists included)."""
    client = redis.Redis.from_url(url)
    try:
        return sum(
            int(client.llen(key))
            for key in client.scan_iter(count=1000)
            if client.type(key) == b"list"
        )
    finally:
        client.close()


def _timed_ms(run: Callable[[], object], passes: int) -> float:
    """The median wall time of ``run()`` in milliseconds, after one warm-up call."""
    run()
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - started))
    return median(times)


def _due_plan(batch: int) -> str:
    """The due scan's plan (indexes named), with its time, over the sleeping table."""
    statement = wait_statements().due.params(limit=batch)
    with state_engine().connect() as conn:
        compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
        query = str(compiled).replace("%%", "%")
        lines = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT TEXT) {query}").scalars().all()
        conn.rollback()
    found = [line.strip() for line in lines]
    nodes = [line for line in found if "Scan" in line or "Execution Time" in line]
    return "; ".join(nodes)


def asleep(app: ConveyorCelery, running: Services, sleepers: int) -> None:
    """Sleepers as rows: an empty waker pass, its statements, and no broker message."""
    with state_engine().begin() as conn:
        conn.execute(SEED_SLEEPERS, {"workflow": workflows.SLEEPER, "count": sleepers})
    with state_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE execution_steps")
        conn.exec_driver_sql("VACUUM ANALYZE workflow_executions")
    flush_redis(running.broker_url)
    engine = app.engine
    batch = engine.settings.wake_batch
    note(f"waits: {sleepers} executions asleep (30 days), bulk-loaded; no worker running")

    def unit() -> WaitOutcome:
        return engine.manager.run(waker.wake_due, batch, engine.definition)

    emit("empty_wake_pass_ms", _timed_ms(unit, PASSES), sleeping=sleepers, via="wake_due")
    emit("empty_wake_pass_ms", _timed_ms(engine.wake, PASSES), sleeping=sleepers, via="Engine.wake")
    counter = SqlCounter()
    with counter.counting(state_engine()):
        outcome = unit()
    if outcome.taken:
        raise BenchError(f"the empty waker pass took {outcome.taken} waits")
    writes = sum(n for kind, n in counter.kinds.items() if kind in ("insert", "update", "delete"))
    emit("empty_wake_pass_statements", counter.statements, sleeping=sleepers)
    emit("empty_wake_pass_writes", writes, sleeping=sleepers)
    emit(
        "broker_messages_while_asleep",
        broker_messages(running.broker_url),
        sleeping=sleepers,
        after_passes=2 * (PASSES + 1) + 1,
    )
    note(f"waits: due scan plan: {_due_plan(batch)}")


def due_at_once(app: ConveyorCelery, running: Services, due: int) -> None:
    """``due`` sleepers due together: the waker's time to wake them all (no worker)."""
    with state_engine().begin() as conn:
        made = conn.execute(FALL_DUE, {"count": due}).rowcount
    flush_redis(running.broker_url)
    engine = app.engine
    batch = engine.settings.wake_batch
    started = time.perf_counter()
    calls = 0
    woken = 0
    while woken < made:
        woken += engine.wake()
        calls += 1
        if time.perf_counter() - started > TIMEOUT:
            raise TimeoutError(f"waker: {woken} of {made} woken after {TIMEOUT:.0f}s")
    seconds = time.perf_counter() - started
    labels = {"due": made, "batch": batch, "worker": "none"}
    emit("wake_all_due_s", seconds, **labels)
    emit("waits_woken_per_s", made / seconds, **labels)
    emit("wake_calls", calls, **labels)
    emit("steps_published", broker_messages(running.broker_url), **labels)
    flush_redis(running.broker_url)


def _conveyor_workers(running: Services, url: str, folder: Path) -> Workers:
    command = celery_worker("worker.app", CONCURRENCY, "bench-waits")
    env = {
        "CONVEYOR_DATABASE_URL": url,
        "CONVEYOR_BROKER_URL": running.broker_url,
        "CONVEYOR_WORKFLOW_MODULES": "bench.workflows",
        "BENCH_LONG_STEPS": str(workflows.CHAIN_STEPS),
    }
    return Workers("conveyor-waits", [command], env, folder)


def _succeeded(observer: Observer, ids: list[str]) -> int:
    return int(observer.scalar(CONVEYOR_SUCCEEDED, (ids,)))


def _outputs(observer: Observer, ids: list[str], step: str) -> dict[str, float]:
    rows = observer.rows(CONVEYOR_OUTPUTS, (ids, step))
    return {str(execution_id): float(output) for execution_id, output in rows}


def _spaced(count: int, send: Callable[[int], object]) -> list[float]:
    """Call ``send(i)`` ``count`` times, ``INTERVAL`` s apart; when each call began."""
    sent = []
    for index in range(count):
        if index:
            time.sleep(INTERVAL)
        sent.append(time.time())
        send(index)
    return sent


def conveyor_latencies(
    app: ConveyorCelery, running: Services, url: str, folder: Path, events: int
) -> dict[str, list[float]]:
    """send_event -> dependent step started, and enqueue -> first step started (ms),
    sampled in turn (one enqueue, one event, ...) so that both meet the same moment;
    and the statements each producer call sends."""
    observer = Observer(running, DATABASE)
    chain = workflows.linear_name(workflows.CHAIN_STEPS)
    enqueues, sends = SqlCounter(), SqlCounter()
    try:
        with _conveyor_workers(running, url, folder) as workers:
            warm = enqueue_many(chain, [{"i": i} for i in range(4)], app=app)
            poll_until(lambda: _succeeded(observer, warm), 4, TIMEOUT, "warm-up")
            # Every execution waiting for its event before the first is sent.
            keys = [f"bench-{time.time_ns()}-{i}" for i in range(events)]
            waiting = enqueue_many(workflows.WAITER, [{"key": k} for k in keys], app=app)
            poll_until(
                lambda: int(observer.scalar(CONVEYOR_ARMED, (waiting,))),
                events,
                TIMEOUT,
                "waits armed",
            )
            chains: list[str] = []
            enqueued_at: list[float] = []
            sent_at: list[float] = []
            for index in range(2 * events):
                if index:
                    time.sleep(INTERVAL)
                turn = index // 2
                if index % 2 == 0:
                    enqueued_at.append(time.time())
                    with enqueues.counting(state_engine()):
                        chains.append(enqueue(chain, {"i": turn}, app=app))
                else:
                    sent_at.append(time.time())
                    with sends.counting(state_engine()):
                        send_event(workflows.GO, key=keys[turn], payload={"i": turn}, app=app)
            poll_until(lambda: _succeeded(observer, chains), events, TIMEOUT, "chains")
            poll_until(lambda: _succeeded(observer, waiting), events, TIMEOUT, "events")
            workers.check_alive()
        firsts = _outputs(observer, chains, "s0000")
        started = _outputs(observer, waiting, "started")
    finally:
        observer.close()
    emit("producer_statements", enqueues.statements / events, call="enqueue")
    emit("producer_statements", sends.statements / events, call="send_event")
    return {
        "event": [1000 * (started[e] - at) for e, at in zip(waiting, sent_at, strict=True)],
        "enqueue": [1000 * (firsts[e] - at) for e, at in zip(chains, enqueued_at, strict=True)],
    }


def dbos_latencies(running: Services, folder: Path, events: int) -> list[float] | None:
    """DBOSClient.send -> DBOS.recv returned in a waiting workflow (ms); None without
    DBOS installed."""
    try:
        from dbos import DBOSClient
    except ImportError:
        note("waits: dbos not installed (pip install '.[bench]'); its figure is left out")
        return None
    from bench import dbos_app

    database = "bench_dbos_waits"
    create_database(running, database)
    dsn = running.dsn(database)
    command = [sys.executable, "-m", "bench.dbos_app", dsn, "bench-dbos-waits", "receive"]
    workers = Workers("dbos-waits", [command], {}, folder, ready_marker=dbos_app.READY)
    with workers:
        client: Any = DBOSClient(system_database_url=dsn)
        observer = Observer(running, database)
        try:
            options = {
                "workflow_name": dbos_app.RECEIVE_WORKFLOW,
                "queue_name": dbos_app.RECEIVE_QUEUE,
            }
            ids = [client.enqueue(options).get_workflow_id() for _ in range(events)]
            # Each has run its ready step: it is in recv (or a moment from it; a message
            # sent before recv is kept and returned at once).
            poll_until(
                lambda: int(observer.scalar(DBOS_READY, (ids, "%ready%"))),
                events,
                TIMEOUT,
                "dbos ready",
            )

            def send(index: int) -> None:
                client.send(ids[index], {"i": index}, dbos_app.RECEIVE_TOPIC)

            sent = _spaced(events, send)
            poll_until(
                lambda: int(observer.scalar(DBOS_DONE, (ids, "SUCCESS"))),
                events,
                TIMEOUT,
                "dbos recv",
            )
            received = [float(client.retrieve_workflow(i).get_result()) for i in ids]
        finally:
            observer.close()
            client.destroy()
    return [1000 * (at - s) for at, s in zip(received, sent, strict=True)]


def waits_extra(running: Services, sleepers: int, due: int, events: int) -> None:
    """Every figure above, on a database of its own."""
    url = conveyor_database(running, DATABASE)
    settings = bench_settings(url, running.broker_url)
    with (
        conveyor_app(settings, workflows.registry()) as app,
        tempfile.TemporaryDirectory(prefix="conveyor-bench-waits-") as tmp,
    ):
        asleep(app, running, sleepers)
        due_at_once(app, running, min(due, sleepers))
        note(
            f"waits: {events} events to executions all waiting, in turn with {events} "
            f"chain10 enqueues, {INTERVAL}s apart; {CONCURRENCY} worker processes"
        )
        found = conveyor_latencies(app, running, url, Path(tmp), events)
        dbos = dbos_latencies(running, Path(tmp), events)
    event_p50 = percentile(found["event"], 0.5)
    enqueue_p50 = percentile(found["enqueue"], 0.5)
    emit("event_to_start_p50_ms", event_p50, system="conveyor")
    emit("event_to_start_p95_ms", percentile(found["event"], 0.95), system="conveyor")
    emit("enqueue_to_start_p50_ms", enqueue_p50, system="conveyor")
    cells = [f"conveyor {number(event_p50)}", f"conveyor-enqueue {number(enqueue_p50)}"]
    ratios = [f"{number(event_p50 / enqueue_p50)}x conveyor-enqueue"]
    if dbos is not None:
        dbos_p50 = percentile(dbos, 0.5)
        emit("send_to_recv_p50_ms", dbos_p50, system="dbos")
        emit("send_to_recv_p95_ms", percentile(dbos, 0.95), system="dbos")
        cells.append(f"dbos {number(dbos_p50)}")
        ratios.append(f"{number(event_p50 / dbos_p50)}x dbos")
    print(
        f"{'waits':<10} {'event->start p50 ms':<22} "
        + "  ".join(cells)
        + f"  ({', '.join(ratios)})",
        flush=True,
    )
