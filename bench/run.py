"""``make bench``: plain Celery, DBOS and conveyor side by side on the same servers.

Starts its own PostgreSQL 15 (fsync, synchronous_commit and full_page_writes on;
pg_stat_statements loaded) and Redis on free ports, and always stops them. Each
repetition runs every system in turn (the order rotates), each with fresh worker
processes (``-P prefork -c 2``; DBOS: 2 processes), through every scenario:

- ``chain10``: executions of a chain of 10 no-op steps, submitted at once;
- ``fanout``: executions of 1 -> 8 -> 1 no-op steps (a chord for plain Celery; DBOS
  runs only the chains);
- ``map1k``, ``map10k`` (``--map-items``): one execution of 1 -> N -> 1, the N a
  ``@wf.map`` of no-op items 32 at a time against a chord of N no-op tasks, with the
  broker's depth sampled (no DBOS);
- ``chain<N>``: one chain of N steps (default 1,000): cost per step against chain10;
- ``latency``: executions sent one at a time: producer call -> first step start;
- ``enqueue``: executions enqueued with no worker running;
- ``burst``: executions (default 3,000) of chain10 enqueued with no worker running,
  then the workers started: steps/s, and whether they finish in the order they came
  (first repetition only; no DBOS; ``conveyor-bf`` is conveyor in breadth-first order).

Flow control, conveyor only, each against itself without the limit in the same turn:

- ``limit_chain10``: chain10's executions with every step under a per-key
  ``Concurrency`` that never binds: steps/s of both and their ratio;
- ``keys<N>``: N keys (``--keys``, default 1,000) x ``--per-key`` (default 10)
  executions of a one-step workflow under ``Concurrency(key=input key, limit=1)``,
  a key's executions submitted together (``--key-order``): executions/s of both, their
  ratio, and the most steps of one key that ran at once (the run fails if it is above
  1); first repetition only (``--keys-repetitions``: it is long).

Retention, conveyor only:

- ``prune_chain10``: chain10's executions while retention prunes ``--prune-rows``
  (default 300,000) old executions from the same tables, against chain10 alone in the
  same turn: steps/s of both and their ratio (goal >= 0.90).

``--only`` runs some of the scenarios (``long`` is chain<N>, ``map`` every map width,
``keys`` the keys scenario).

One line a figure: each system's median over the repetitions, then conveyor's ratio to
each other system (taken within each repetition). Lines starting with ``#`` are context.
``--extras reconciler overhead waits`` adds conveyor's in-process benchmarks (waits:
sleeping executions as rows, the waker, send_event -> step started; bench/waits.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import celery
import sqlalchemy

from bench.harness import BenchError, Services, note, services
from bench.meter import Meter
from bench.processes import ROOT
from bench.scenarios import (
    BREADTH_FIRST,
    SYSTEMS,
    Burst,
    Context,
    Enqueue,
    KeyedThroughput,
    Latency,
    LimitedChain,
    MapThroughput,
    PrunedChain,
    Results,
    Scenario,
    Throughput,
)
from bench.systems import (
    CHAIN10,
    FANOUT,
    Conveyor,
    Dbos,
    PlainCelery,
    Shape,
    System,
    map_shape,
)

EXTRAS = ("reconciler", "overhead", "waits")
# The names --only takes: a scenario's, or its family's where its name has a size in it.
FAMILIES = (
    "chain10",
    "fanout",
    "long",
    "map",
    "latency",
    "enqueue",
    "burst",
    "limit_chain10",
    "prune_chain10",
    "keys",
)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--repetitions", type=int, default=3, help="alternating repetitions (default 3)")
    add("--chain-executions", type=int, default=100, help="chain10 executions (default 100)")
    add(
        "--prune-rows",
        type=int,
        default=300_000,
        help="old executions written before each pruning turn of prune_chain10 (default 300000)",
    )
    add("--fanout-executions", type=int, default=50, help="fanout executions (default 50)")
    add("--long-steps", type=int, default=1000, help="steps of the long chain (default 1000)")
    add(
        "--map-items",
        type=int,
        nargs="*",
        default=[1000, 10_000],
        help="widths of the 1 -> N -> 1 maps (default 1000 10000; none: no map lines)",
    )
    add("--map-executions", type=int, default=1, help="executions of each map (default 1)")
    add("--latency-executions", type=int, default=30, help="latency samples (default 30)")
    add("--latency-interval", type=float, default=0.1, help="seconds between them (0.1)")
    add("--enqueue-executions", type=int, default=1000, help="enqueued at once (default 1000)")
    add("--burst-executions", type=int, default=3000, help="burst executions (default 3000)")
    add("--burst-repetitions", type=int, default=1, help="repetitions with a burst (1)")
    add("--keys", type=int, default=1000, help="keys of the keys scenario (default 1000)")
    add("--per-key", type=int, default=10, help="its executions per key (default 10)")
    add(
        "--key-order",
        choices=("grouped", "interleaved"),
        default="grouped",
        help="the keys scenario's submission order: a key's executions together "
        "(grouped, default) or one of each key in turn (interleaved)",
    )
    add("--keys-repetitions", type=int, default=1, help="repetitions with keys (1)")
    add(
        "--only",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        metavar="SCENARIO[,..]",
        help=f"run only these scenarios, of: {', '.join(FAMILIES)} (default: all)",
    )
    add("--concurrency", type=int, default=2, help="worker processes per system (default 2)")
    add("--systems", nargs="+", choices=SYSTEMS, default=None)
    add("--extras", nargs="*", choices=EXTRAS, default=[], help="in-process extras (none)")
    add("--reconciler-rows", type=int, nargs="+", default=[100_000, 1_000_000])
    add("--overhead-calls", type=int, default=2000)
    add("--wait-sleepers", type=int, default=100_000, help="waits: executions asleep")
    add("--wait-due", type=int, default=10_000, help="waits: sleeps due at once")
    add("--wait-events", type=int, default=30, help="waits: events sent, one at a time")
    add("--timeout", type=float, default=600.0, help="longest wait for one workload (s)")
    options = parser.parse_args(argv)
    if options.long_steps <= 10:
        parser.error("--long-steps must be more than 10")
    if options.burst_executions < 2:
        parser.error("--burst-executions must be at least 2")
    if any(not 1 <= items <= 10_000 for items in options.map_items):
        parser.error("--map-items must be between 1 and 10000 (a map's max_items)")
    if options.map_executions < 1:
        parser.error("--map-executions must be at least 1")
    if min(options.keys, options.per_key, options.keys_repetitions) < 1:
        parser.error("--keys, --per-key and --keys-repetitions must be at least 1")
    unknown = sorted(set(options.only or ()) - set(FAMILIES))
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(unknown)}; of {', '.join(FAMILIES)}")
    return options


def scenarios(options: argparse.Namespace) -> list[Scenario]:
    """The scenarios (those of ``--only``), in the order they run within a system's turn."""
    long = Shape(f"chain{options.long_steps}", "chain", options.long_steps)
    every: list[tuple[str, Scenario]] = [
        ("chain10", Throughput(CHAIN10, options.chain_executions)),
        ("fanout", Throughput(FANOUT, options.fanout_executions)),
        ("long", Throughput(long, 1, baseline=CHAIN10.name)),
        *(
            ("map", MapThroughput(map_shape(items), options.map_executions, CHAIN10.name))
            for items in options.map_items
        ),
        ("latency", Latency(CHAIN10, options.latency_executions, options.latency_interval)),
        ("enqueue", Enqueue(options.enqueue_executions)),
        ("burst", Burst(options.burst_executions, options.burst_repetitions)),
        ("limit_chain10", LimitedChain(options.chain_executions)),
        ("prune_chain10", PrunedChain(options.chain_executions, options.prune_rows)),
        (
            "keys",
            KeyedThroughput(
                options.keys, options.per_key, options.key_order, options.keys_repetitions
            ),
        ),
    ]
    return [scenario for family, scenario in every if not options.only or family in options.only]


