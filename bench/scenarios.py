"""The scenarios of the comparison, their figures, and the lines that print them.

A scenario measures one system in one repetition and records figures in ``Results``
under (scenario, metric, system, repetition). Each printed line is one metric of one
scenario: every system's median over the repetitions, then conveyor's ratio to each
other system, taken within each repetition and then the median. A new scenario is a
class with ``name``, ``needs_workers``, ``applies_to``, ``run`` and ``lines``, added to
the list in ``bench/run.py``. ``conveyor-bf`` (conveyor in breadth-first order) takes
part in the burst only; a compared system a scenario leaves out is shown ``(not run)``.
The flow-control scenarios (``limit_chain10``, ``keys<N>``) measure conveyor against
itself without the limit, in the same turn: their lines show conveyor alone.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Protocol

import psycopg
from sqlalchemy.engine import make_url

from bench import workflows
from bench.harness import BenchError, median, note, number, percentile
from bench.meter import Meter, Usage
from bench.processes import Workers
from bench.systems import CHAIN10, Conveyor, Shape, Submission, System
from core.database import Database
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.retention import prune

COMPARED = ("celery", "dbos", "conveyor")
BREADTH_FIRST = "conveyor-bf"
SYSTEMS = (*COMPARED, BREADTH_FIRST)
SUBJECT = "conveyor"


@dataclass(frozen=True)
class Figure:
    """One metric of one scenario for one system: its median over the repetitions."""

    scenario: str
    metric: str
    system: str
    value: float


class Results:
    """Every measured value, by (scenario, metric, system), then by repetition."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
        self.unavailable: dict[str, str] = {}

    def add(self, scenario: str, metric: str, system: str, repetition: int, value: float) -> None:
        """Record one value."""
        self._values[(scenario, metric, system)][repetition] = value

    def values(self, scenario: str, metric: str, system: str) -> dict[int, float]:
        """The values by repetition (empty when none was measured)."""
        return dict(self._values.get((scenario, metric, system), {}))

    def figures(self) -> list[Figure]:
        """Every (scenario, metric, system) with its median."""
        return [
            Figure(scenario, metric, system, median(list(by_rep.values())))
            for (scenario, metric, system), by_rep in self._values.items()
            if by_rep
        ]

    def line(self, scenario: str, metric: str, applies: Sequence[str]) -> str | None:
        """The printed line of one metric, or None when nothing was measured."""
        cells: list[str] = []
        measured = False
        for system in SYSTEMS:
            by_rep = self.values(scenario, metric, system)
            if by_rep:
                measured = True
                cells.append(f"{system} {number(median(list(by_rep.values())))}")
            elif system in applies and system in self.unavailable:
                cells.append(f"{system} ({self.unavailable[system]})")
            elif system in COMPARED and system not in applies:
                cells.append(f"{system} (not run)")
        if not measured:
            return None
        ratios = self._ratios(scenario, metric)
        text = f"{scenario:<10} {metric:<22} " + "  ".join(cells)
        return text + (f"  ({', '.join(ratios)})" if ratios else "")

    def _ratios(self, scenario: str, metric: str) -> list[str]:
        subject = self.values(scenario, metric, SUBJECT)
        shown = []
        for other in SYSTEMS:
            if other == SUBJECT:
                continue
            base = self.values(scenario, metric, other)
            paired = [subject[r] / base[r] for r in subject if r in base and base[r] > 0]
            if paired:
                shown.append(f"{number(median(paired))}x {other}")
        return shown


@dataclass
class Context:
    """What a scenario measures with: the meter, and how long it may wait."""

    meter: Meter
    timeout: float


class Scenario(Protocol):
    """One measurement, repeated for each system in each repetition."""

    name: str
    needs_workers: bool

    def applies_to(self, system: str) -> bool:
        """Whether ``system`` takes part (when it is available)."""
        ...

    def run(
        self,
        system: System,
        workers: Workers | None,
        repetition: int,
        results: Results,
        context: Context,
    ) -> None:
        """Measure ``system`` once and record its values."""
        ...

    def lines(self, results: Results) -> list[str]:
        """The printed lines of this scenario."""
        ...


def _lines(results: Results, scenario: Scenario, metrics: Sequence[str]) -> list[str]:
    applies = [s for s in SYSTEMS if scenario.applies_to(s)]
    found = [results.line(scenario.name, metric, applies) for metric in metrics]
    return [line for line in found if line is not None]


