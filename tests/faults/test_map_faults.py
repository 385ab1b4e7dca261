"""Map steps under faults, on worker processes: thousands of items, SIGKILLs mid-map, the
broker's depth while a big map runs, and a high-priority execution getting through it.

The map workflow is ``numbers -> square -> total`` (``tests.faults.workflows``): the map
doubles each number, and ``total`` sums index * output, so a list out of order is a
wrong total. ``check`` asserts the map's invariants (see ``checker.py``): one row per
item, each succeeded once at an attempt no error retry was spent on, one aggregation.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
import redis
from sqlalchemy import select, text

from core.database import get_db_session
from tests.faults import workflows
from tests.faults.checker import (
    Figures,
    check,
    item_republishes,
    item_statuses,
    items_table,
    steps_table,
    wait_until_final,
)
from tests.faults.cluster import Cluster
from tests.faults.conftest import StartCluster
from worker.config import MAX_PRIORITY
from worker.items import RUN_ITEM
from worker.producer import enqueue

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(420)]

KILL_ITEMS = 2000
KILL_ITEM_SECONDS = 0.02  # each item sleeps 2-20 ms
KILLS = 5
MAIN_KILLS = 1  # of the KILLS, worker main processes (a replacement started); the rest
# pool children, each one running an item when one does
KILL_PAUSE = (0.3, 1.0)
KILL_FROM = 0.1  # of the items succeeded before the first kill
BUSY_WAIT = 5.0
BIG_ITEMS = 10_000
SAMPLE_SECONDS = 0.02
CONTINUE_STEPS = 50
PRIORITY_AFTER = 0.1  # of the big map's items succeeded before the high-priority enqueue
FINISH_TIMEOUT = 300.0


def item_counts(execution_id: str) -> Counter[str]:
    """The map's items by status."""
    return Counter(item_statuses([execution_id]))


def wait_items_succeeded(execution_id: str, at_least: int, timeout: float = 120.0) -> int:
    """Poll until ``at_least`` items of the execution's map succeeded; how many had."""
    deadline = time.monotonic() + timeout
    while True:
        counts = item_counts(execution_id)
        if counts["succeeded"] >= at_least:
            assert counts["pending"], f"the map ran out of items before the fault: {counts}"
            return counts["succeeded"]
        assert time.monotonic() < deadline, f"{counts} after {timeout}s"
        time.sleep(0.05)


def item_workers(execution_id: str) -> set[int]:
    """The pids of the processes running an item of the execution's map now."""
    with get_db_session() as db:
        workers = db.execute(
            select(items_table.c.worker).where(
                items_table.c.execution_id == execution_id, items_table.c.status == "running"
            )
        ).scalars()
        return {int(worker.rsplit(":", 1)[1]) for worker in workers if worker}