def _systems(
    options: argparse.Namespace, running: Services, folder: Path, results: Results
) -> list[System]:
    # By default, the systems some scenario applies to (all of them, unless --only).
    plan = scenarios(options)
    chosen = options.systems or [s for s in SYSTEMS if any(p.applies_to(s) for p in plan)]
    found: list[System] = []
    if "celery" in chosen:
        found.append(PlainCelery(running, folder, options.concurrency))
    if "dbos" in chosen:
        if importlib.util.find_spec("dbos") is None:
            results.unavailable["dbos"] = "not installed: pip install '.[bench]'"
            note("dbos: not installed (pip install '.[bench]'); its figures are left out")
        else:
            found.append(Dbos(running, folder))
    if "conveyor" in chosen:
        found.append(Conveyor(running, folder, options.concurrency, options.long_steps))
    if BREADTH_FIRST in chosen:
        found.append(
            Conveyor(running, folder, options.concurrency, options.long_steps, "breadth_first")
        )
    return found


def _warm_up(system: System, context: Context, concurrency: int) -> None:
    """Connections, pools and imports warm (and the workers proven to consume)."""
    for shape, count in ((CHAIN10, 2 * concurrency), (FANOUT, 2)):
        if system.supports(shape):
            submission = system.submit(shape, count)
            system.wait(submission, context.timeout)
            system.check(submission)