THROUGHPUT_METRICS = (
    "steps/s",
    "worker cpu ms/step",
    "postgres cpu ms/step",
    "round trips/step",
    "transactions/step",
    "write xacts/step",
)


class Throughput:
    """``executions`` of ``shape`` submitted at once; timed until the last one finished."""

    needs_workers = True

    def __init__(self, shape: Shape, executions: int, baseline: str | None = None) -> None:
        self.shape = shape
        self.name = shape.name
        self.executions = executions
        self.baseline = baseline  # a scenario to compare the CPU per step with

    def applies_to(self, system: str) -> bool:
        return system in COMPARED and (system != "dbos" or self.shape.kind == "chain")

    def run(
        self,
        system: System,
        workers: Workers | None,
        repetition: int,
        results: Results,
        context: Context,
    ) -> None:
        if not system.supports(self.shape):
            return
        before = context.meter.read(workers, system.databases)
        submission = system.submit(self.shape, self.executions)
        system.wait(submission, context.timeout)
        after = context.meter.read(workers, system.databases)
        system.check(submission)
        used = Usage.between(before, after)
        steps = self.shape.steps * self.executions
        values = {
            "steps/s": steps / used.seconds,
            "worker cpu ms/step": 1000 * used.worker_cpu / steps,
        }
        if system.databases:
            values["postgres cpu ms/step"] = 1000 * used.postgres_cpu / steps
            values["round trips/step"] = used.statements / steps
            values["transactions/step"] = used.transactions / steps
            values["write xacts/step"] = used.write_transactions / steps
        for metric, value in values.items():
            results.add(self.name, metric, system.name, repetition, value)
        if self.baseline is not None:
            base = results.values(self.baseline, "worker cpu ms/step", system.name)
            if repetition in base and base[repetition] > 0:
                ratio = values["worker cpu ms/step"] / base[repetition]
                results.add(
                    self.name, f"cpu/step vs {self.baseline}", system.name, repetition, ratio
                )

    def lines(self, results: Results) -> list[str]:
        extra = [f"cpu/step vs {self.baseline}"] if self.baseline else []
        return _lines(results, self, [*THROUGHPUT_METRICS, *extra])


class DepthSampler:
    """Samples a system's broker depth (messages waiting in its queue) every 20 ms in a
    thread, for the length of a ``with`` block; ``deepest`` is the largest sample."""

    def __init__(self, system: System, interval: float = 0.02) -> None:
        self._system = system
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.deepest = 0
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.deepest = max(self.deepest, self._system.broker_depth())
            self.samples += 1
            self._stop.wait(self._interval)

    def __enter__(self) -> DepthSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


MAP_METRICS = (*THROUGHPUT_METRICS[:2], "broker depth max", *THROUGHPUT_METRICS[2:])


class MapThroughput(Throughput):
    """``executions`` of a 1 -> N -> 1 map (conveyor's ``@wf.map``, 32 at a time; a
    chord of N no-op tasks and a callback for Celery), timed until the last finished,
    with the broker's depth sampled meanwhile. A step is an item (or the map's first
    or last step); ``cpu/step vs chain10`` is conveyor's CPU per item over its CPU per
    chain step in the same repetition. DBOS is not run (it has no map)."""

    def applies_to(self, system: str) -> bool:
        return system in ("celery", SUBJECT)

    def run(
        self,
        system: System,
        workers: Workers | None,
        repetition: int,
        results: Results,
        context: Context,
    ) -> None:
        with DepthSampler(system) as sampler:
            super().run(system, workers, repetition, results, context)
        results.add(self.name, "broker depth max", system.name, repetition, sampler.deepest)

    def lines(self, results: Results) -> list[str]:
        extra = [f"cpu/step vs {self.baseline}"] if self.baseline else []
        return _lines(results, self, [*MAP_METRICS, *extra])


