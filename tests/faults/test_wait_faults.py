"""Sleeps across a whole deployment's death: every worker and beat SIGKILLed while the
executions sleep, then started again on the same database and Redis.

A sleep is a row (``waiting``, ``wake_at``): nothing of it lives in a process or in the
broker, so a deployment started again wakes it at the first waker pass, whether its wake
time passed while nothing ran (``test_everything_killed_mid_sleep_...``) or is still to
come (``test_a_deployment_restarted_mid_sleep_...``).

Times are compared across processes on one machine: the database's clock (``wake_at``,
``waiting_since``, ``finished_at``), the workers' log lines (``ready.``) and this process.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from core.database import get_db_session
from tests.faults import workflows
from tests.faults.checker import (
    Figures,
    check,
    executions_table,
    steps_table,
    wait_until_final,
)
from tests.faults.cluster import Cluster, Process
from tests.faults.conftest import StartCluster
from tests.faults.inject import injected_lines

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(180)]

SLEEPERS = 30
SHORT_SLEEP = 5.0
PAST_WAKE = 1.0  # how long past the last wake time the deployment stays dead
WOKEN_WITHIN = 2.0  # seconds from the first restarted worker's "ready." to every wake
NAPPERS = 10
LONG_SLEEP = 10.0
KILL_AT = 0.4  # of LONG_SLEEP: the deployment dies before half the sleep, so it is
# back (a worker start takes a few seconds) well before the first wake time
ON_TIME = 1.0  # a sleep's waiting_since -> succeeded exceeds its length by less
FINISH_TIMEOUT = 60.0


def nap_rows(execution_ids: Collection[str]) -> list[Any]:
    """The sleep step (``nap``) of each execution: status and its times."""
    with get_db_session() as db:
        return list(
            db.execute(
                select(
                    steps_table.c.execution_id,
                    steps_table.c.status,
                    steps_table.c.waiting_since,
                    steps_table.c.wake_at,
                    steps_table.c.finished_at,
                ).where(
                    steps_table.c.execution_id.in_(list(execution_ids)),
                    steps_table.c.step_name == "nap",
                )
            ).all()
        )


def wait_all_sleeping(execution_ids: Collection[str], timeout: float = 60.0) -> list[Any]:
    """Poll until every execution's sleep is armed (waiting, with a wake time)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = nap_rows(execution_ids)
        armed = [r for r in rows if r.status == "waiting" and r.wake_at is not None]
        if len(armed) == len(execution_ids):
            return armed
        assert all(r.status in ("pending", "waiting") for r in rows), [r.status for r in rows]
        assert time.monotonic() < deadline, f"{len(armed)} of {len(execution_ids)} asleep"
        time.sleep(0.1)


def sleep_until(moment: datetime) -> None:
    """Let this machine's clock (the database's) pass ``moment``: the fault's timing."""
    time.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()))


def first_ready(workers: Sequence[Process]) -> datetime:
    """When the first of ``workers`` logged ``ready.``."""
    moments = [w.logged_at("ready.") for w in workers]
    return min(m for m in moments if m is not None)


def restart(cluster: Cluster) -> tuple[list[int], datetime, float]:
    """Kill every worker and beat, start a new set; the pids ended, the first new
    worker's ready moment, and the seconds from the kill to it."""
    killed = time.monotonic()
    dead = cluster.stop_all()
    workers = cluster.start_again()
    return dead, first_ready(workers), time.monotonic() - killed


