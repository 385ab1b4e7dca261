"""PostgreSQL restarted twice mid-run, and down for 15 s (longer than the stall timeout).

Workers live through both: no step's code may run twice, since no worker died.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

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
from tests.servers import PostgresServer

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(240)]

CHAINS = 12
FANS = 4
STEPS = 10 * (CHAINS + FANS)
OUTAGE = 15.0
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
    ids = cluster.enqueue_workload(CHAINS, FANS)
    recoveries = []
    for fraction in (0.25, 0.6):
        wait_mid_run(ids, STEPS, fraction)
        cluster.gate.touch()  # every pool process holds a step across the restart
        wait_held(ids)
        done = succeeded_steps(ids)
        started = time.monotonic()
        server.restart()  # fast: every connection of every process dropped
        forget_connections()
        cluster.gate.unlink()
        recoveries.append(round(seconds_to_progress(ids, done, started), 1))
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={"restarts": len(recoveries), "seconds to progress after each": recoveries},
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