def _turn(
    system: System,
    repetition: int,
    plan: list[Scenario],
    results: Results,
    context: Context,
    concurrency: int,
) -> None:
    """One system's turn in one repetition: fresh workers, then every scenario."""
    started = time.perf_counter()
    if any(s.needs_workers and s.applies_to(system.name) for s in plan):
        with system.workers() as workers:
            _warm_up(system, context, concurrency)
            for scenario in plan:
                if scenario.needs_workers and scenario.applies_to(system.name):
                    scenario.run(system, workers, repetition, results, context)
                    workers.check_alive()
    for scenario in plan:
        if not scenario.needs_workers and scenario.applies_to(system.name):
            scenario.run(system, None, repetition, results, context)
    note(f"repetition {repetition + 1}: {system.name} done in {time.perf_counter() - started:.0f}s")


def compare(options: argparse.Namespace, running: Services, folder: Path) -> Results:
    """Every repetition of every system through every scenario; the results."""
    results = Results()
    plan = scenarios(options)
    systems = _systems(options, running, folder, results)
    meter = Meter(running)
    context = Context(meter=meter, timeout=options.timeout)
    try:
        for repetition in range(options.repetitions):
            shift = repetition % len(systems)
            for system in systems[shift:] + systems[:shift]:
                if system.name in results.unavailable:
                    continue
                try:
                    _turn(system, repetition, plan, results, context, options.concurrency)
                except Exception as error:
                    if system.name != "dbos":
                        raise
                    # An optional baseline that fails is reported, not fatal.
                    results.unavailable["dbos"] = f"failed: {type(error).__name__}"
                    note(f"dbos failed, its figures are left out: {error!r}")
    finally:
        meter.close()
        for system in systems:
            system.close()
    return results


def _context(running: Services) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    versions = [f"python {platform.python_version()}", f"celery {celery.__version__}"]
    versions.append(f"sqlalchemy {sqlalchemy.__version__}")
    if importlib.util.find_spec("dbos") is not None:
        from importlib.metadata import version

        versions.append(f"dbos {version('dbos')}")
    note(
        f"conveyor bench at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit or '?'}, "
        f"{os.cpu_count()} CPUs; " + ", ".join(versions)
    )
    note(
        "PostgreSQL with fsync, synchronous_commit and full_page_writes on; "
        f"port {running.postgres.port}; Redis port {running.redis.port}"
    )


def _extras(options: argparse.Namespace, running: Services) -> None:
    if "reconciler" in options.extras:
        from bench.reconciler import reconciler

        reconciler(running, list(options.reconciler_rows), 100, 3)
    if "overhead" in options.extras:
        from bench.overhead import overhead

        overhead(running, options.overhead_calls)
    if "waits" in options.extras:
        from bench.waits import waits_extra

        waits_extra(running, options.wait_sleepers, options.wait_due, options.wait_events)


def _sizes(options: argparse.Namespace) -> list[str]:
    """What each scenario of the run runs, for the header."""
    sizes = {
        "chain10": [f"chain10 x{options.chain_executions}"],
        "fanout": [f"fanout x{options.fanout_executions}"],
        "long": [f"chain{options.long_steps} x1"],
        "map": [
            f"{map_shape(items).name} x{options.map_executions}" for items in options.map_items
        ],
        "latency": [f"latency x{options.latency_executions}"],
        "enqueue": [f"enqueue x{options.enqueue_executions}"],
        "burst": [
            f"burst x{options.burst_executions} (first {options.burst_repetitions} repetition(s))"
        ],
        "limit_chain10": [f"limit_chain10 x{options.chain_executions} (twice each way)"],
        "prune_chain10": [
            f"prune_chain10 x{options.chain_executions} (twice each way, "
            f"{options.prune_rows:,} old executions before each pruning turn)"
        ],
        "keys": [
            f"keys{options.keys} x{options.keys * options.per_key} each way, "
            f"{options.key_order} (first {options.keys_repetitions} repetition(s))"
        ],
    }
    return [
        size
        for family in FAMILIES
        if family in (options.only or FAMILIES)
        for size in sizes[family]
    ]


def benchmark(options: argparse.Namespace) -> Results:
    """Start the servers, run the comparison and the extras, print every line."""
    started = time.perf_counter()
    with services() as running, tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        _context(running)
        note(f"{options.repetitions} repetition(s): " + ", ".join(_sizes(options)))
        try:
            results = compare(options, running, Path(tmp))
        except BenchError:
            note(f"logs in {tmp}")
            raise
        for scenario in scenarios(options):
            for line in scenario.lines(results):
                print(line, flush=True)
        _extras(options, running)
    note(f"done in {time.perf_counter() - started:.0f}s")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark."""
    logging.basicConfig(level=logging.WARNING, format="# %(levelname)s %(name)s: %(message)s")
    benchmark(parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
