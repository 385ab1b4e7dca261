"""Prometheus metrics: what workers did (counters, histograms) and what is open now (gauges
read from the database at each scrape).

The engine records into this process's ``Metrics`` (``get_metrics()``, built on first
use) where it records outcomes: admissions, claims, a step's run, retries, executions'
ends, reconciler passes. A worker started with ``CONVEYOR_METRICS_PORT`` serves them on
that port from its main process; Celery's prefork pool runs steps in child processes, so
the worker switches prometheus_client to its multiprocess mode before the pool forks:
every process writes its values to files in a directory of this worker's, and a scrape
adds them up (children that exited or were killed included: counters never go back).

The queued, running and waiting steps, and each limit key's held slots and waiting
steps, are not counted by workers but read at scrape time from the database (grouped
queries, ``core.workload`` and ``core.limits.key_states``), by the API's ``/metrics``
(``api_registry``): one answer for the whole deployment, right after any crash. Queued
steps are counted by workflow and queue (``queue=``), so a queue no worker consumes
shows its backlog growing instead of stalling silently.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from threading import Thread
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from celery.signals import worker_init, worker_process_shutdown, worker_shutdown
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from core.database import Database, get_database
from core.failures import backfill_all, group_count
from core.limits import key_states
from core.outcomes import Admission, Claim, ReconcileReport, TransitionResult
from core.registry import get_registry
from core.states import StepStatus
from core.workload import open_steps

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
# Steps run from milliseconds to an hour; queue waits and passes are shorter.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """conveyor's counters and histograms, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.executions_started = Counter(
            "conveyor_executions_started",
            "Executions admitted (pending -> running).",
            ["workflow"],
            registry=registry,
        )
        self.executions_finished = Counter(
            "conveyor_executions_finished",
            "Executions that ended, by final status.",
            ["workflow", "status"],
            registry=registry,
        )
        self.step_duration = Histogram(
            "conveyor_step_duration_seconds",
            "Run time of a step's code, each attempt that returned or raised.",
            ["workflow", "step"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.step_queue_wait = Histogram(
            "conveyor_step_queue_wait_seconds",
            "Time a step was queued and due before a worker claimed it.",
            ["workflow", "step"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.step_retries = Counter(
            "conveyor_step_retries",
            "Failed attempts of a step scheduled to run again by its retry policy.",
            ["workflow", "step"],
            registry=registry,
        )
        self.crash_recoveries = Counter(
            "conveyor_crash_recoveries",
            "Stalled steps (their worker died) requeued by the reconciler.",
            ["workflow"],
            registry=registry,
        )
        self.reconcile_duration = Histogram(
            "conveyor_reconcile_duration_seconds",
            "Duration of a reconciler pass (its transaction and what it publishes).",
            buckets=PASS_BUCKETS,
            registry=registry,
        )
        self.reconciled = Counter(
            "conveyor_reconciled",
            "What reconciler passes found and did, by kind.",
            ["kind"],
            registry=registry,
        )
        self.waits_woken = Counter(
            "conveyor_waits_woken",
            "Waits that ended or were re-armed, by kind (sleep, event, child) and how "
            "(due, early, event, signal, child, timeout, failed).",
            ["workflow", "kind", "how"],
            registry=registry,
        )
        self.wake_lag = Histogram(
            "conveyor_wake_lag_seconds",
            "How long after its wake time the waker woke a sleep.",
            ["workflow"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.wake_duration = Histogram(
            "conveyor_wake_pass_seconds",
            "Duration of a waker pass over due waits (its transactions and publishing).",
            buckets=PASS_BUCKETS,
            registry=registry,
        )
        self.map_items = Counter(
            "conveyor_map_items",
            "Items of map steps, by what happened to them: expanded (admitted to run), "
            "succeeded, failed (for good), retried, recovered (worker lost).",
            ["workflow", "step", "result"],
            registry=registry,
        )
        self.steps_held = Counter(
            "conveyor_steps_held",
            "Fan-out siblings a worker held for itself (queued, no message), and those it "
            "handed to the broker when the hold ran out (CONVEYOR_HOLD_SECONDS).",
            ["workflow", "how"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "conveyor_rate_limited",
            "Starts a rate limit or a paused key held back (the step waits, with no "
            "message, until it may start), by workflow and key.",
            ["workflow", "key"],
            registry=registry,
        )
        self.admissions = Counter(
            "conveyor_key_admissions",
            "Admissions of steps behind limits: admitted, or held (concurrency, rate, paused).",
            ["workflow", "result"],
            registry=registry,
        )
        self.steps_skipped = Counter(
            "conveyor_steps_skipped",
            "Steps skipped without running (or after their attempts, optional ones), by "
            "why: condition (when= was false), upstream (the trigger refused an upstream "
            'step\'s outcome), exhausted (Retry(on_exhausted="skip")).',
            ["workflow", "step", "why"],
            registry=registry,
        )
        self.events_sent = Counter(
            "conveyor_events",
            "Events and signals sent, by outcome (consumed, stored, duplicate).",
            ["outcome"],
            registry=registry,
        )
        self.debounced = Counter(
            "conveyor_debounced",
            "Enqueues of a debounced workflow collapsed into the open window of their key "
            "(an execution already pending), counted by the process that enqueued.",
            ["workflow"],
            registry=registry,
        )

        self.pruned_total = Counter(
            "conveyor_pruned",
            "Retention: finished executions deleted past their retention "
            "(what=executions), and those whose payloads were cleared (what=payloads).",
            ["workflow", "what"],
            registry=registry,
        )
        self.operator_actions = Counter(
            "conveyor_operator_actions",
            "Operators' repairs of failed executions: resolve (a failed step given an "
            "output), skip (a failed step skipped), retry_group (a failure group retried).",
            ["action"],
            registry=registry,
        )
        self.steps_handed_back = Counter(
            "conveyor_steps_handed_back",
            "Steps a worker claimed but handed back because its code's shape may not "
            "finish their execution (a rolling deploy): sent to a live worker with a "
            "compatible shape (how=sent) or left waiting for one (how=waiting).",
            ["workflow", "how"],
            registry=registry,
        )

    def admitted(self, workflow: str, admission: Admission) -> None:
        """Executions an admission started."""
        if admission.started:
            self.executions_started.labels(workflow).inc(len(admission.started))

    def claimed(self, claim: Claim) -> None:
        """A step claimed to run here: how long it waited."""
        self.step_queue_wait.labels(claim.route.workflow, claim.step_name).observe(claim.waited)

    @contextmanager
    def running(self, claim: Claim) -> Iterator[None]:
        """Time a step's code, whether it returns or raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.step_duration.labels(claim.route.workflow, claim.step_name).observe(elapsed)

    def retried(self, claim: Claim, moved: TransitionResult) -> None:
        """A failed attempt the retry policy runs again (when the retry was recorded)."""
        if moved.applied:
            self.step_retries.labels(claim.route.workflow, claim.step_name).inc()

    def ended(self, workflow: str, execution: TransitionResult | None) -> None:
        """An execution's final transition, when a write made one."""
        if execution is not None and execution.applied:
            self.executions_finished.labels(workflow, execution.to_status).inc()

    def wait_ended(self, workflow: str, kind: str, how: str) -> None:
        """A wait ended (or was re-armed for a retry)."""
        self.waits_woken.labels(workflow, kind, how).inc()

    def items(self, workflow: str, step: str, result: str, count: int = 1) -> None:
        """Items of a map step that were expanded, succeeded, failed, retried, ..."""
        if count:
            self.map_items.labels(workflow, step, result).inc(count)

    def held(self, workflow: str, how: str, count: int) -> None:
        """Fan-out siblings held (``held``) or handed off to the broker (``handed_off``)."""
        if count:
            self.steps_held.labels(workflow, how).inc(count)

    def limited(self, workflow: str, key: str, what: str) -> None:
        """A step behind limits admitted, or held (``what``: concurrency, rate, paused)."""
        self.admissions.labels(workflow, what).inc()
        if what in ("rate", "paused"):
            self.rate_limited.labels(workflow, key).inc()

    def pruned(self, workflow: str, what: str, count: int) -> None:
        """A retention pass's deletions ("succeeded", "failed") or clearings ("payloads")."""
        kind = "payloads" if what == "payloads" else "executions"
        self.pruned_total.labels(workflow, kind).inc(count)

    def operator_action(self, action: str, count: int = 1) -> None:
        """Operators' repairs of executions (resolve, skip, a failure group's retry)."""
        self.operator_actions.labels(action).inc(count)

    def handed_back(self, workflow: str, *, waiting: bool) -> None:
        """A step handed back for a worker with a compatible shape."""
        self.steps_handed_back.labels(workflow, "waiting" if waiting else "sent").inc()

    def skipped(self, workflow: str, step: str, why: str) -> None:
        """A step skipped: ``why`` is condition, upstream or exhausted."""
        self.steps_skipped.labels(workflow, step, why).inc()

    def woke_late(self, workflow: str, seconds: float) -> None:
        """A sleep the waker woke, ``seconds`` after its wake time."""
        self.wake_lag.labels(workflow).observe(seconds)

    def wake_pass(self, seconds: float, taken: int) -> None:
        """One waker pass: its duration (``taken``: due waits it took)."""
        self.wake_duration.observe(seconds)

    def collapsed(self, workflow: str, count: int) -> None:
        """Enqueues that an open debounce window took (no new execution)."""
        self.debounced.labels(workflow).inc(count)

    def event_sent(self, outcome: str) -> None:
        """An event or signal: consumed by a wait, stored for one to come, or a duplicate."""
        self.events_sent.labels(outcome).inc()

    def reconciled_pass(self, report: ReconcileReport, seconds: float, *, unsent: int = 0) -> None:
        """One reconciler pass: its duration, what it did, the executions it ended;
        ``unsent``: step and start messages it failed to publish (due again at the next
        pass)."""
        self.reconcile_duration.observe(seconds)
        kinds = {
            "stalled_requeued": len(report.requeued),
            "stalled_failed": len(report.stalled_failed),
            "republished": len(report.republish) - len(report.requeued),
            "publish_failed": unsent,
            "starts_resent": len(report.start),
            "timed_out": len(report.timed_out),
            "finished": len(report.finished),
            "events_expired": report.events_expired,
            "items_requeued": report.items_recovered,
            "items_crashed": report.items_crashed,
            "items_republished": report.items_republished,
        }
        for kind, count in kinds.items():
            self.reconciled.labels(kind).inc(count)  # every kind present, 0 included
        for execution_id, _ in report.requeued:
            workflow = report.workflows.get(execution_id, "")
            self.crash_recoveries.labels(workflow).inc()
        for execution_id, status in report.ended.items():
            workflow = report.workflows.get(execution_id, "")
            self.executions_finished.labels(workflow, status).inc()


@cache
def get_metrics() -> Metrics:
    """This process's metrics, built on first use (after a worker chose their mode)."""
    return Metrics(CollectorRegistry())


# The queue of a step: (workflow, version, step) -> queue name.
QueueOf = Callable[[str, int, str], str]


def registered_queue(workflow: str, version: int, step: str) -> str:
    """The queue of a step of a workflow of the process's registry (see
    ``WorkflowRegistry.queue_of``)."""
    return get_registry().queue_of(workflow, version, step)


class OpenStepsCollector:
    """Gauges of queued steps by workflow and queue (``queue_of``: a step's queue;
    default: the process's registry), of running ones by workflow, and of waiting ones by
    workflow and wait kind, read from ``database`` (default: the process's) at each
    scrape; a scrape without them, and a warning, while the database is unreachable."""

    def __init__(self, database: Database | None = None, queue_of: QueueOf | None = None) -> None:
        self.database = database
        self.queue_of = queue_of or registered_queue

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        return {
            StepStatus.QUEUED.value: GaugeMetricFamily(
                "conveyor_steps_queued",
                "Steps queued now (waiting or due), by the broker queue they go to.",
                labels=["workflow", "queue"],
            ),
            StepStatus.RUNNING.value: GaugeMetricFamily(
                "conveyor_steps_running", "Steps running now.", labels=["workflow"]
            ),
            StepStatus.WAITING.value: GaugeMetricFamily(
                "conveyor_steps_waiting",
                "Steps waiting now, holding no worker, by kind: sleep, event, child, map, key "
                "(behind limits), version (handed back for a worker with a compatible shape).",
                labels=["workflow", "kind"],
            ),
        }

    def describe(self) -> Iterable[Metric]:
        """The families ``collect`` yields (so registering runs no query)."""
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        """The counts, from one query."""
        families = self._families()
        try:
            with (self.database or get_database()).engine.connect() as conn:
                counts = open_steps(conn)
        except Exception:
            log.warning("metrics: could not count open steps", exc_info=True)
            return []
        queued: dict[tuple[str, str], int] = {}
        for count in counts:
            if count.status == StepStatus.QUEUED.value:
                assert count.version is not None
                assert count.step is not None
                key = (count.workflow, self.queue_of(count.workflow, count.version, count.step))
                queued[key] = queued.get(key, 0) + count.count
                continue
            labels = [count.workflow] if count.kind is None else [count.workflow, count.kind]
            families[count.status].add_metric(labels, count.count)
        for (workflow, queue), total in sorted(queued.items()):
            families[StepStatus.QUEUED.value].add_metric([workflow, queue], total)
        return list(families.values())


class KeysCollector:
    """Gauges of each concurrency or rate-limit key's slots held and steps waiting, read
    from ``database`` (default: the process's) at each scrape by ``core.limits.key_states``
    (a few grouped statements, whatever the number of keys); one series per key, so a key
    function over many tenants makes as many. A scrape without them, and a warning,
    while the database is unreachable."""

    def __init__(self, database: Database | None = None) -> None:
        self.database = database

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "conveyor_key_running",
                "Slots held under a concurrency key now (steps or executions admitted, not ended).",
                labels=["key"],
            ),
            GaugeMetricFamily(
                "conveyor_key_waiting",
                "Steps waiting for a key now (a free slot, its rate, or the end of its pause).",
                labels=["key"],
            ),
        )

    def describe(self) -> Iterable[Metric]:
        """The families ``collect`` yields (so registering runs no query)."""
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        """Every key's counts."""
        running, waiting = self._families()
        try:
            with (self.database or get_database()).engine.connect() as conn:
                states = key_states(conn)
        except Exception:
            log.warning("metrics: could not count the keys' slots", exc_info=True)
            return []
        for state in states:
            running.add_metric([state.key], state.running)
            waiting.add_metric([state.key], state.waiting)
        return [running, waiting]


class FailuresCollector:
    """The gauge of failure groups now (``core.failures``): one number, whatever the
    groups, so that an alert fires on a new kind of failure without a series per group
    (``conveyor failures`` and ``GET /failures`` say which)."""

    def __init__(self, database: Database | None = None) -> None:
        self.database = database

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "conveyor_failure_groups",
            "Failure groups now: kinds of failure among failed steps (workflow, step, error "
            "type, normalised message).",
        )

    def describe(self) -> Iterable[Metric]:
        """The family ``collect`` yields (so registering runs no query)."""
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        """The count, grouping failed steps not grouped yet first."""
        family = self._family()
        try:
            with (self.database or get_database()).engine.begin() as conn:
                backfill_all(conn)
                family.add_metric([], group_count(conn))
        except Exception:
            log.warning("metrics: could not count the failure groups", exc_info=True)
            return []
        return [family]


class _ProcessMetrics:
    """This process's counters and histograms, as a collector of another registry."""

    def collect(self) -> Iterable[Metric]:
        return get_metrics().registry.collect()


def api_registry(
    database: Database | None = None, queue_of: QueueOf | None = None
) -> CollectorRegistry:
    """What the API's ``/metrics`` serves: queued and running steps, the keys' counts and
    the failure groups
    from ``database`` (default: the process's; queued ones by the queue ``queue_of``
    names), and this process's counters (every process's, when the API runs with
    ``PROMETHEUS_MULTIPROC_DIR`` set)."""
    registry = CollectorRegistry()
    registry.register(OpenStepsCollector(database, queue_of))
    registry.register(KeysCollector(database))
    registry.register(FailuresCollector(database))
    if os.environ.get(MULTIPROC_DIR):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ProcessMetrics())
    return registry


# --- a worker's server, and prometheus_client's multiprocess mode --------------------


class _WorkerServer:
    """The HTTP server of this worker's main process, and its metric files' directory."""

    server: WSGIServer | None = None
    thread: Thread | None = None
    directory: str | None = None


def use_multiprocess_mode() -> str:
    """Give this worker a fresh directory of metric files (under ``PROMETHEUS_MULTIPROC_DIR``
    when it is set, else the system's temporary directory) and record every metric built
    from now on, here and in the processes forked from here, in its files."""
    directory = tempfile.mkdtemp(prefix="conveyor-metrics-", dir=os.environ.get(MULTIPROC_DIR))
    os.environ[MULTIPROC_DIR] = directory  # inherited by the pool's children
    # prometheus_client chooses its value class when it is imported, from the variable;
    # it was imported before the worker read its settings.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    get_metrics.cache_clear()
    return directory


def serve_worker_metrics(port: int) -> None:
    """Serve the metrics of this worker and its pool's processes on ``port``."""
    directory = use_multiprocess_mode()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    try:
        server, thread = start_http_server(port, registry=registry)
    except OSError:
        # The worker's job is running steps: it runs on, unmeasured.
        log.error("metrics: cannot serve on port %d", port, exc_info=True)
        return
    _WorkerServer.server, _WorkerServer.thread = server, thread
    _WorkerServer.directory = directory
    log.info("metrics: serving on port %d (files in %s)", port, directory)


@worker_init.connect
def _serve_when_configured(sender: Any = None, **_: Any) -> None:
    # In the main worker process, before the pool forks.
    engine = getattr(getattr(sender, "app", None), "engine", None)
    port = getattr(getattr(engine, "settings", None), "metrics_port", None)
    if port is not None and _WorkerServer.server is None:
        serve_worker_metrics(port)


@worker_process_shutdown.connect
def _mark_child_dead(pid: int | None = None, **_: Any) -> None:
    # A pool child exiting: its live gauges' files go (its counters stay counted).
    if os.environ.get(MULTIPROC_DIR):
        multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]


@worker_shutdown.connect
def _stop_serving(**_: Any) -> None:
    server, directory = _WorkerServer.server, _WorkerServer.directory
    if server is None:
        return
    server.shutdown()
    server.server_close()
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
    _WorkerServer.server = _WorkerServer.thread = _WorkerServer.directory = None
