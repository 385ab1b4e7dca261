"""What a timed window cost: CPU of the workers and of PostgreSQL, statements, transactions.

Counted on the server, the same way for every system:

- round trips: ``pg_stat_statements`` calls in the system's databases, by every role
  but the observer's (each call is one query message: BEGIN, COMMIT and the pool's
  pre-ping ``SELECT 1`` included); the counts are updated as each statement ends;
- transactions: its COMMIT and ROLLBACK calls (read-only transactions included);
- write transactions: transaction ids assigned (PostgreSQL gives one to a transaction
  on its first write only), from the next id before and after; cluster-wide, while only
  the measured system runs.

``pg_stat_database.xact_commit`` is not used: a busy backend reports its counters at
most once a second and an idle one up to 10 s later, so a window's delta is not the
window's work, and it counts read-only transactions too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from bench.harness import OBSERVER, Services
from bench.processes import Workers, cpu_seconds

POLL_SECONDS = 0.02

STATEMENTS = """
    SELECT coalesce(sum(s.calls), 0),
           coalesce(sum(s.calls) FILTER (WHERE upper(s.query) IN ('COMMIT', 'ROLLBACK')), 0)
    FROM pg_stat_statements AS s
    JOIN pg_database AS d ON d.oid = s.dbid
    JOIN pg_roles AS r ON r.oid = s.userid
    WHERE d.datname = ANY(%s) AND r.rolname <> %s
"""
NEXT_XID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"


@dataclass(frozen=True)
class Reading:
    """Counters at one instant."""

    at: float
    worker_cpu: float
    postgres_cpu: float
    statements: int
    transactions: int
    next_xid: int


@dataclass(frozen=True)
class Usage:
    """What happened between two readings."""

    seconds: float
    worker_cpu: float
    postgres_cpu: float
    statements: int
    transactions: int
    write_transactions: int

    @classmethod
    def between(cls, before: Reading, after: Reading) -> Usage:
        """The difference of two readings."""
        return cls(
            seconds=after.at - before.at,
            worker_cpu=after.worker_cpu - before.worker_cpu,
            postgres_cpu=after.postgres_cpu - before.postgres_cpu,
            statements=after.statements - before.statements,
            transactions=after.transactions - before.transactions,
            write_transactions=after.next_xid - before.next_xid,
        )


class Meter:
    """Reads the counters, as the superuser, from the ``postgres`` database."""

    def __init__(self, running: Services) -> None:
        self._running = running
        self._connection = psycopg.connect(running.dsn("postgres"), autocommit=True)

    def read(self, workers: Workers | None, databases: Sequence[str]) -> Reading:
        """The counters now, for ``workers`` and the statements in ``databases``."""
        statements, transactions = 0, 0
        if databases:
            row = self._connection.execute(STATEMENTS, (list(databases), OBSERVER)).fetchone()
            assert row is not None
            statements, transactions = int(row[0]), int(row[1])
        xid = self._connection.execute(NEXT_XID).fetchone()
        assert xid is not None
        return Reading(
            at=time.perf_counter(),
            worker_cpu=workers.cpu_seconds() if workers is not None else 0.0,
            postgres_cpu=cpu_seconds([self._running.postmaster_pid]),
            statements=statements,
            transactions=transactions,
            next_xid=int(xid[0]),
        )

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()


class Observer:
    """A read-only connection as the observer role: polls for completion, reads results."""

    def __init__(self, running: Services, database: str) -> None:
        self._connection = psycopg.connect(running.dsn(database, OBSERVER), autocommit=True)

    def scalar(self, query: str, params: Sequence[Any]) -> Any:
        """The first column of the first row of ``query``."""
        row = self._connection.execute(query, params).fetchone()
        return None if row is None else row[0]

    def rows(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Every row of ``query``."""
        return list(self._connection.execute(query, params).fetchall())

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()


def poll_until(done: Callable[[], int], total: int, timeout: float, what: str) -> None:
    """Call ``done()`` every 20 ms until it reaches ``total``; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        finished = done()
        if finished >= total:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {finished} of {total} finished after {timeout:.0f}s")
        time.sleep(POLL_SECONDS)