class Latency:
    """``executions`` of ``shape`` submitted one at a time, ``interval`` seconds apart:
    from the producer's call to the first step starting."""

    name = "latency"
    needs_workers = True

    def __init__(self, shape: Shape, executions: int, interval: float) -> None:
        self.shape = shape
        self.executions = executions
        self.interval = interval

    def applies_to(self, system: str) -> bool:
        return system in COMPARED

    def run(
        self,
        system: System,
        workers: Workers | None,
        repetition: int,
        results: Results,
        context: Context,
    ) -> None:
        submission = system.submit(self.shape, self.executions, self.interval)
        system.wait(submission, context.timeout)
        system.check(submission)
        starts = system.first_starts(submission)
        waits = [1000 * (s - sent) for s, sent in zip(starts, submission.sent_at, strict=True)]
        results.add(
            self.name, "enqueue->start p50 ms", system.name, repetition, percentile(waits, 0.5)
        )
        results.add(
            self.name, "enqueue->start p95 ms", system.name, repetition, percentile(waits, 0.95)
        )

    def lines(self, results: Results) -> list[str]:
        return _lines(results, self, ["enqueue->start p50 ms", "enqueue->start p95 ms"])


class Enqueue:
    """``executions`` of the 10-step chain enqueued with no worker running: conveyor's
    ``enqueue_many`` against Celery's ``apply_async`` loop and DBOS's client loop."""

    name = "enqueue"
    needs_workers = False

    def __init__(self, executions: int) -> None:
        self.executions = executions

    def applies_to(self, system: str) -> bool:
        return system in COMPARED

    def run(
        self,
        system: System,
        workers: Workers | None,
        repetition: int,
        results: Results,
        context: Context,
    ) -> None:
        rate = system.enqueue_rate(self.executions)
        results.add(self.name, "executions/s", system.name, repetition, rate)

    def lines(self, results: Results) -> list[str]:
        return _lines(results, self, ["executions/s"])


BURST_FRACTIONS = (0.1, 0.5, 1.0)
BURST_METRICS = (
    "steps/s",
    "run s (worker start->last)",
    *(f"{round(100 * f)}% done at (of run)" for f in BURST_FRACTIONS),
    "enqueue->finish p50 s",
    "enqueue->finish p95 s",
    "finish order spearman",
)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties: mean ranks);
    0 when either is constant."""

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        ranked = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in range(start, end + 1):
                ranked[order[position]] = (start + end) / 2
            start = end + 1
        return ranked

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    covariance = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    spread = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return covariance / spread if spread > 0 else 0.0


class Burst:
    """``executions`` of the 10-step chain submitted with no worker running (conveyor:
    one ``enqueue_many``), then the workers started: throughput, and whether the
    executions finish in the order they came. The run is from the workers' start to the
    last finish. DBOS is not run; ``conveyor-bf`` is conveyor in breadth-first order.
    Runs in the first ``repetitions`` repetitions only (it is long)."""

    name = "burst"
    needs_workers = False

    def __init__(self, executions: int, repetitions: int = 1) -> None:
        self.executions = executions
        self.repetitions = repetitions

    def applies_to(self, system: str) -> bool:
        return system != "dbos"

    def run(
        self,
        system: System,
        workers: Workers | None,
        repetition: int,
        results: Results,
        context: Context,
    ) -> None:
        if repetition >= self.repetitions:
            return
        submission = system.burst(self.executions)
        started = time.time()
        with system.workers():
            # A longer wait than a workload's: the burst is many workloads long.
            system.wait(submission, context.timeout + 0.5 * self.executions)
        system.check(submission)
        finishes = system.finish_times(submission)
        for metric, value in burst_figures(
            submission.sent_at, finishes, started, submission.shape.steps
        ).items():
            results.add(self.name, metric, system.name, repetition, value)

    def lines(self, results: Results) -> list[str]:
        return _lines(results, self, BURST_METRICS)


def burst_figures(
    sent: Sequence[float], finishes: Sequence[float], started: float, steps: int
) -> dict[str, float]:
    """The burst's figures from each execution's enqueue and finish times (enqueue
    order) and the workers' start."""
    run = max(finishes) - started
    ordered = sorted(finishes)
    figures = {
        "steps/s": steps * len(finishes) / run,
        "run s (worker start->last)": run,
    }
    for fraction in BURST_FRACTIONS:
        done = ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
        figures[f"{round(100 * fraction)}% done at (of run)"] = (done - started) / run
    waits = [finish - at for finish, at in zip(finishes, sent, strict=True)]
    figures["enqueue->finish p50 s"] = percentile(waits, 0.5)
    figures["enqueue->finish p95 s"] = percentile(waits, 0.95)
    order = [float(index) for index in range(len(finishes))]
    figures["finish order spearman"] = spearman(order, finishes)
    return figures


