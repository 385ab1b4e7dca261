"""The broker loses its messages mid-run: FLUSHALL, and Redis killed and restarted empty.

``seconds to finish`` counts from the fault (from the restart after the kill).

What was committed and not consumed is found and sent again by the reconciler; no
step's code runs twice (no worker died) and none is completed twice.

The FLUSHALL's mix holds waits too (``Cluster.enqueue_mix``), armed early: child
workflows, sleeps of 1-4 s (the waker's sub-second follow-ups are flushed with the rest),
event waits and maps (their queued items' messages flushed too); the events of the
approvals enqueued last are sent at once (before their waits exist), those of the early
ones after the flush. Each wait ends once; no wake, child, event or map item is lost;
each map aggregates once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping

import pytest
import redis

from tests.faults.checker import (
    Figures,
    check,
    item_republishes,
    item_statuses,
    transitions,
    wait_mid_run,
    wait_until_final,
)
from tests.faults.cluster import MAP_ITEMS
from tests.faults.conftest import StartCluster
from tests.faults.senders import send_events
from tests.servers import RedisServer

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(240)]

CHAINS = 12
FANS = 4
STEPS = 10 * (CHAINS + FANS)
SLEEPIES = 6
SLEEP_SECONDS = (1.0, 4.0)
PARENTS = 4  # a -> child (a three-step chain) -> b
APPROVALS = 8
MAPS = 3  # numbers -> square (a map of 40 items, 8 at a time) -> total
DOWNTIME = 2.0
FINISH_TIMEOUT = 150.0


def _messages(client: redis.Redis) -> int:
    """Messages Redis holds for conveyor now: waiting in a queue or unacknowledged."""
    waiting = sum(int(client.llen(key)) for key in client.scan_iter("conveyor*"))
    return waiting + int(client.hlen("unacked"))


def _flush(server: RedisServer) -> int:
    """FLUSHALL; the messages it dropped."""
    client = redis.Redis.from_url(server.url)
    try:
        lost = _messages(client)
        client.flushall()
    finally:
        client.close()
    return lost


def wait_map_mid_run(execution_ids: list[str], timeout: float = 60.0) -> Mapping[str, int]:
    """Poll until a map of ``execution_ids`` has items succeeded and items queued (their
    messages in the broker); the items by status then."""
    deadline = time.monotonic() + timeout
    while True:
        items = item_statuses(execution_ids)
        if items.get("succeeded") and items.get("queued"):
            return items
        assert time.monotonic() < deadline, f"no map mid-run after {timeout}s: {items}"
        time.sleep(0.02)


def test_flushall_mid_run(start_cluster: StartCluster, fault_redis: RedisServer) -> None:
    cluster = start_cluster()
    mix = cluster.enqueue_mix(
        CHAINS,
        FANS,
        sleepies=SLEEPIES,
        approvals=APPROVALS,
        parents=PARENTS,
        sleep_seconds=SLEEP_SECONDS,
        rng=random.Random(),
        maps=MAPS,
    )
    ids = mix.ids
    sent = send_events(cluster.app, mix.late)  # behind the chains: before their waits
    # Two flushes: one while a map has items queued (their messages lost with it), one
    # at 30% of the steps, as the mix without maps did.
    items_then = wait_map_mid_run(ids)
    lost = _flush(fault_redis)
    wait_mid_run(ids, mix.steps, 0.3)
    lost += _flush(fault_redis)
    send_events(cluster.app, mix.early, sent)  # armed before the flush: to waiting waits
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "messages flushed": lost,
            "map items queued / pending at the first flush": (
                f"{items_then.get('queued', 0)} / {items_then.get('pending', 0)}"
            ),
            "reconciler republishes": transitions(ids, "queued", "queued"),
            "item republishes": item_republishes(ids),
            **sent.figures(),
        },
    )
    try:
        check(ids, cluster.run_log, figures=figures)
    finally:
        print(f"\nRedis FLUSHALL: {figures.line()}")
    assert figures.extra["map items"] == MAPS * MAP_ITEMS, figures.line()
    # The items whose messages the first flush took were sent again by the reconciler.
    assert figures.extra["item republishes"] >= 1, figures.line()


def test_redis_killed_and_restarted_empty(
    start_cluster: StartCluster, fault_redis: RedisServer
) -> None:
    cluster = start_cluster()
    ids = cluster.enqueue_workload(CHAINS, FANS)
    wait_mid_run(ids, STEPS, 0.3)
    fault_redis.kill()
    time.sleep(DOWNTIME)  # the outage itself: the broker stays down this long
    fault_redis.start_again()
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "restarts": 1,
            "seconds down": DOWNTIME,
            "reconciler republishes": transitions(ids, "queued", "queued"),
        },
    )
    try:
        check(ids, cluster.run_log, figures=figures)
    finally:
        print(f"\nRedis killed, restarted empty: {figures.line()}")
