"""Fixtures of the fault suite: its own Redis per test, and a cluster of processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.conftest import TestDatabase
from tests.faults.cluster import Cluster
from tests.servers import RedisServer, start_redis

StartCluster = Callable[..., Cluster]


@pytest.fixture
def fault_redis() -> Iterator[RedisServer]:
    """A Redis server of this test alone: the test may flush or kill it."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_cluster(
    database: TestDatabase, fault_redis: RedisServer, tmp_path: Path
) -> Iterator[StartCluster]:
    """Start workers and beat (``inject_mode``, setting overrides); all stopped at teardown."""
    started: list[Cluster] = []

    def start(
        *, inject_mode: str | None = None, settings: Mapping[str, str] | None = None
    ) -> Cluster:
        folder = tmp_path / f"cluster{len(started)}"
        folder.mkdir()
        cluster = Cluster(database, fault_redis, folder, inject_mode=inject_mode, settings=settings)
        started.append(cluster)
        cluster.start()
        return cluster

    try:
        yield start
    finally:
        for cluster in started:
            cluster.stop()