# --- flow control (conveyor only) -------------------------------------------------------------

LIMITED, UNLIMITED = "limited", "unlimited"
RATIO = "limited/unlimited"


@dataclass
class _Tally:
    """What one variant of a paired scenario did, over its timed workloads."""

    units: int = 0
    seconds: float = 0.0
    worker_cpu: float = 0.0
    statements: int = 0
    write_transactions: int = 0

    def add(self, units: int, used: Usage) -> None:
        self.units += units
        self.seconds += used.seconds
        self.worker_cpu += used.worker_cpu
        self.statements += used.statements
        self.write_transactions += used.write_transactions


def _timed(
    system: Conveyor,
    workers: Workers | None,
    context: Context,
    submit: Callable[[], Submission],
) -> tuple[Submission, Usage]:
    """Submit, wait for every execution to finish, check they all succeeded: the
    submission and what its window cost."""
    before = context.meter.read(workers, system.databases)
    submission = submit()
    system.wait(submission, context.timeout)
    after = context.meter.read(workers, system.databases)
    system.check(submission)
    return submission, Usage.between(before, after)


def _own_lines(results: Results, scenario: str, metrics: Sequence[str]) -> list[str]:
    """Lines of a conveyor-only scenario: conveyor's median over the repetitions (the
    ratio lines' values are within-repetition ratios, so the comparison is in the line)."""
    found = []
    for metric in metrics:
        by_rep = results.values(scenario, metric, SUBJECT)
        if by_rep:
            value = number(median(list(by_rep.values())))
            found.append(f"{scenario:<13} {metric:<34} {SUBJECT} {value}")
    return found


def _as_conveyor(system: System) -> Conveyor:
    if not isinstance(system, Conveyor):
        raise BenchError(f"a conveyor-only scenario was given {system.name}")
    return system


class LimitedChain:
    """``executions`` of the 10-step chain with every step under a per-key
    ``Concurrency`` that never binds (``bench_limited_10``: a key per execution and
    step, limit 10), against the same chain without limits, in the same turn:
    unlimited, limited, limited, unlimited (so that a drift in the machine's load weighs
    on both alike), each submitted at once and timed until the last finished. Prints
    both steps/s, their ratio (goal >= 0.90), and the cost per step of each."""

    name = "limit_chain10"
    needs_workers = True
    metrics = (
        f"steps/s {UNLIMITED}",
        f"steps/s {LIMITED}",
        f"{RATIO} steps/s",
        *(
            f"{what} {variant}"
            for what in ("worker cpu ms/step", "round trips/step", "write xacts/step")
            for variant in (UNLIMITED, LIMITED)
        ),
    )

    def __init__(self, executions: int) -> None:
        self.executions = executions

    def applies_to(self, system: str) -> bool:
        return system == SUBJECT

    def run(
        self,
        system: System,
        workers: Workers | None,
        repetition: int,
        results: Results,
        context: Context,
    ) -> None:
        conveyor = _as_conveyor(system)
        inputs = [{"i": index} for index in range(self.executions)]
        names = {UNLIMITED: workflows.linear_name(CHAIN10.steps), LIMITED: workflows.LIMITED_CHAIN}
        tallies = {UNLIMITED: _Tally(), LIMITED: _Tally()}
        for variant in (UNLIMITED, LIMITED, LIMITED, UNLIMITED):
            _, used = _timed(
                conveyor,
                workers,
                context,
                partial(conveyor.submit_inputs, CHAIN10, names[variant], inputs),
            )
            tallies[variant].add(CHAIN10.steps * self.executions, used)
        rates = {}
        for variant, tally in tallies.items():
            rates[variant] = tally.units / tally.seconds
            steps = tally.units
            for metric, value in (
                ("steps/s", rates[variant]),
                ("worker cpu ms/step", 1000 * tally.worker_cpu / steps),
                ("round trips/step", tally.statements / steps),
                ("write xacts/step", tally.write_transactions / steps),
            ):
                results.add(self.name, f"{metric} {variant}", SUBJECT, repetition, value)
        ratio = rates[LIMITED] / rates[UNLIMITED]
        results.add(self.name, f"{RATIO} steps/s", SUBJECT, repetition, ratio)

    def lines(self, results: Results) -> list[str]:
        return _own_lines(results, self.name, self.metrics)