def _kill_a_busy_child(cluster: Cluster, execution_id: str, rng: random.Random) -> list[int]:
    """SIGKILL one pool child running an item (any child if none does within a moment)."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        children = {pid for worker in cluster.workers for pid in worker.children()}
        busy = sorted(item_workers(execution_id) & children)
        if busy or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    candidates = busy or sorted(children)
    if not candidates:
        return []
    victim = rng.choice(candidates)
    os.kill(victim, signal.SIGKILL)
    return [victim]


def test_a_2000_item_map_through_5_sigkills_records_every_item_once(
    start_cluster: StartCluster,
) -> None:
    """Pool children running items, and a worker's main process, SIGKILLed mid-map:
    the items they held are recovered (a crash recovery, not an error retry), every
    item succeeds once, the map aggregates once, ``total`` gets the list in order."""
    cluster = start_cluster()
    rng = random.Random()
    (eid,) = cluster.enqueue_map(
        [1], KILL_ITEMS, KILL_ITEM_SECONDS, workflow=workflows.wide_map.name
    )
    wait_items_succeeded(eid, int(KILL_FROM * KILL_ITEMS))
    plan = ["main"] * MAIN_KILLS + ["child"] * (KILLS - MAIN_KILLS)
    rng.shuffle(plan)
    dead: set[int] = set()
    kills = {"child": 0, "main": 0}
    pending: list[int] = []  # items not yet admitted at each kill
    for target in plan:
        pending.append(item_counts(eid)["pending"])
        if not pending[-1]:
            break  # the map is nearly done: the count below shows the kills fell short
        if target == "child":
            ended = _kill_a_busy_child(cluster, eid, rng)
        else:
            ended = cluster.kill_worker(rng.choice(cluster.workers))
            cluster.spawn_worker()
        kills[target] += bool(ended)
        dead.update(ended)
        time.sleep(rng.uniform(*KILL_PAUSE))
    seconds = wait_until_final([eid], FINISH_TIMEOUT)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "kills of pool children": kills["child"],
            "kills of worker main processes": kills["main"],
            "items pending at each kill": pending,
            "item republishes": item_republishes([eid]),
        },
    )
    try:
        check([eid], cluster.run_log, dead_pids=dead, figures=figures)
    finally:
        print(f"\n2,000-item map through SIGKILLs: {figures.line()}")
    assert kills["child"] + kills["main"] == KILLS, figures.line()
    assert figures.extra["map items"] == KILL_ITEMS, figures.line()
    # The kills landed on items: some were run again after their worker was lost.
    assert figures.extra["item recoveries"] >= 1, figures.line()


def _task_name(message: bytes) -> str:
    """The Celery task a message in a Redis queue list is for (kombu's JSON envelope)."""
    return str(json.loads(message).get("headers", {}).get("task", "?"))


@dataclass
class DepthSampler:
    """Samples, every ``SAMPLE_SECONDS``, the messages waiting in every Redis list the
    Celery queues use (``conveyor`` and ``conveyor:1`` .. ``conveyor:9``), all of them
    (``depths``: the LLEN sum) and the map items' among them (``item_depths``: beat's
    own tasks share the queue), and how many of the map's items are queued or running;
    until stopped."""

    redis_url: str
    execution_id: str
    queue: str = "conveyor"
    depths: list[int] = field(default_factory=list)
    item_depths: list[int] = field(default_factory=list)
    others: Counter[str] = field(default_factory=Counter)
    open_items: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        queues = [self.queue, *(f"{self.queue}:{p}" for p in range(1, MAX_PRIORITY + 1))]
        client = redis.Redis.from_url(self.redis_url)
        rounds = 0
        try:
            while not self._stop.is_set():
                with client.pipeline(transaction=False) as pipe:
                    for queue in queues:
                        pipe.lrange(queue, 0, -1)
                    waiting = [m for listed in pipe.execute() for m in listed]
                self.depths.append(len(waiting))
                names = Counter(_task_name(message) for message in waiting)
                self.item_depths.append(names.pop(RUN_ITEM, 0))
                self.others.update(names.keys())
                if rounds % 5 == 0:  # the database every 100 ms
                    counts = item_counts(self.execution_id)
                    self.open_items.append(counts["queued"] + counts["running"])
                rounds += 1
                time.sleep(SAMPLE_SECONDS)
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def test_broker_depth_during_a_10000_item_map_stays_within_max_parallel(
    start_cluster: StartCluster,
) -> None:
    """A 10,000-item map, 20 at a time, and no other work: the messages waiting in the
    broker never number more than 20, plus the duplicates the reconciler re-sent (items
    are rows until a slot admits them: a map never floods the broker)."""
    cluster = start_cluster()
    (eid,) = cluster.enqueue_map([1], BIG_ITEMS, 0.0, workflow=workflows.wide_map.name)
    sampler = DepthSampler(cluster.redis.url, eid)
    sampler.start()
    try:
        seconds = wait_until_final([eid], FINISH_TIMEOUT)
    finally:
        sampler.stop()
    resent = item_republishes([eid])
    limit = workflows.WIDE_MAP_PARALLEL
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "max_parallel": limit,
            "samples": len(sampler.depths),
            "broker depth max": max(sampler.depths, default=0),
            "item messages max": max(sampler.item_depths, default=0),
            "item messages median": sorted(sampler.item_depths)[len(sampler.item_depths) // 2],
            "other tasks seen queued": dict(sampler.others),
            "item republishes": resent,
            "queued + running items max": max(sampler.open_items, default=0),
        },
    )
    try:
        check([eid], cluster.run_log, figures=figures)
    finally:
        print(f"\n10,000-item map, broker depth: {figures.line()}")
    assert max(sampler.item_depths) <= limit + resent, figures.line()
    assert max(sampler.open_items) <= limit, figures.line()
    # The sampler saw the map's messages (it measured something).
    assert max(sampler.item_depths) > 0, figures.line()


