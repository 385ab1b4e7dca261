"""A SIGKILL storm: pool children and worker main processes killed while work remains.

Every step keeps the default ``Retry`` (one attempt): crash recoveries, counted apart
from error retries, must carry the steps a kill interrupted.

Waits ride the storm too (``Cluster.enqueue_mix``): ``sleepy`` executions (a -> sleep
of 1-4 s -> b), woken by whichever worker lives; ``parent`` executions (a -> child, a
three-step chain -> b); and ``approval`` executions (a -> wait for ``fault.approved`` ->
b) whose events a thread of this process sends through the storm, some before their
wait exists (``tests.faults.senders``): every wait ends exactly once, each child step
started one child, every event is taken by its own wait, none is lost. Maps too
(numbers -> a map of 40 items, 8 at a time -> total): every item ends once, at an
attempt no error retry was spent on, and each map aggregates once. And one step under
a per-key limit (``fault-limit``, 2 at a time): replayed from the events, never more than
2 attempts held the key's slots at once, through the kills and their recoveries.
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
    key_holders_peak,
    open_executions,
    running_workers,
    start_resends,
    transitions,
    wait_until_final,
)
from tests.faults.cluster import Cluster
from tests.faults.conftest import StartCluster
from tests.faults.senders import EventSender
from tests.faults.workflows import LIMIT

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(300)]

CHAINS = 40
FANS = 10
SLEEPIES = 10
SLEEP_SECONDS = (1.0, 4.0)
PARENTS = 6  # a -> child (a three-step chain) -> b
APPROVALS = 20  # half armed early, their events sent through the storm; half behind the
# chains and fans, their events sent at once: before their waits exist
MAPS = 2  # numbers -> square (a map of 40 items, 8 at a time) -> total
LIMITED = 12  # one step under Concurrency(key="fault-limit", limit=2)
SEND_PAUSE = (0.2, 1.2)  # seconds between the early ones' sends: moments of the storm
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
    mix = cluster.enqueue_mix(
        CHAINS,
        FANS,
        sleepies=SLEEPIES,
        approvals=APPROVALS,
        parents=PARENTS,
        sleep_seconds=SLEEP_SECONDS,
        rng=rng,
        maps=MAPS,
        limited=LIMITED,
    )
    ids = mix.ids
    sender = EventSender(cluster.app, at_once=mix.late, later=mix.early, pause=SEND_PAUSE, rng=rng)
    sender.start()
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
    sent = sender.join()
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
            **sent.figures(),
            "most holding the limited key at once": key_holders_peak(mix.limited, "call"),
        },
    )
    try:
        check(ids, cluster.run_log, dead_pids=dead, figures=figures)
    finally:
        print(f"\nSIGKILL storm: {figures.line()}")
    assert kills["child"] + kills["main"] >= CHILD_KILLS + MAIN_KILLS, figures.line()
    assert figures.extra["most holding the limited key at once"] <= LIMIT, figures.line()
    # Both orders happened: events before their wait, and waits before their event.
    assert sent.stored_for_later, figures.line()
    assert sent.to_a_waiting_wait, figures.line()
