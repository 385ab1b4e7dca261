"""A rate limit is exact across concurrent admitters: the GCRA state is one row per key,
locked by each admission, and judged on the database's clock read once the lock is held.

Eight threads, each on its own connection and transaction per attempt, admit starts of
one key as fast as they can for three seconds against ``RateLimit(limit=100,
per=1 s, burst=10)``: the admissions number 10 + 100 per second (within 2%), and no
one-second window holds more than the steady rate plus the burst. PostgreSQL only:
SQLite's writers are serial, so nothing would race.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import pytest

from core.database import get_database
from core.limits import Admitted, KeyLimit, try_admit
from core.workflows import RateLimit
from tests.conftest import TestDatabase

pytestmark = pytest.mark.postgresql_only

SECONDS = 3.0
THREADS = 8
LIMIT = RateLimit(key="rate-test", limit=100, per=timedelta(seconds=1), burst=10)


def test_concurrent_admissions_keep_the_rate_and_the_burst(database: TestDatabase) -> None:
    engine = get_database().engine
    admitted: list[datetime] = []
    lock = threading.Lock()
    stop = time.monotonic() + SECONDS
    refused = 0

    def admit_until_stopped(thread: int) -> None:
        nonlocal refused
        attempt = 0
        while time.monotonic() < stop:
            attempt += 1
            with engine.begin() as conn:
                decision = try_admit(
                    conn, f"thread-{thread}", f"start-{attempt}", 1, [KeyLimit("rate-test", LIMIT)]
                )
            with lock:
                if isinstance(decision, Admitted):
                    admitted.append(decision.at)
                else:
                    refused += 1

    threads = [threading.Thread(target=admit_until_stopped, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    admitted.sort()
    span = (admitted[-1] - admitted[0]).total_seconds()
    # The burst at once, then one every 10 ms over the span the threads kept asking.
    expected = LIMIT.burst + span * LIMIT.limit
    assert abs(len(admitted) - expected) <= 0.02 * expected, (len(admitted), expected)
    assert refused > len(admitted)  # the threads asked far faster than the rate
    for index, start in enumerate(admitted):
        window = [t for t in admitted[index:] if (t - start).total_seconds() < 1.0]
        assert len(window) <= LIMIT.limit + LIMIT.burst, (start, len(window))


def test_pause_key_refuses_a_naive_time_and_writes_nothing(database: TestDatabase) -> None:
    from sqlalchemy import func, select

    from core.errors import InputValidationError
    from core.limits import pause_key
    from core.models import FlowKey

    engine = get_database().engine
    with (
        pytest.raises(InputValidationError, match="timezone-aware") as refused,
        engine.begin() as conn,
    ):
        pause_key(conn, "rate-test", datetime(2030, 1, 1))  # noqa: DTZ001 - the point
    assert [e["field"] for e in refused.value.errors] == ["until"]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(FlowKey)).scalar_one() == 0
