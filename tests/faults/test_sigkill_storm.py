"""A SIGKILL storm: pool children and worker main processes killed while work remains.

Every step keeps the default ``Retry`` (one attempt): crash recoveries, counted apart
from error retries, must carry the steps a kill interrupted.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Sequence

import pytest

from tests.faults.checker import (
    Figures,
    check,
    open_executions,
    running_workers,
    start_resends,
    transitions,
    wait_until_final,
)
from tests.faults.cluster import Cluster
from tests.faults.conftest import StartCluster

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(300)]

CHAINS = 40
FANS = 10
CHILD_KILLS = 7
MAIN_KILLS = 3
PAUSE = (0.5, 3.0)  # seconds between kills: random moments of the run
BUSY_WAIT = 5.0
FINISH_TIMEOUT = 150.0


def _kill_a_child(cluster: Cluster, ids: Sequence[str], rng: random.Random) -> list[int]:
    """SIGKILL one pool child, one running a step if any does within a moment; its pid."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        children = {pid for worker in cluster.workers for pid in worker.children()}
        running = {int(worker.rsplit(":", 1)[1]) for worker in running_workers(ids)}
        busy = sorted(running & children)
        if busy or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    candidates = busy or sorted(children)
    if not candidates:
        return []
    victim = rng.choice(candidates)
    os.kill(victim, signal.SIGKILL)
    return [victim]


def _kill_a_main(cluster: Cluster, rng: random.Random) -> list[int]:
    """SIGKILL one worker's main process and start a replacement; the pids it ended."""
    ended = cluster.kill_worker(rng.choice(cluster.workers))
    cluster.spawn_worker()
    return ended


def test_sigkill_storm_loses_nothing(start_cluster: StartCluster) -> None:
    cluster = start_cluster()
    rng = random.Random()
    ids = cluster.enqueue_workload(CHAINS, FANS)
    plan = ["child"] * CHILD_KILLS + ["main"] * MAIN_KILLS
    rng.shuffle(plan)
    dead: set[int] = set()
    kills = {"child": 0, "main": 0}
    for target in plan:
        time.sleep(rng.uniform(*PAUSE))
        if not open_executions(ids):
            break  # no work remains: the figures below show the storm fell short
        ended = (
            _kill_a_child(cluster, ids, rng) if target == "child" else _kill_a_main(cluster, rng)
        )
        kills[target] += bool(ended)
        dead.update(ended)
    last_kill = time.monotonic()
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "kills of pool children": kills["child"],
            "kills of worker main processes": kills["main"],
            "stall recoveries": transitions(ids, "running", "queued"),
            "reconciler republishes": transitions(ids, "queued", "queued"),
            "reconciler start re-sends": start_resends(ids),
            "seconds to recover after the last kill": round(time.monotonic() - last_kill, 1),
        },
    )
    try:
        check(ids, cluster.run_log, dead_pids=dead, figures=figures)
    finally:
        print(f"\nSIGKILL storm: {figures.line()}")
    assert kills["child"] + kills["main"] >= CHILD_KILLS + MAIN_KILLS, figures.line()
