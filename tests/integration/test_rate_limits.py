"""A rate limit is exact across concurrent admitters: the GCRA state is one row per key,
locked by each admission, and judged on the database's clock read once the lock is held.

Eight threads, each on its own connection and transaction per attempt, admit starts of
one key as fast as they can for three seconds against ``RateLimit(limit=100,
per=1 s, burst=10)``. Every decision, admitted or refused, is the one a single GCRA
replayed over all of them in the order of their times would make: no admission lost
or doubled by a race, whatever the load (a thread the machine left idle for a while
only asks less). No one-second window holds more than the steady rate plus the burst.
PostgreSQL only: SQLite's writers are serial, so nothing would race.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import pytest

from core.database import get_database
from core.limits import Admitted, KeyLimit, Refusal, try_admit
from core.workflows import RateLimit
from tests.conftest import TestDatabase

pytestmark = pytest.mark.postgresql_only

SECONDS = 3.0
THREADS = 8
LIMIT = RateLimit(key="rate-test", limit=100, per=timedelta(seconds=1), burst=10)


def test_concurrent_admissions_keep_the_rate_and_the_burst(database: TestDatabase) -> None:
    engine = get_database().engine
    decisions: list[Admitted | Refusal] = []
    lock = threading.Lock()
    stop = time.monotonic() + SECONDS

    def admit_until_stopped(thread: int) -> None:
        attempt = 0
        while time.monotonic() < stop:
            attempt += 1
            with engine.begin() as conn:
                decision = try_admit(
                    conn, f"thread-{thread}", f"start-{attempt}", 1, [KeyLimit("rate-test", LIMIT)]
                )
            with lock:
                decisions.append(decision)

    threads = [threading.Thread(target=admit_until_stopped, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # The key's row is locked from before a decision reads the clock until its commit,
    # so the decisions' times order them as they were made.
    decisions.sort(key=lambda d: d.at)
    interval = timedelta(seconds=LIMIT.interval)
    tat: datetime | None = None
    for index, decision in enumerate(decisions):
        now = decision.at
        next_tat = max(tat or now, now) + interval
        allowed_at = next_tat - LIMIT.burst * interval
        if allowed_at <= now:
            assert isinstance(decision, Admitted), (index, decision, allowed_at)
            tat = next_tat
        else:
            assert decision == Refusal("rate-test", allowed_at, "rate", now), (index, decision)
    admitted = [d.at for d in decisions if isinstance(d, Admitted)]
    assert len(admitted) >= LIMIT.burst + LIMIT.limit  # the burst, then the steady rate
    assert len(decisions) > 2 * len(admitted)  # the threads asked far faster than the rate
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