def test_everything_killed_mid_sleep_wakes_every_sleep_once_after_restart(
    start_cluster: StartCluster,
) -> None:
    cluster = start_cluster()
    ids = cluster.enqueue_sleepy(range(SLEEPERS), [SHORT_SLEEP] * SLEEPERS)
    asleep = wait_all_sleeping(ids)
    dead = cluster.stop_all()
    last_wake = max(r.wake_at for r in asleep)
    sleep_until(last_wake)
    time.sleep(PAST_WAKE)  # every wake time passed while nothing ran
    overdue = nap_rows(ids)
    assert all(r.status == "waiting" for r in overdue), "a sleep ended with no process alive"
    started = time.monotonic()
    workers = cluster.start_again()
    ready = first_ready(workers)
    restart_seconds = time.monotonic() - started
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    naps = nap_rows(ids)
    ticked = cluster.beat.logged_at("Sending due task conveyor-wake") if cluster.beat else None
    after_ready = [(r.finished_at - ready).total_seconds() for r in naps if r.finished_at]
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "sleep seconds": SHORT_SLEEP,
            "seconds dead past the last wake time": round((ready - last_wake).total_seconds(), 1),
            "seconds to restart (to every worker ready)": round(restart_seconds, 1),
            "beat's first wake tick after ready (s)": (
                round((ticked - ready).total_seconds(), 2) if ticked else None
            ),
            "sleeps ended after the first ready (s, min-max)": (
                f"{min(after_ready):.2f}-{max(after_ready):.2f}" if after_ready else None
            ),
        },
    )
    try:
        check(ids, cluster.run_log, dead_pids=dead, figures=figures)
    finally:
        print(f"\nEverything killed mid-sleep: {figures.line()}")
    # Every a ran before the kill and every b after: each step's code ran once.
    assert figures.runs == 2 * SLEEPERS, figures.line()
    assert figures.reruns == 0, figures.line()
    assert all(r.finished_at > r.wake_at for r in naps)
    assert max(after_ready) < WOKEN_WITHIN, figures.line()


def test_a_deployment_restarted_mid_sleep_wakes_each_sleep_on_time(
    start_cluster: StartCluster,
) -> None:
    cluster = start_cluster()
    ids = cluster.enqueue_sleepy(range(NAPPERS), [LONG_SLEEP] * NAPPERS)
    asleep = wait_all_sleeping(ids)
    first_wake = min(r.wake_at for r in asleep)
    sleep_until(min(r.waiting_since for r in asleep) + timedelta(seconds=LONG_SLEEP * KILL_AT))
    dead, ready, restart_seconds = restart(cluster)
    assert ready < first_wake, (
        f"the restart took {restart_seconds:.1f}s, past the first wake time: "
        "this machine is too slow for the scenario"
    )
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    naps = nap_rows(ids)
    ended = [r for r in naps if r.finished_at]
    late = sorted((r.finished_at - r.waiting_since).total_seconds() - LONG_SLEEP for r in ended)
    woke = sorted((r.finished_at - r.wake_at).total_seconds() for r in ended)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "sleep seconds": LONG_SLEEP,
            "seconds from the kill to the first worker ready": round(restart_seconds, 1),
            "seconds the first worker was ready before the first wake time": round(
                (first_wake - ready).total_seconds(), 1
            ),
            "waiting_since -> succeeded past the sleep (s, median/max)": (
                f"{late[len(late) // 2]:.3f}/{late[-1]:.3f}" if late else None
            ),
            "wake_at -> succeeded (s, median/max)": (
                f"{woke[len(woke) // 2]:.3f}/{woke[-1]:.3f}" if woke else None
            ),
        },
    )
    try:
        check(ids, cluster.run_log, dead_pids=dead, figures=figures)
    finally:
        print(f"\nDeployment restarted mid-sleep: {figures.line()}")
    assert figures.reruns == 0, figures.line()
    assert all(0 <= lateness < ON_TIME for lateness in late), late


PARENTS = 4


def test_a_worker_killed_between_creating_a_child_and_starting_it_leaves_one_child(
    start_cluster: StartCluster,
) -> None:
    """The worker that completed a parent's upstream step (creating the child and arming
    the parent's wait in that commit) is SIGKILLed before it publishes the child's start:
    the reconciler sends the start of the pending child, the child runs once, and the
    parent resumes with its output."""
    cluster = start_cluster(inject_mode=f"kill-at-start:{workflows.chain3.name}")
    ids = cluster.enqueue(workflows.parent.name, range(6000, 6000 + PARENTS))
    elapsed = wait_until_final(ids, FINISH_TIMEOUT)
    killed = [line.split() for line in injected_lines(cluster.inject_log)]
    assert [line[:2] for line in killed] == [["killed", "before"]], killed
    figures = Figures(seconds_to_finish=elapsed, extra={"killed before a child's start": 1})
    try:
        check(ids, cluster.run_log, dead_pids=[int(killed[0][-1])], figures=figures)
    finally:
        print(f"\nKilled between a child's creation and its start: {figures.line()}")
    with get_db_session() as db:
        children = db.execute(
            select(executions_table.c.parent_execution_id, executions_table.c.status).where(
                executions_table.c.parent_execution_id.in_(ids)
            )
        ).all()
    # One child per parent, each succeeded: the lost start was sent again, never a new child.
    assert sorted(parent for parent, _ in children) == sorted(ids)
    assert {status for _, status in children} == {"succeeded"}
