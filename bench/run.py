"""Run every benchmark: ``.venv/bin/python -m bench.run [--quick] [--only NAME ...]``.

Starts its own PostgreSQL 15 and Redis on free ports (and always stops them), then:

- ``throughput``: durable steps per second on PostgreSQL and SQLite against plain Celery
  chains on the same broker, with SQL statements, commits and CPU per step;
- ``overhead``: single-threaded CPU of a step's parts (building statements,
  ``Workflow.sinks``, a one-statement transaction against raw psycopg);
- ``enqueue``: ``enqueue_many`` against a loop of ``enqueue`` calls;
- ``reconciler``: passes over 100,000 then 1,000,000 finished executions (``--quick``:
  10,000 then 100,000), with the plans of their scans.

Every figure is one line on stdout, ``name key=value ... value=<number>``; lines that
start with ``#`` are context.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import celery
import redis
import sqlalchemy
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.enqueue import enqueue_throughput
from bench.harness import (
    WORKER_CONCURRENCY,
    Backend,
    Services,
    note,
    postgres_database,
    services,
    sqlite_database,
)
from bench.overhead import overhead
from bench.reconciler import reconciler
from bench.throughput import compare, workloads

PARTS = ("throughput", "overhead", "enqueue", "reconciler")


@dataclass(frozen=True)
class Sizes:
    """How much work each benchmark does."""

    linear_steps: int
    dag_executions: int
    throughput_rounds: int
    overhead_calls: int
    enqueue_batch: int
    enqueue_calls: int
    enqueue_repeats: int
    reconciler_stages: tuple[int, ...]
    reconciler_per_kind: int
    reconciler_repeats: int


FULL = Sizes(
    linear_steps=200,
    dag_executions=200,
    throughput_rounds=3,
    overhead_calls=2000,
    enqueue_batch=2000,
    enqueue_calls=500,
    enqueue_repeats=3,
    reconciler_stages=(100_000, 1_000_000),
    reconciler_per_kind=100,
    reconciler_repeats=5,
)
QUICK = Sizes(
    linear_steps=50,
    dag_executions=50,
    throughput_rounds=1,
    overhead_calls=500,
    enqueue_batch=500,
    enqueue_calls=100,
    enqueue_repeats=3,
    reconciler_stages=(10_000, 100_000),
    reconciler_per_kind=100,
    reconciler_repeats=3,
)


def _versions(running: Services) -> None:
    engine = create_engine(running.postgres.url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            postgres = connection.execute(text("SHOW server_version")).scalar_one()
    finally:
        engine.dispose()
    client = redis.Redis.from_url(running.redis_url)
    try:
        redis_version = client.info("server")["redis_version"]
    finally:
        client.close()
    note(
        f"python={platform.python_version()} postgresql={postgres} redis={redis_version} "
        f"celery={celery.__version__} sqlalchemy={sqlalchemy.__version__} "
        f"redis-py={redis.__version__}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks and print their figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 1 minute)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--concurrency",
        type=int,
        default=WORKER_CONCURRENCY,
        help=f"threads of the in-process workers (default {WORKER_CONCURRENCY})",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    logging.basicConfig(level=logging.WARNING, format="# %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    note(
        f"conveyor benchmarks ({'quick' if args.quick else 'full'}) "
        f"at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}"
    )
    with services() as running, tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        _versions(running)
        backends = [
            Backend("postgresql", postgres_database(running.postgres, "bench_state")),
            Backend("sqlite", sqlite_database(Path(tmp), "bench_state")),
        ]
        if "throughput" in args.only:
            plan = workloads(sizes.linear_steps, sizes.dag_executions)
            rounds, threads = sizes.throughput_rounds, args.concurrency
            for backend in backends:
                compare(backend, running, plan, rounds, threads)
            # What the pool's ping before each checkout (a round trip a transaction) costs.
            dag = [w for w in plan if w.name == "dag"]
            compare(backends[0], running, dag, rounds, threads, database_pool_pre_ping=False)
        if "overhead" in args.only:
            overhead(backends, running.redis_url, sizes.overhead_calls)
        if "enqueue" in args.only:
            for backend in backends:
                enqueue_throughput(
                    backend,
                    running.redis_url,
                    sizes.enqueue_batch,
                    sizes.enqueue_calls,
                    sizes.enqueue_repeats,
                )
        if "reconciler" in args.only:
            reconciler(
                running,
                list(sizes.reconciler_stages),
                sizes.reconciler_per_kind,
                sizes.reconciler_repeats,
            )
    note(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
