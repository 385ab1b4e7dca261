"""The broker loses its messages mid-run: FLUSHALL, and Redis killed and restarted empty.

``seconds to finish`` counts from the fault (from the restart after the kill).

What was committed and not consumed is found and sent again by the reconciler; no
step's code runs twice (no worker died) and none is completed twice.

The FLUSHALL's mix holds waits too (``Cluster.enqueue_mix``), armed early: child
workflows, sleeps of 1-4 s (the waker's sub-second follow-ups are flushed with the rest)
and event waits; the events of the approvals enqueued last are sent at once (before
their waits exist), those of the early ones after the flush. Each wait ends once; no
wake, child or event is lost.
"""

from __future__ import annotations

import random
import time

import pytest
import redis

from tests.faults.checker import (
    Figures,
    check,
    transitions,
    wait_mid_run,
    wait_until_final,
)
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
DOWNTIME = 2.0
FINISH_TIMEOUT = 150.0


def _messages(client: redis.Redis) -> int:
    """Messages Redis holds for conveyor now: waiting in a queue or unacknowledged."""
    waiting = sum(int(client.llen(key)) for key in client.scan_iter("conveyor*"))
    return waiting + int(client.hlen("unacked"))


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
    )
    ids = mix.ids
    sent = send_events(cluster.app, mix.late)  # behind the chains: before their waits
    wait_mid_run(ids, mix.steps, 0.3)
    client = redis.Redis.from_url(fault_redis.url)
    try:
        lost = _messages(client)
        client.flushall()
    finally:
        client.close()
    send_events(cluster.app, mix.early, sent)  # armed before the flush: to waiting waits
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "messages flushed": lost,
            "reconciler republishes": transitions(ids, "queued", "queued"),
            **sent.figures(),
        },
    )
    try:
        check(ids, cluster.run_log, figures=figures)
    finally:
        print(f"\nRedis FLUSHALL: {figures.line()}")


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
