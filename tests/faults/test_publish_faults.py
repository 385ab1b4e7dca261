"""Publishing faults: every run-step message duplicated, and publishes lost after commit."""

from __future__ import annotations

import pytest

from tests.faults import workflows
from tests.faults.checker import Figures, check, transitions, wait_until_final
from tests.faults.cluster import MAP_ITEMS
from tests.faults.conftest import StartCluster
from tests.faults.inject import LOG_ENV, faulty, injected_lines
from worker.app import ConveyorCelery
from worker.engine import RUN_STEP, START_BATCH, START_EXECUTION

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(240)]

CHAINS = 12
FANS = 4
MAPS = 3  # numbers -> square (a map of MAP_ITEMS items, 8 at a time) -> total
FINISH_TIMEOUT = 120.0
DRAIN_TIMEOUT = 60.0
LOST = "lost:0.2"


def test_duplicate_storm_completes_each_step_once(start_cluster: StartCluster) -> None:
    """Each run-step and run-item message is sent 3 extra times (at once, late, at
    another priority): no step's or map item's code runs twice, no completion is
    recorded twice, each map aggregates once."""
    cluster = start_cluster(inject_mode="duplicates")
    ids = cluster.enqueue_map(range(7000, 7000 + MAPS), MAP_ITEMS)
    workload = cluster.enqueue_workload(CHAINS, FANS)
    ids += workload
    # The chains' start batch delivered twice, as a redelivery would (not duplicated by
    # the injection: each copy of a batch sends the rest of it on, so duplicating every
    # such publish 3 times would grow without bound): each execution starts once.
    cluster.app.engine.publish_starts([(i, workflows.chain.name, 0) for i in workload[:CHAINS]])
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    # Duplicates still queued (the late ones, those behind higher priorities) are run
    # before the check: a duplicate after the finish must change nothing either.
    cluster.wait_broker_drained(DRAIN_TIMEOUT)
    injected = [line.split()[0] for line in injected_lines(cluster.inject_log)]
    originals, sent = injected.count("original"), injected.count("duplicate")
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "run-step and run-item messages": originals,
            "duplicates sent": sent,
            "duplicates dropped": cluster.log_count("not claimed"),
        },
    )
    try:
        check(ids, cluster.run_log, figures=figures)
    finally:
        print(f"\nduplicate storm: {figures.line()}")
    assert originals > 0, figures.line()
    assert sent == 3 * originals, figures.line()
    assert figures.extra["map items"] == MAPS * MAP_ITEMS, figures.line()


def test_lost_publishes_are_sent_by_the_reconciler(
    start_cluster: StartCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20% of start and run-step publishes fail after their commit (producer, workers,
    reconciler alike): every execution still finishes, through the reconciler."""
    # Lost run-steps wait for the reconciler's republish: sooner than usual, to keep it short.
    cluster = start_cluster(inject_mode=LOST, settings={"CONVEYOR_REPUBLISH_AFTER": "3"})
    # The producer here loses its publishes too.
    monkeypatch.setenv(LOG_ENV, str(cluster.inject_log))
    monkeypatch.setattr(ConveyorCelery, "send_task", faulty(ConveyorCelery.send_task, LOST))
    ids = cluster.enqueue_workload(CHAINS, FANS)
    seconds = wait_until_final(ids, FINISH_TIMEOUT)
    lost = [line.split()[1] for line in injected_lines(cluster.inject_log)]
    figures = Figures(
        seconds_to_finish=seconds,
        extra={
            "lost starts": lost.count(START_EXECUTION),
            "lost start batches": lost.count(START_BATCH),
            "lost run-steps": lost.count(RUN_STEP),
            "reconciler republishes": transitions(ids, "queued", "queued"),
        },
    )
    try:
        check(ids, cluster.run_log, figures=figures)
    finally:
        print(f"\nlost publishes: {figures.line()}")
    assert lost.count(START_EXECUTION) + lost.count(START_BATCH) > 0, figures.line()
    assert lost.count(RUN_STEP) > 0, figures.line()
    assert figures.extra["reconciler republishes"] > 0, figures.line()