class KeyedThroughput:
    """``keys`` x ``per_key`` executions of a one-step workflow whose step is under
    ``Concurrency(key=input key, limit=1)`` (``bench_keyed``), against the same
    executions of the step without it (``bench_unkeyed``), in the same turn (which goes
    first alternates between repetitions), in the first ``repetitions`` repetitions.
    Submitted at once, in key order by default (``grouped``: a key's executions
    together, so that the limit binds: 1 of them may run, the others wait as rows) or
    ``interleaved`` (one of each key, then the seconds: the limit seldom binds, so the
    cost of admission alone), timed until the last finished. Then, from the database,
    the most steps of one key that ran at once: the run fails (BenchError) when the
    limited one is above 1; the unlimited one shows what the check sees without it."""

    needs_workers = True

    def __init__(
        self, keys: int, per_key: int, order: str = "grouped", repetitions: int = 1
    ) -> None:
        self.keys = keys
        self.per_key = per_key
        self.order = order
        self.repetitions = repetitions
        self.name = f"keys{keys}" if order == "grouped" else f"keys{keys}-{order}"
        self.metrics = (
            f"executions/s {UNLIMITED}",
            f"executions/s {LIMITED}",
            f"{RATIO} executions/s",
            f"max running per key {LIMITED}",
            f"max running per key {UNLIMITED}",
            *(
                f"{what} {variant}"
                for what in ("worker cpu ms/execution", "write xacts/execution")
                for variant in (UNLIMITED, LIMITED)
            ),
        )

    def inputs(self) -> list[dict[str, object]]:
        """The executions' inputs, in submission order."""
        pairs = [(key, index) for key in range(self.keys) for index in range(self.per_key)]
        if self.order == "interleaved":
            pairs.sort(key=lambda pair: (pair[1], pair[0]))
        return [{"key": f"k{key}", "i": key * self.per_key + index} for key, index in pairs]

    def applies_to(self, system: str) -> bool:
        return system == SUBJECT

    def run(
        self,
        system: System,
        workers: Workers | None,
        repetition: int,
        results: Results,
        context: Context,
    ) -> None:
        if repetition >= self.repetitions:
            return
        conveyor = _as_conveyor(system)
        count = self.keys * self.per_key
        shape = Shape(self.name, "chain", 1)
        inputs = self.inputs()
        names = {UNLIMITED: workflows.UNKEYED, LIMITED: workflows.KEYED}
        order = (UNLIMITED, LIMITED) if repetition % 2 == 0 else (LIMITED, UNLIMITED)
        rates = {}
        for variant in order:
            submission, used = _timed(
                conveyor,
                workers,
                context,
                partial(conveyor.submit_inputs, shape, names[variant], inputs),
            )
            most = conveyor.most_running_per_key(submission, workflows.KEYED_STEP)
            if variant == LIMITED and most > 1:
                raise BenchError(
                    f"{self.name}: a key had {most} steps running at once under a limit of 1"
                )
            rates[variant] = count / used.seconds
            note(f"{self.name} {variant}: {rates[variant]:.0f} executions/s, most per key {most}")
            for metric, value in (
                ("executions/s", rates[variant]),
                ("max running per key", most),
                ("worker cpu ms/execution", 1000 * used.worker_cpu / count),
                ("write xacts/execution", used.write_transactions / count),
            ):
                results.add(self.name, f"{metric} {variant}", SUBJECT, repetition, value)
        ratio = rates[LIMITED] / rates[UNLIMITED]
        results.add(self.name, f"{RATIO} executions/s", SUBJECT, repetition, ratio)

    def lines(self, results: Results) -> list[str]:
        return _own_lines(results, self.name, self.metrics)


def sane(figures: Sequence[Figure]) -> list[Figure]:
    """The figures that are not finite and positive (none, when all is well). CPU
    figures may be 0: the kernel counts CPU time in ticks (10 ms), and a tiny run of a
    fast system can use less than one tick of a process."""

    def ok(f: Figure) -> bool:
        at_least = 0.0 if "cpu" in f.metric else math.ulp(0.0)
        return math.isfinite(f.value) and f.value >= at_least

    return [f for f in figures if not ok(f)]