def _database_now() -> datetime:
    """The database's clock (item and step times are on it)."""
    with get_db_session() as db:
        now: datetime = db.execute(text("SELECT clock_timestamp()")).scalar_one()
    return now


def _started_between(execution_id: str, since: datetime, until: datetime) -> Counter[str]:
    """Items of the map started in (since, until], by the worker process that ran them."""
    with get_db_session() as db:
        workers = db.execute(
            select(items_table.c.worker).where(
                items_table.c.execution_id == execution_id,
                items_table.c.started_at > since,
                items_table.c.started_at <= until,
            )
        ).scalars()
        return Counter(str(worker) for worker in workers)


def _step_row(execution_id: str, step: str) -> Any:
    with get_db_session() as db:
        return db.execute(
            select(steps_table.c.status, steps_table.c.started_at).where(
                steps_table.c.execution_id == execution_id, steps_table.c.step_name == step
            )
        ).one()


def test_a_high_priority_execution_gets_through_a_10000_item_map_within_one_slice(
    start_cluster: StartCluster,
) -> None:
    """A priority-9 execution of one step, enqueued while a 10,000-item map (priority 0)
    runs: its start goes ahead of every queued item, so it starts as soon as one pool
    process ends the continuation slice it is in. Measured as ordering facts on the
    database's clock: between its start's publish and its step's start, no worker
    process started more items than one slice holds (``CONVEYOR_CONTINUE_MAX_STEPS``
    continued after the delivered one, the delivered one before the publish)."""
    # Slices bounded by their count alone: seconds that never bind.
    cluster = start_cluster(
        settings={
            "CONVEYOR_CONTINUE_MAX_STEPS": str(CONTINUE_STEPS),
            "CONVEYOR_CONTINUE_MAX_SECONDS": "600",
        }
    )
    (eid,) = cluster.enqueue_map([1], BIG_ITEMS, 0.0, workflow=workflows.wide_map.name)
    wait_items_succeeded(eid, int(PRIORITY_AFTER * BIG_ITEMS))
    urgent = enqueue(workflows.single.name, {"start": 9}, priority=MAX_PRIORITY, app=cluster.app)
    sent = _database_now()  # after enqueue returned: its start message is in the broker
    deadline = time.monotonic() + 60
    while (row := _step_row(urgent, "only")).status != "succeeded":
        assert time.monotonic() < deadline, f"the high-priority step is {row.status} after 60s"
        time.sleep(0.05)
    left = item_counts(eid)
    per_process = _started_between(eid, sent, row.started_at)
    seconds = wait_until_final([eid, urgent], FINISH_TIMEOUT)
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "continue max steps": CONTINUE_STEPS,
            "items started between the publish and its start, by process": sorted(
                per_process.values(), reverse=True
            ),
            "items not yet run at its start": left["pending"] + left["queued"],
            "ms from the publish to its start": round(
                (row.started_at - sent).total_seconds() * 1000
            ),
        },
    )
    try:
        check([eid, urgent], cluster.run_log, figures=figures)
    finally:
        print(f"\nHigh priority through a 10,000-item map: {figures.line()}")
    # It got through mid-map: the map still had items queued behind it.
    assert left["pending"] + left["queued"] > 0, figures.line()
    assert max(per_process.values(), default=0) <= CONTINUE_STEPS, figures.line()
