"""PostgreSQL restarted twice mid-run; down for 15 s; a backend SIGKILLed, the server in
crash recovery (the postmaster kept) for 10 s; every server process SIGSTOPped for 10 s
(a hung server, or a network partition). Each outage is longer than the stall timeout.

Workers live through all of them: no step's code may run twice, since no worker died.

The restarts' mix holds waits too (``Cluster.enqueue_mix``), armed early: child
workflows, sleeps of 1-4 s (some span a restart) and event waits; the events of the
approvals enqueued last are sent at once (before their waits exist), those of the
early ones after the restarts. Each wait ends once; no wake, child or event is lost.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import pytest
from sqlalchemy import func, select, text

from core.database import get_database
from tests.faults.checker import (
    Figures,
    check,
    running_workers,
    seconds_to_progress,
    succeeded_steps,
    wait_mid_run,
    wait_until_final,
)
from tests.faults.cluster import SETTINGS
from tests.faults.conftest import StartCluster
from tests.faults.inject import hang_server, kill_a_backend_held_in_recovery, resume_server
from tests.faults.senders import send_events
from tests.servers import PostgresServer

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(240)]

CHAINS = 12
FANS = 4
STEPS = 10 * (CHAINS + FANS)
SLEEPIES = 6
SLEEP_SECONDS = (1.0, 4.0)
PARENTS = 4  # a -> child (a three-step chain) -> b
APPROVALS = 8
OUTAGE = 15.0
HOLD = 10.0  # the backend kill's and the hang's outage
POOL = 4  # pool processes: 2 workers of 2
FINISH_TIMEOUT = 150.0


def _server(postgres_server: PostgresServer | None) -> PostgresServer:
    if postgres_server is None:
        pytest.fail("this test stops the server: run it on the harness's own PostgreSQL")
    return postgres_server


def forget_connections() -> None:
    """Drop this test process's pooled connections, dead since the server went down:
    the test's own reads are not under test (the workers' are)."""
    get_database().engine.dispose()


def wait_held(ids: Sequence[str], timeout: float = 30.0) -> int:
    """Poll until every pool process (2 workers x 2) runs a step; how many run."""
    deadline = time.monotonic() + timeout
    while len(running := running_workers(ids)) < POOL:
        assert time.monotonic() < deadline, f"{len(running)} of {POOL} steps held"
        time.sleep(0.05)
    return len(running)


def test_postgres_restarted_twice_mid_run(
    start_cluster: StartCluster, postgres_server: PostgresServer | None
) -> None:
    server = _server(postgres_server)
    cluster = start_cluster()
    mix = cluster.enqueue_mix(
        CHAINS,
        FANS,
        sleepies=SLEEPIES,
        approvals=APPROVALS,
        parents=PARENTS,
        sleep_seconds=SLEEP_SECONDS,
        rng=random.Random(),
    )
    ids = mix.ids
    sent = send_events(cluster.app, mix.late)  # behind the chains: before their waits
    recoveries = []
    for fraction in (0.25, 0.6):
        wait_mid_run(ids, mix.steps, fraction)
        cluster.gate.touch()  # every pool process holds a step across the restart
        wait_held(ids)
        done = succeeded_steps(ids)
        started = time.monotonic()
        server.restart()  # fast: every connection of every process dropped
        forget_connections()
        cluster.gate.unlink()
        recoveries.append(round(seconds_to_progress(ids, done, started), 1))
    send_events(cluster.app, mix.early, sent)  # armed long ago: to waiting waits
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "restarts": len(recoveries),
            "seconds to progress after each": recoveries,
            **sent.figures(),
        },
    )
    try:
        check(ids, cluster.run_log, figures=figures)
    finally:
        print(f"\nPostgreSQL restarted twice: {figures.line()}")


def test_outage_longer_than_the_stall_timeout_reruns_nothing(
    start_cluster: StartCluster, postgres_server: PostgresServer | None
) -> None:
    server = _server(postgres_server)
    assert float(SETTINGS["CONVEYOR_STALL_TIMEOUT"]) < OUTAGE
    cluster = start_cluster()
    ids = cluster.enqueue_workload(CHAINS, FANS)
    wait_mid_run(ids, STEPS, 0.3)
    # Every pool process holds a step across the outage: its code runs through the first
    # half, and its outcome waits to be recorded through the second.
    cluster.gate.touch()
    held = wait_held(ids)
    done = succeeded_steps(ids)
    server.halt()
    time.sleep(OUTAGE / 2)  # the outage itself: the database stays down this long
    cluster.gate.unlink()
    time.sleep(OUTAGE / 2)
    started = time.monotonic()
    server.start()
    forget_connections()
    # A reconciler pass the moment the database is back, as a beat tick may land then
    # (passes may overlap): every heartbeat is older than the stall timeout by now,
    # yet every worker lived, and none of their steps may be taken from them.
    first_pass = cluster.app.engine.reconcile()
    taken = first_pass.requeued + first_pass.stalled_failed
    recovered = seconds_to_progress(ids, done, started)
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "outage seconds": OUTAGE,
            "stall timeout": float(SETTINGS["CONVEYOR_STALL_TIMEOUT"]),
            "steps held across it": held,
            "steps the first pass took as stalled": len(taken),
            "seconds to progress after it": round(recovered, 1),
        },
    )
    try:
        check(ids, cluster.run_log, figures=figures)
    finally:
        print(f"\nPostgreSQL down {OUTAGE:.0f}s: {figures.line()}")
    assert not taken, figures.line()


def _postmaster_started() -> object:
    with get_database().engine.connect() as connection:
        return connection.execute(select(func.pg_postmaster_start_time())).scalar_one()


def durable_commits() -> None:
    """Commits of this test's database survive a crash, as in production: the suite's
    server runs with ``synchronous_commit=off`` for speed, and a crash would then lose
    the last acknowledged transactions (a lost write, not the fault under test)."""
    engine = get_database().engine
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        name = connection.execute(select(func.current_database())).scalar_one()
        quoted = connection.dialect.identifier_preparer.quote(name)
        connection.execute(text(f"ALTER DATABASE {quoted} SET synchronous_commit = on"))
    engine.dispose()  # sessions take the setting when they start


def _first_pass_takes_nothing(
    start_cluster: StartCluster, name: str, fault: Callable[[], object]
) -> None:
    """Every pool process holds a step across ``fault`` (an outage of about HOLD seconds
    that leaves the postmaster as it was); then a reconciler pass the moment the server
    answers again, as a beat tick may land then. Every heartbeat is older than the stall
    timeout by then, yet every worker lived: no step may be taken, none may run twice."""
    assert float(SETTINGS["CONVEYOR_STALL_TIMEOUT"]) < HOLD
    cluster = start_cluster()
    ids = cluster.enqueue_workload(CHAINS, FANS)
    wait_mid_run(ids, STEPS, 0.3)
    cluster.gate.touch()
    held = wait_held(ids)
    done = succeeded_steps(ids)
    postmaster = _postmaster_started()
    started = time.monotonic()
    fault()
    forget_connections()
    first_pass = cluster.app.engine.reconcile()
    taken = first_pass.requeued + first_pass.stalled_failed
    outage = time.monotonic() - started
    # The old guard's evidence cannot see this outage: the postmaster never restarted.
    assert _postmaster_started() == postmaster
    cluster.gate.unlink()
    recovered = seconds_to_progress(ids, done, started)
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "outage seconds": round(outage, 1),
            "stall timeout": float(SETTINGS["CONVEYOR_STALL_TIMEOUT"]),
            "steps held across it": held,
            "steps the first pass took as stalled": len(taken),
            "seconds to progress after it": round(recovered, 1),
        },
    )
    try:
        check(ids, cluster.run_log, figures=figures)
    finally:
        print(f"\n{name}: {figures.line()}")
    assert not taken, figures.line()


def test_backend_killed_crash_recovery_longer_than_the_stall_timeout_reruns_nothing(
    start_cluster: StartCluster, postgres_server: PostgresServer | None
) -> None:
    server = _server(postgres_server)
    data = server.root / "data"
    log = server.root / "postgres.log"
    logged = log.stat().st_size
    durable_commits()

    _first_pass_takes_nothing(
        start_cluster,
        "PostgreSQL backend SIGKILLed, crash recovery",
        lambda: kill_a_backend_held_in_recovery(data, HOLD),
    )

    # It was crash recovery: the postmaster reinitialised, it did not restart.
    with log.open("rb") as lines:
        lines.seek(logged)
        recovery = lines.read().decode(errors="replace")
    assert "terminated by signal 9" in recovery
    assert "all server processes terminated; reinitializing" in recovery


def test_hung_server_longer_than_the_stall_timeout_reruns_nothing(
    start_cluster: StartCluster, postgres_server: PostgresServer | None
) -> None:
    server = _server(postgres_server)
    data = server.root / "data"

    def hang() -> None:
        stopped = hang_server(data)
        time.sleep(HOLD)  # the outage itself: nothing answers this long
        resume_server(stopped)

    _first_pass_takes_nothing(start_cluster, "PostgreSQL hung (SIGSTOP)", hang)