ALONE, PRUNING = "alone", "pruning"
PRUNE_RATIO = "pruning/alone"
OLD_WORKFLOW = "bench_retired"


def fill_finished(url: str, rows: int) -> None:
    """``rows`` succeeded executions of a workflow nobody registers, ended 400 days ago
    (past the default retention of 30 days), written with COPY."""
    ended = datetime.now(UTC) - timedelta(days=400)
    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    columns = (
        "execution_id, workflow_id, workflow_version, status, attempt, priority, "
        "idempotency_scope, starts_resent, depth, created_at, updated_at, finished_at"
    )
    statement = f"COPY workflow_executions ({columns}) FROM STDIN"
    with psycopg.connect(plain) as conn, conn.cursor() as cur, cur.copy(statement) as copy:
        for _ in range(rows):
            row = (str(uuid.uuid4()), OLD_WORKFLOW, 1, "succeeded", 1, 0, "", 0, 0)
            copy.write_row((*row, ended, ended, ended))
    # Vacuumed and analysed now, outside the timed window: autovacuum waking on the new
    # rows during it would weigh on the turn it fell in, not on the prune.
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE workflow_executions")


class _Pruner:
    """Retention passes (``core.retention.prune``) one after another in a thread, as
    beat's would on a backlog, until stopped; how many executions they deleted."""

    def __init__(self, system: Conveyor) -> None:
        # One batch a pass, so that it stops within a batch of being told to: what it
        # deleted is then what it deleted while the chain was timed.
        self._settings = system.settings.model_copy(update={"prune_max_batches": 1})
        self._database = Database(self._settings)
        self._manager = SyncEnhancedExecutionStateManager(self._database)
        self._stop = threading.Event()
        self.deleted = 0
        self._thread = threading.Thread(target=self._loop, name="bench-pruner", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            done = prune(self._manager.run, [], self._settings).total()
            self.deleted += done
            if not done:
                self._stop.wait(0.1)

    def __enter__(self) -> _Pruner:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._database.dispose()


class PrunedChain:
    """``executions`` of the 10-step chain while retention prunes a backlog of old
    executions from the same tables (``rows`` written with COPY before each pruning
    turn), against the chain alone, in the same turn: alone, pruning, pruning, alone.
    Prints both steps/s, their ratio (goal >= 0.90) and the executions pruned while the
    pruning turns were timed."""

    name = "prune_chain10"
    needs_workers = True
    metrics = (
        f"steps/s {ALONE}",
        f"steps/s {PRUNING}",
        f"{PRUNE_RATIO} steps/s",
        "executions pruned while timed",
    )

    def __init__(self, executions: int, rows: int) -> None:
        self.executions = executions
        self.rows = rows

    def applies_to(self, system: str) -> bool:
        return system == SUBJECT

    def run(
        self,
        system: System,
        workers: Workers | None,
        repetition: int,
        results: Results,
        context: Context,
    ) -> None:
        conveyor = _as_conveyor(system)
        inputs = [{"i": index} for index in range(self.executions)]
        name = workflows.linear_name(CHAIN10.steps)
        tallies = {ALONE: _Tally(), PRUNING: _Tally()}
        pruned = 0
        for variant in (ALONE, PRUNING, PRUNING, ALONE):
            submit = partial(conveyor.submit_inputs, CHAIN10, name, inputs)
            # Both turns on the same table: the backlog written (and vacuumed) first.
            fill_finished(conveyor.url, self.rows)
            if variant == ALONE:
                _, used = _timed(conveyor, workers, context, submit)
            else:
                with _Pruner(conveyor) as pruner:
                    _, used = _timed(conveyor, workers, context, submit)
                pruned += pruner.deleted
            tallies[variant].add(CHAIN10.steps * self.executions, used)
        rates = {variant: t.units / t.seconds for variant, t in tallies.items()}
        for variant, rate in rates.items():
            results.add(self.name, f"steps/s {variant}", SUBJECT, repetition, rate)
        ratio = rates[PRUNING] / rates[ALONE]
        results.add(self.name, f"{PRUNE_RATIO} steps/s", SUBJECT, repetition, ratio)
        results.add(self.name, "executions pruned while timed", SUBJECT, repetition, pruned)

    def lines(self, results: Results) -> list[str]:
        return _own_lines(results, self.name, self.metrics)
