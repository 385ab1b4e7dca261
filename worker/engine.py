"""The step engine: a step's life on a worker, from its message to what it sets in motion.

claim (``core.steps.claim``) -> run the step's code (no transaction open) -> record its
outcome in one transaction (``core.steps.complete``, or a retry or failure) -> publish
what that transaction released (commit, then publish) -> continue: run the next
released step of the same execution here, claimed by the completing transaction,
without a broker round trip, within a bound (``CONVEYOR_CONTINUE_MAX_STEPS`` and
``CONVEYOR_CONTINUE_MAX_SECONDS``) so a long chain cannot starve other work.

A fan-out continues one released step and **holds** the others (``_Held``): they stay
queued with no message, and the worker claims them one after another in the
completions of the steps it runs, as a chain. Within ``CONVEYOR_HOLD_SECONDS`` of the
hold, whatever is still held is handed off to the broker (at a step boundary, or by the
heartbeat thread while a step still runs), so one slow branch delays its siblings by at
most that long. A worker that dies holding steps loses none: they fall due
``HOLD_GRACE`` seconds after the hold's bound and the reconciler sends them.

Every transition is a compare-and-set in ``core``; the engine only decides what to
ask for and publishes what a committed transaction queued.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable, KeysView, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded

from core import (
    children,
    conditions,
    debounce,
    executions,
    failures,
    limits,
    map_repair,
    reconciler,
    repair,
    retention,
    shapes,
    steps,
    waker,
)
from core.config import Settings
from core.database import Database, get_database
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.errors import (
    InputValidationError,
    InvalidTransition,
    OutputNotStorable,
    StepTimedOut,
    TransientDatabaseError,
    WorkflowNotFound,
)
from core.failures import BulkAction
from core.outcomes import Admission, Claim, ReconcileReport, Route, WaitOutcome
from core.registry import WorkflowRegistry
from core.shapes import shape_of
from core.states import StepStatus
from core.transactions import RetryPolicy
from core.workflows import Step, Workflow
from worker.config import WAKE, broker_priority
from worker.context import RunningStep
from worker.failures import StepFailed
from worker.heartbeat import Deadline, Heartbeat
from worker.items import ItemRunner
from worker.logs import step_context
from worker.metrics import Metrics, get_metrics
from worker.tracing import Tracing

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

RUN_STEP = "conveyor.run_step"
START_EXECUTION = "conveyor.start_execution"
START_BATCH = "conveyor.start_batch"
# Executions of one workflow and priority started by one ``conveyor.start_batch`` message:
# ``enqueue_many`` of 1,000 sends 10 messages, not 1,000 (a publish costs the producer
# about 0.4 ms, its whole insert 0.1 ms per execution).
START_BATCH_SIZE = 100
TRACEBACK_LIMIT = 16_000
MESSAGE_LIMIT = 4_000
# Recording an outcome after the step's code ran is worth waiting for: if the database
# is restarting, keep trying for about two minutes before leaving it to stall recovery.
PATIENT = RetryPolicy(attempts=40, initial_wait=0.1, max_wait=5.0)

StepKey = tuple[str, str]
# A start message's (execution_id, workflow, priority).
Start = tuple[str, str, int]
T = TypeVar("T")
# Failed publishes in a row after which a reconciler pass takes the broker to be down
# and leaves the rest of its messages for the next pass.
BROKER_DOWN_AFTER = 3
# Seconds past the hold's bound (CONVEYOR_HOLD_SECONDS) before steps a worker holds fall
# due to the reconciler: a live worker hands them off well within it (its heartbeat
# thread does it on time even while a step runs), so only a dead worker's are taken.
HOLD_GRACE = 2.0


def _send_each(
    items: Sequence[T], send: Callable[[T], None], describe: Callable[[T], str], kind: str
) -> list[T]:
    """Send each item's message on its own (``send``): one that fails (logged, naming
    it with ``describe``) does not keep the others from being sent. The items whose
    message was not sent.

    After a few failures in a row the broker is taken to be down, and the rest are not
    tried: each attempt would wait out the publish retries, holding the pass (and its
    pool process) for minutes on a large batch.
    """
    failed: list[T] = []
    in_a_row = 0
    for index, item in enumerate(items):
        if in_a_row == BROKER_DOWN_AFTER:
            log.warning(
                "%d publishes failed in a row; %d more %s message(s) left for the next pass",
                in_a_row,
                len(items) - index,
                kind,
            )
            return failed + list(items[index:])
        try:
            send(item)
        except Exception:
            log.warning("publishing %s failed", describe(item), exc_info=True)
            failed.append(item)
            in_a_row += 1
        else:
            in_a_row = 0
    return failed


def error_record(error: BaseException) -> dict[str, Any]:
    """An exception as stored on a failed step: type, message, traceback; always storable
    (see ``storable_text``), whatever the exception holds."""
    record = bare_error_record(error)
    try:
        message, text = str(error), "".join(traceback.format_exception(error))
    except Exception:  # an exception whose __str__ raises: keep what can be had
        return record
    record["message"] = storable_text(message, MESSAGE_LIMIT)
    record["traceback"] = storable_text(text, TRACEBACK_LIMIT, keep_end=True)
    return record


def bare_error_record(error: BaseException) -> dict[str, Any]:
    """An exception's type alone, as stored when nothing more of it can be."""
    kind = type(error)
    return {
        "type": kind.__name__ if kind.__module__ == "builtins" else kind.__qualname__,
        "module": kind.__module__,
        "message": f"({kind.__name__} whose message could not be stored)",
        "traceback": "",
    }


def storable_text(text: str, limit: int, *, keep_end: bool = False) -> str:
    """``text`` as an error record stores it: each NUL character written as ``\\x00``
    and each lone surrogate as ``\\udcXX`` (PostgreSQL's JSONB refuses both), at most
    ``limit`` characters, cut with a marker at the start (``keep_end``: a traceback's
    last frames matter most) or at the end."""
    # Lone surrogates come from bytes decoded with "surrogateescape", say.
    text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()
    if len(text) <= limit:
        return text
    marker = f"[... {len(text) - limit} characters cut ...]"
    return marker + text[-limit:] if keep_end else text[:limit] + marker


def storable_output(step: str, value: Any, max_bytes: int) -> str | None:
    """A step's output as the JSON text its row stores (None for None), checked once,
    here, before anything is recorded (``core.executions.check_payload``: storable
    JSON no larger than ``max_bytes``); else OutputNotStorable naming the step."""
    if value is None:
        return None
    try:
        return executions.check_payload("output_data", value, max_bytes)
    except InputValidationError as problem:
        raise OutputNotStorable(step, str(problem)) from None


def _unlimited(step: Step) -> bool:
    """Whether a step may run under another step's Celery task (it has no time limits)."""
    return step.soft_timeout is None and step.timeout is None


def start_queue(workflow: Workflow, default: str) -> str:
    """The queue of a workflow's start messages: the worker that takes one runs a root
    step at once (``Engine.admit``), so it goes to the queue of its root steps; roots on
    several queues, or a workflow with wait nodes (admitted without a claim): the
    workflow's queue, whose worker claims no root (it publishes each to its own)."""
    if not workflow.routed:
        return default
    if workflow.wait_nodes:  # admitted with no root claimed (see Engine.admit)
        return workflow.queue or default
    steps_ = workflow.steps.values()
    roots = {workflow.queue_of(s.name, default) for s in steps_ if not s.depends_on}
    return roots.pop() if len(roots) == 1 else workflow.queue or default


class _Held:
    """The sibling steps one chain of this worker holds (queued, no message sent): one
    is taken for each step boundary that continues nothing else, until ``due`` (a
    monotonic time); then whatever is left is handed off (``close``), once.

    Shared by the chain's thread and the heartbeat thread (the hand-off on time), so
    every change is under a lock; the claims themselves are compare-and-sets in SQL, so
    a step taken by the chain and handed off at once still runs once.
    """

    def __init__(self, execution_id: str, route: Route, due: float) -> None:
        self.execution_id = execution_id
        self.route = route
        self.due = due
        self.deadline: Deadline | None = None
        self._steps: list[steps.HeldStep] = []
        self._open = True
        self._lock = threading.Lock()

    def add(self, held: Sequence[steps.HeldStep]) -> bool:
        """Hold ``held`` too; False when this group was handed off already."""
        with self._lock:
            if self._open:
                self._steps.extend(held)
            return self._open

    def next(self) -> steps.HeldStep | None:
        """The held step to claim at this boundary if it continues nothing else (it stays
        held until ``claimed``); None when there is none, or the hold's time is up (the
        rest goes to the broker)."""
        with self._lock:
            if not self._open or not self._steps or time.monotonic() >= self.due:
                return None
            return self._steps[0]

    def claimed(self, step: steps.HeldStep) -> None:
        """``step`` was claimed by this worker: no longer held."""
        with self._lock:
            if step in self._steps:
                self._steps.remove(step)

    def close(self) -> list[str]:
        """End the hold: the names still held, to hand off (empty the second time)."""
        with self._lock:
            self._open = False
            names = [step.name for step in self._steps]
            self._steps.clear()
            return names

    @property
    def open(self) -> bool:
        with self._lock:
            return self._open

    @property
    def empty(self) -> bool:
        with self._lock:
            return not self._steps


class _Chain:
    """What one chain of continued steps carries from step to step: its held siblings."""

    def __init__(self) -> None:
        self.held: _Held | None = None


class Engine:
    """Runs workflows on one Celery app against conveyor's state database."""

    def __init__(self, app: Celery, settings: Settings, registry: WorkflowRegistry) -> None:
        self.app = app
        self.settings = settings
        self.registry = registry
        # The process's database when it is the one these settings name (one pool per
        # process); an app built for another database gets its own.
        current = get_database()
        same = current.settings.database_url == settings.database_url
        database = current if same else Database(settings)
        self.manager = SyncEnhancedExecutionStateManager(database)
        self.recorder = SyncEnhancedExecutionStateManager(database, retry_policy=PATIENT)
        self.heartbeats = Heartbeat(self.manager, settings.heartbeat_interval)
        self.tracing = Tracing(settings.tracing)
        self.items = ItemRunner(self)
        self._queues: Any = None  # Celery's Queues of this app (see consumed_queues)

    @property
    def worker_id(self) -> str:
        """Who claims steps: this host and process (see Heartbeat.worker_id)."""
        return self.heartbeats.worker_id

    @property
    def consumed_queues(self) -> KeysView[str]:
        """The broker queues this worker consumes: Celery's own selection, made by
        ``celery worker -Q``/``-X`` (``Queues.select``/``deselect``) in the main process
        before the pool forks, so its children see it too; without ``-Q``, the default
        queue. Read at each use, not at import or ``worker_init``: an app built first
        and made a worker later (tests, embedding) selects its queues only then."""
        if self._queues is None:
            # The app's one Queues object (cached by Celery, its lookup ~2 us): its
            # selection changes in place when the worker starts, so it is kept, not copied.
            self._queues = self.app.amqp.queues
        consumed: dict[str, Any] = self._queues.consume_from
        return consumed.keys()

    def runnable_here(self, workflow: Workflow, names: Sequence[str]) -> list[str] | None:
        """Of the steps ``names`` of ``workflow``, those whose queue this worker
        consumes, which it may continue or hold; None when it may run every one (a
        workflow with no ``queue=`` on a worker of the default queue)."""
        consumed = self.consumed_queues
        default = self.settings.default_queue
        if not workflow.routed and default in consumed:
            return None
        return [name for name in names if workflow.queue_of(name, default) in consumed]

    def queue_of(self, workflow: str, version: int, step_name: str) -> str:
        """The queue a step's messages go to (the default queue for a workflow or step
        this process does not know, as ``publish_steps`` sends them)."""
        return self.registry.queue_of(workflow, version, step_name, self.settings.default_queue)

    def _start_queue(self, workflow_name: str) -> str:
        try:
            workflow = self.registry.get(workflow_name)
        except WorkflowNotFound:  # refused by the worker's admission, wherever it goes
            return self.settings.default_queue
        return start_queue(workflow, self.settings.default_queue)

    @property
    def metrics(self) -> Metrics:
        """This process's metrics (``worker.metrics``), built on first use."""
        return get_metrics()

    def definition(self, workflow: str, version: int) -> Workflow | None:
        """The registered workflow, or None when this process does not know it."""
        try:
            return self.registry.get(workflow, version)
        except WorkflowNotFound:
            return None

    # --- publishing (always after the commit that made the work) -------------------

    def publish_starts(self, starts: Iterable[tuple[str, str, int]]) -> None:
        """Send the start messages of (execution_id, workflow, priority): executions of
        one workflow and priority together, ``START_BATCH_SIZE`` a message
        (``conveyor.start_batch``); one alone as ``conveyor.start_execution``."""
        headers = self.tracing.headers()
        groups: dict[tuple[str, int], list[str]] = {}
        for execution_id, workflow, priority in starts:
            groups.setdefault((workflow, priority), []).append(execution_id)
        with self.app.producer_or_acquire() as producer:
            for (workflow, priority), ids in groups.items():
                if len(ids) == 1:
                    continue
                for first in range(0, len(ids), START_BATCH_SIZE):
                    chunk = ids[first : first + START_BATCH_SIZE]
                    self._send_batch(chunk, workflow, priority, "start", producer, headers)
            singles = [(ids[0], w, p) for (w, p), ids in groups.items() if len(ids) == 1]
            for execution_id, workflow, priority in singles:
                self.app.send_task(
                    START_EXECUTION,
                    # Keyword arguments, so Flower shows what each value is.
                    kwargs={"execution_id": execution_id, "workflow": workflow},
                    priority=broker_priority(self.settings, priority, kind="start"),
                    queue=self._start_queue(workflow),
                    producer=producer,
                    # The name Celery's logs, events and Flower show (see README).
                    shadow=f"{START_EXECUTION}:{workflow}",
                    headers=headers,
                )

    def _send_batch(
        self,
        ids: Sequence[str],
        workflow: str,
        priority: int,
        kind: str,
        producer: Any,
        headers: dict[str, Any] | None,
    ) -> None:
        self.app.send_task(
            START_BATCH,
            kwargs={"execution_ids": list(ids), "workflow": workflow, "priority": priority},
            priority=broker_priority(self.settings, priority, kind=kind),
            queue=self._start_queue(workflow),
            producer=producer,
            shadow=f"{START_BATCH}:{workflow}[{len(ids)}]",
            headers=headers,
        )

    def start_batch(self, execution_ids: Sequence[str], workflow: str, priority: int) -> None:
        """A ``conveyor.start_batch`` message: the rest of the batch goes back to the
        broker as one message at *step* priority (ahead of the starts not yet taken,
        so a taken batch keeps its place, and behind no running execution's step), then
        the first execution is admitted and its root step run here, as a start message
        does. Executions start one at a time, as workers come free: a burst still
        finishes in the order it came. Breadth-first (``CONVEYOR_ORDER``): all at once."""
        if self.settings.order != "depth_first":
            # Breadth-first: arrival order, every start ahead of the steps it releases.
            self.admit(workflow, list(execution_ids), run_here=True)
            return
        first, rest = execution_ids[0], list(execution_ids[1:])
        if rest:
            try:
                with self.app.producer_or_acquire() as producer:
                    headers = self.tracing.headers()
                    self._send_batch(rest, workflow, priority, "step", producer, headers)
            except Exception:  # committed and pending: the reconciler starts them
                log.warning(
                    "publishing the rest of a start batch (%d executions) failed; the "
                    "reconciler will start them",
                    len(rest),
                    exc_info=True,
                )
        self.admit(workflow, [first], run_here=True)

    def publish_steps(
        self,
        keys: Sequence[StepKey],
        route: Route | Mapping[str, Route] | None = None,
        *,
        countdown: float | None = None,
        queue: str | None = None,
    ) -> None:
        """Send a run message for each step; a known ``route`` (one, or one per execution)
        saves looking it up; ``queue`` overrides the steps' own (a shape's queue)."""
        if not keys:
            return
        routes: Mapping[str, Route]
        if isinstance(route, Route):
            routes = {execution_id: route for execution_id, _ in keys}
        elif route is not None:
            routes = route
        else:
            routes = self.manager.run(executions.execution_routes, sorted({k[0] for k in keys}))
        headers = self.tracing.headers()
        with self.app.producer_or_acquire() as producer:
            for execution_id, step_name in keys:
                target = routes.get(execution_id)
                kwargs: dict[str, Any] = {"execution_id": execution_id, "step_name": step_name}
                options: dict[str, Any] = {
                    "headers": headers,
                    "queue": self.settings.default_queue,
                }
                if target is not None:
                    # The claim then knows the step's upstream steps before it runs.
                    kwargs.update(workflow=target.workflow, version=target.version)
                    options["priority"] = broker_priority(self.settings, target.priority)
                    options["shadow"] = f"{RUN_STEP}:{target.workflow}.{step_name}"
                    workflow = self.definition(target.workflow, target.version)
                    step = workflow.steps.get(step_name) if workflow else None
                    if step is not None:
                        options["soft_time_limit"] = step.soft_timeout
                        options["time_limit"] = step.timeout
                        assert workflow is not None
                        options["queue"] = workflow.queue_of(step_name, self.settings.default_queue)
                if queue is not None:
                    options["queue"] = queue
                self.app.send_task(
                    RUN_STEP, kwargs=kwargs, countdown=countdown, producer=producer, **options
                )

    def _publish_committed(
        self,
        keys: Sequence[StepKey],
        route: Route | Mapping[str, Route] | None = None,
        *,
        countdown: float | None = None,
        queue: str | None = None,
    ) -> None:
        """``publish_steps`` for steps a transaction just committed as queued; a failure
        is logged, not raised: the reconciler sends queued steps nobody claimed
        (``CONVEYOR_REPUBLISH_AFTER``), and raising here would abandon the step this
        worker claimed in the same transaction to run next (running, to be recovered only
        past the stall timeout)."""
        try:
            self.publish_steps(keys, route, countdown=countdown, queue=queue)
        except Exception:
            log.warning(
                "publishing %d step message(s) (%s) failed after their commit; the reconciler "
                "will send them",
                len(keys),
                ", ".join(f"{execution_id}/{name}" for execution_id, name in keys),
                exc_info=True,
            )

    # --- executions ------------------------------------------------------------------

    def admit(
        self, workflow_name: str, execution_ids: Sequence[str], *, run_here: bool = False
    ) -> Admission:
        """Start what may start (concurrency limit, priority, FIFO) and publish its roots;
        with ``run_here`` (a start message), run one root step in this worker at once
        (which raises ``StepFailed`` when it failed: see ``_run_from``)."""
        try:
            workflow: Workflow | None = self.registry.get(workflow_name)
        except WorkflowNotFound:
            workflow = None
        ids = list(execution_ids)
        claim: Claim | None = None
        roots = [s for s in workflow.steps.values() if not s.depends_on] if workflow else []
        # Breadth-first order starts everything first: its roots wait their turn.
        depth_first = self.settings.order == "depth_first"
        if workflow is not None and (workflow.wait_nodes or workflow.gated):
            # Its waits enter waiting at the start (root waits, and after a retry those
            # whose upstream steps had succeeded), and its gated steps queued at the start
            # are decided (a root's condition): admitted without the fused claim.
            admission, woken = self.manager.run(conditions.admit, workflow, ids, self.definition)
            self._admitted(workflow_name, admission)
            self._publish_committed(admission.queued, admission.routes)
            self.publish_outcome(woken)
            self._finish_idle(workflow_name, admission, woken)
            return admission
        if (
            run_here
            and depth_first
            and roots
            and all(_unlimited(s) for s in roots)
            and self._roots_here(workflow, roots)
        ):
            admission, claim = self.manager.run(
                steps.admit_and_claim, workflow_name, ids, workflow, self.worker_id
            )
        else:
            admission = self.manager.run(executions.admit, workflow_name, ids, workflow)
        self._admitted(workflow_name, admission)
        self._publish_committed(admission.queued, admission.routes)
        if claim is None:
            self._finish_idle(workflow_name, admission)
        else:
            self._run_from(claim)
        return admission

    def _finish_idle(
        self, workflow_name: str, admission: Admission, woken: WaitOutcome | None = None
    ) -> None:
        """Finish started executions that got nothing to run (their open steps had all
        ended: a repair of the last one, a retry): a first run always queues a root, so
        this costs nothing on the hot path."""
        busy = {eid for eid, _ in admission.queued}
        if woken is not None:
            busy.update(eid for eid, _ in woken.queued)
        idle = [eid for eid in admission.started if eid not in busy]
        if not idle:
            return

        def sinks_of(workflow: str, version: int) -> Sequence[str]:
            found = self.definition(workflow, version)
            return found.sinks if found is not None else []

        outcome = self.manager.run(
            executions.finish_started_idle, idle, workflow_name, sinks_of, self.definition
        )
        self.publish_outcome(outcome)

    def _admitted(self, workflow_name: str, admission: Admission) -> None:
        """Count an admission; cancellations by ``on_limit`` end executions; a start a
        rate limit held back is asked for again at the moment it may start."""
        self.metrics.admitted(workflow_name, admission)
        for _ in admission.cancelled:
            self.metrics.limited(workflow_name, "", "cancelled")
        if admission.cancelled:
            # Slots freed (cancel_in_progress): the next pending may start.
            self.after_finish(workflow_name)
        if admission.retry_at is not None:
            left = (admission.retry_at - datetime.now(UTC)).total_seconds()
            try:
                self.app.send_task(
                    START_EXECUTION,
                    kwargs={"execution_id": "", "workflow": workflow_name},
                    countdown=max(0.0, min(left, self.settings.retry_countdown_max)),
                    queue=self._start_queue(workflow_name),
                )
            except Exception:  # the reconciler re-sends pending starts
                log.warning("asking for a rate-limited start failed", exc_info=True)

    def _roots_here(self, workflow: Workflow | None, roots: Sequence[Step]) -> bool:
        """Whether this worker consumes the queue of every root step, so that it may
        claim one at the start; else each root is published to its own queue (a start
        of a workflow whose roots are on several queues: see ``start_queue``)."""
        if workflow is None:
            return True
        names = [root.name for root in roots]
        here = self.runnable_here(workflow, names)
        return here is None or here == names

    def publish_outcome(self, outcome: WaitOutcome) -> None:
        """Send what a committed wait transaction set in motion: the steps it queued,
        the child executions it created; count the waits it ended and the executions it
        finished, and admit the next execution where a slot freed. A failed publish is
        logged: the reconciler sends queued steps and starts of pending executions."""
        self._publish_committed(outcome.queued, outcome.routes)
        self.items.publish_committed(outcome.items, outcome.routes)
        for name, step, what, count in outcome.item_counts:
            self.metrics.items(name, step, what, count)
        if outcome.starts:
            unsent = self.publish_starts_each(outcome.starts)
            if unsent:
                log.warning("%d child start(s) unsent; the reconciler will send them", len(unsent))
        for workflow, kind, how in outcome.woken:
            self.metrics.wait_ended(workflow, kind, how)
        for workflow, seconds in outcome.lags:
            self.metrics.woke_late(workflow, seconds)
        for workflow, step, why in outcome.skipped:
            self.metrics.skipped(workflow, step, why)
        for result, workflow in outcome.finished:
            self.metrics.ended(workflow, result)
        for workflow in sorted({*(workflow for _, workflow in outcome.finished), *outcome.freed}):
            self.after_finish(workflow)
        for workflow, key, what in outcome.limited:
            self.metrics.limited(workflow, key, what)
        if outcome.wake_hint is not None:
            self.wake_at(outcome.wake_hint)

    def wake_at(self, due: datetime) -> None:
        """Ask the waker for ``due`` when it falls before its next tick (a wait armed
        for a moment that near: a rate limit's next start, a short retry backoff): one
        housekeeping message; a lost one costs at most one tick."""
        left = (due - datetime.now(UTC)).total_seconds()
        if left < self.settings.wake_interval:
            try:
                self.app.send_task(
                    WAKE, countdown=max(0.0, left), expires=self.settings.wake_interval * 2
                )
            except Exception:
                log.warning("asking the waker for %s failed; its tick will do", due, exc_info=True)

    def wake(self) -> int:
        """Wake the waits that are due (the beat's ``conveyor.wake``), then close the
        debounce windows that are due and send their starts (``core.debounce``): batches
        of ``CONVEYOR_WAKE_BATCH`` until one comes back short, or
        ``CONVEYOR_WAKE_INTERVAL`` of work has passed (the next tick goes on). How many
        waits and windows it took."""
        settings = self.settings
        began = time.monotonic()
        taken = 0
        while True:
            outcome = self.manager.run(waker.wake_due, settings.wake_batch, self.definition)
            taken += outcome.taken
            self.publish_outcome(outcome)
            if outcome.taken < settings.wake_batch:
                break
            if time.monotonic() - began > settings.wake_interval:
                break
        next_due = outcome.next_due
        while True:
            # Debounce windows due to start: closed, then their starts sent.
            released = self.manager.run(debounce.release_due, settings.wake_batch)
            taken += len(released.starts)
            self._publish_released(released.starts)
            if len(released.starts) < settings.wake_batch:
                break
            if time.monotonic() - began > settings.wake_interval:
                break
        if released.next_due is not None:
            next_due = released.next_due if next_due is None else min(next_due, released.next_due)
        self.metrics.wake_pass(time.monotonic() - began, taken)
        if next_due is not None:
            # Due before the next tick: one housekeeping message for that moment, so a
            # short sleep wakes on time (a lost one costs at most one tick).
            left = (next_due - datetime.now(UTC)).total_seconds()
            # Already due (it became due while this pass ran, after its scan): at once.
            # Not for one due long before: a row no pass can end would loop wakes.
            if -settings.wake_interval < left < settings.wake_interval:
                self.app.send_task(
                    WAKE, countdown=max(0.0, left), expires=settings.wake_interval * 2
                )
        return taken

    def _publish_released(self, starts: Sequence[Start]) -> None:
        """Send the starts of debounce windows just closed; one that fails is logged:
        the window is closed, so the reconciler sends it as any pending start."""
        unsent = self.publish_starts_each(starts)
        if unsent:
            log.warning("%d debounced start(s) unsent; the reconciler will send them", len(unsent))

    def after_finish(self, workflow_name: str) -> None:
        """A slot freed up: admit the next waiting execution of a limited workflow."""
        try:
            limited = bool(self.registry.get(workflow_name).limits)
        except WorkflowNotFound:
            return
        if limited:
            self.admit(workflow_name, [])

    def key_resumed(self, key: str) -> None:
        """An operator resumed ``key`` (``core.limits.resume_key`` made its held steps due):
        the waker admits those now, and the pending executions of the workflows whose own
        limits may name it are admitted now rather than at their next retry."""
        self.wake_at(datetime.now(UTC))
        for name in sorted({w.name for w in self.registry if limits.names_key(w, key)}):
            self.after_finish(name)

    # --- a step's life ---------------------------------------------------------------

    def run_step(
        self,
        execution_id: str,
        step_name: str,
        task_id: str | None,
        workflow: str | None = None,
        version: int | None = None,
    ) -> None:
        """Claim, run and record a delivered step, then the steps it lets this worker
        continue with; a claim that loses is a duplicate or early delivery: a no-op.
        Raises ``StepFailed`` when a step failed (see ``_run_from``)."""
        known = self.definition(workflow, version) if workflow and version else None
        upstream = known.upstream(step_name) if known and step_name in known.steps else None

        def upstream_of(route: Route) -> Sequence[str]:
            found = self.definition(route.workflow, route.version)
            return found.upstream(step_name) if found and step_name in found.steps else ()

        claim = self.manager.run(
            steps.claim, execution_id, step_name, self.worker_id, task_id, upstream, upstream_of
        )
        if claim is None:
            log.info(
                "step %s/%s not claimed: duplicate or early delivery", *(execution_id, step_name)
            )
            return
        self._run_from(claim)

    def _run_from(self, claim: Claim) -> None:
        """Run a claimed step, then each step its completion lets this worker continue
        with, within the continuation bound.

        A step that fails (or is to be retried) continues nothing, so it is the last one
        run here: once its outcome is committed and its retry published, ``StepFailed``
        is raised, so that the Celery task shows FAILURE (or RETRY) instead of SUCCESS.
        """
        # The bound's time is judged as each step's outcome is recorded (``_succeeded``),
        # so that the time the step just took counts: a step that ran past it hands its
        # successor to the broker.
        deadline = time.monotonic() + self.settings.continue_max_seconds
        continued = 0
        next_step: Claim | None = claim
        parent = None  # the span of the step that released the next one, once continued
        chain = _Chain()
        try:
            while next_step is not None:
                more_steps = continued < self.settings.continue_max_steps
                with (
                    step_context(
                        next_step.execution_id,
                        next_step.route.workflow,
                        next_step.step_name,
                        next_step.attempt,
                    ),
                    self.tracing.step_span(next_step, parent) as span,
                ):
                    outcome = self._run(
                        next_step, may_continue=more_steps, deadline=deadline, chain=chain
                    )
                    span.outcome(outcome if isinstance(outcome, StepFailed) else None)
                if isinstance(outcome, StepFailed):
                    raise outcome
                next_step, parent = outcome, span.context
                if next_step is not None:
                    continued += 1
                    log.info(
                        "continuing execution %s with step %s in this worker (attempt %d)",
                        next_step.execution_id,
                        next_step.step_name,
                        next_step.attempt,
                    )
        finally:
            # The chain ends (its bound, a failure, an error): what it still holds goes
            # to the broker now.
            if chain.held is not None:
                self._hand_off(chain.held)

    def _run(
        self, claim: Claim, *, may_continue: bool, deadline: float, chain: _Chain | None = None
    ) -> Claim | StepFailed | None:
        """Run one claimed step and record its outcome; the step to continue with (only
        with ``may_continue``, and before the monotonic ``deadline``), or the recorded
        failure."""
        self.metrics.claimed(claim)
        workflow = self.definition(claim.route.workflow, claim.route.version)
        if self._handed_back(claim, workflow):
            return None
        step = workflow.steps.get(claim.step_name) if workflow else None
        if workflow is None or step is None:
            return self._fail(claim, self._unknown(claim), workflow)
        # Once claimed, the step is ours: every way out of this block records an outcome
        # (success, retry or failure), so no exception can leave it running.
        with self.heartbeats.beating((claim.execution_id, claim.step_name)):
            try:
                context = RunningStep(claim, workflow, self.manager, self.heartbeats)
                with self.metrics.running(claim):
                    value = step.fn(context, **claim.upstream)
                output = step.to_json(value)
                encoded = storable_output(step.name, output, self.settings.max_payload_bytes)
            except SoftTimeLimitExceeded:
                timed_out = StepTimedOut(
                    f"step {step.name} ran past its soft timeout of {step.soft_timeout}s"
                )
                return self._failed(claim, workflow, step, timed_out)
            except Exception as error:
                return self._failed(claim, workflow, step, error)
            # Recorded while still beating: a database that is restarting may keep this
            # waiting, and the step must not look stalled meanwhile.
            return self._succeeded(
                claim,
                workflow,
                output,
                encoded,
                may_continue and time.monotonic() < deadline,
                chain or _Chain(),
            )

    def _succeeded(
        self,
        claim: Claim,
        workflow: Workflow,
        output: Any,
        encoded: str | None,
        may_continue: bool,
        chain: _Chain,
    ) -> Claim | StepFailed | None:
        continue_as = (
            self.worker_id if may_continue and self._continuable(workflow, claim) else None
        )
        held = chain.held if chain.held is not None and chain.held.open else None
        # Siblings this completion releases beside the step it continues are held here,
        # and a held one is claimed when it continues nothing else.
        hold = self.settings.hold_seconds + HOLD_GRACE if continue_as is not None else None
        if not self.settings.hold_seconds:
            hold = None
        take = held.next() if held is not None and continue_as is not None else None
        # Continued and held steps run in this worker: only those of a queue it consumes
        # (the others released are published to their queue).
        here = (
            self.runnable_here(workflow, workflow.downstream(claim.step_name))
            if continue_as is not None
            else None
        )
        try:
            completion = self.recorder.run(
                steps.complete,
                claim,
                output,
                encoded,
                workflow,
                continue_as,
                self.definition,
                hold=hold,
                take=take,
                here=here,
            )
        except TransientDatabaseError:
            # The database stayed away through every retry (PATIENT): recording anything
            # else would fail alike. The task is retried, the step recovered if it stalls.
            raise
        except Exception as error:
            # storable_output let through what the database refuses: the last resort is
            # recording the step failed, never leaving it running (to be recovered and
            # re-run as if its worker had died).
            log.error(
                "recording the output of step %s of execution %s failed; failing the step",
                claim.step_name,
                claim.execution_id,
                exc_info=True,
            )
            refused = OutputNotStorable(claim.step_name, f"the database refused it: {error}")
            return self._fail(claim, refused, workflow)
        if not completion.transition.applied:
            if completion.transition.current_status == StepStatus.CANCELLED:
                self.recorder.run(
                    steps.record_late_output,
                    claim.execution_id,
                    claim.step_name,
                    claim.attempt,
                    output,
                )
            log.info(
                "completion of %s/%s not applied: it is %s",
                claim.execution_id,
                claim.step_name,
                completion.transition.current_status,
            )
            return None
        self._publish_committed([(claim.execution_id, n) for n in completion.queued], claim.route)
        self._held_after(claim, output, completion, chain, held, take)
        self.metrics.ended(workflow.name, completion.execution)
        if completion.execution is not None:
            self.after_finish(workflow.name)
        if completion.woken is not None:
            self.publish_outcome(completion.woken)
        return completion.continued

    def _held_after(
        self,
        claim: Claim,
        output: Any,
        completion: steps.Completion,
        chain: _Chain,
        held: _Held | None,
        take: steps.HeldStep | None,
    ) -> None:
        """After a committed completion: keep the siblings it held, forget the held step
        it claimed, and hand off what is held once the hold's time is up."""
        continued = completion.continued
        if take is not None and held is not None and continued and continued.step_name == take.name:
            held.claimed(take)
        if completion.held:
            self.metrics.held(claim.route.workflow, "held", len(completion.held))
            more = [steps.HeldStep(name, claim.step_name, output) for name in completion.held]
            if held is None or not held.add(more):
                held = _Held(
                    claim.execution_id,
                    claim.route,
                    time.monotonic() + self.settings.hold_seconds,
                )
                held.add(more)
                chain.held = held
                # While a step runs past the hold's time, the heartbeat thread hands off.
                group = held
                held.deadline = self.heartbeats.at(held.due, lambda: self._hand_off(group))
        if held is not None and (held.empty or time.monotonic() >= held.due):
            self._hand_off(held)  # all claimed (the timer is cancelled), or time is up

    def _hand_off(self, held: _Held) -> None:
        """Send the steps a chain still holds to the broker (once: later calls find
        nothing); a failure is logged, and they fall due to the reconciler."""
        if held.deadline is not None:
            self.heartbeats.cancel(held.deadline)
        names = held.close()
        if not names:
            return
        try:
            sent = self.manager.run(steps.hand_off, held.execution_id, names)
        except Exception:
            log.warning(
                "handing off %d held step(s) of execution %s failed; the reconciler will "
                "send them once due",
                len(names),
                held.execution_id,
                exc_info=True,
            )
            return
        if sent:
            self.metrics.held(held.route.workflow, "handed_off", len(sent))
            log.info(
                "handing %d held step(s) of execution %s to the broker: %s",
                len(sent),
                held.execution_id,
                ", ".join(sent),
            )
        self._publish_committed([(held.execution_id, name) for name in sent], held.route)

    @staticmethod
    def _continuable(workflow: Workflow, claim: Claim) -> bool:
        # Celery's time limits belong to the delivered task: a step with limits of its
        # own is published, to run under them, and a task with limits continues nothing.
        if not claim.continued and not _unlimited(workflow.steps[claim.step_name]):
            return False
        return all(_unlimited(workflow.steps[n]) for n in workflow.downstream(claim.step_name))

    def _failed(
        self, claim: Claim, workflow: Workflow, step: Step, error: BaseException
    ) -> StepFailed | None:
        """Record a step's error as a retry to come or its failure, by its retry policy;
        the report (None: another outcome was recorded first)."""
        # Attempts taken by crash recoveries do not count against the retry policy.
        tries = claim.attempt - claim.recoveries
        # Deterministic errors: another attempt would end the same way.
        permanent = isinstance(error, InputValidationError | OutputNotStorable)
        if not permanent and step.retry.should_retry(error, tries):
            delay = step.retry.delay(tries)
            freed: WaitOutcome | None = None
            try:
                if step.limits:
                    # Behind limits: it waits out its backoff holding no slot, and is
                    # admitted again by the waker (no message now).
                    moved, freed = self.recorder.run(
                        limits.retry_gated,
                        claim.execution_id,
                        step.name,
                        claim.attempt,
                        delay,
                        error_record(error),
                        self.definition,
                    )
                else:
                    moved = self.recorder.run(
                        steps.schedule_retry,
                        claim.execution_id,
                        step.name,
                        claim.attempt,
                        delay,
                        error_record(error),
                    )
            except TransientDatabaseError:
                raise  # as in _succeeded
            except Exception:
                log.error(
                    "recording a retry of step %s of execution %s failed; failing the step",
                    step.name,
                    claim.execution_id,
                    exc_info=True,
                )
                return self._fail(claim, error, workflow)
            self.metrics.retried(claim, moved)
            if freed is not None:
                self.publish_outcome(freed)
            elif moved.applied and delay <= self.settings.retry_countdown_max:
                # Long delays are left to the reconciler, which publishes due retries;
                # nothing depends on an ETA message held by the broker.
                self._publish_committed(
                    [(claim.execution_id, step.name)], claim.route, countdown=delay
                )
            if not moved.applied:
                return None
            return self._reported(claim, error, step.retry.max_attempts, retry_in=delay)
        if step.retry.on_exhausted == "skip":
            return self._skip(claim, error, workflow)
        return self._fail(claim, error, workflow)

    def _skip(self, claim: Claim, error: BaseException, workflow: Workflow) -> StepFailed | None:
        """Record an optional step (``Retry(on_exhausted="skip")``) whose attempts are
        spent as skipped, its error kept; nothing continues after it, and the task does
        not report a failure (the execution does not fail for it). None, or the report of
        the failure recorded instead when the skip could not be."""
        try:
            skipped, woken = self.recorder.run(
                conditions.skip_step,
                claim.execution_id,
                claim.step_name,
                claim.attempt,
                error_record(error),
                workflow,
                self.definition,
            )
        except TransientDatabaseError:
            raise  # as in _succeeded
        except Exception:
            # As in _fail: never leave the claimed step running.
            log.error(
                "recording step %s of execution %s skipped failed; failing the step",
                claim.step_name,
                claim.execution_id,
                exc_info=True,
            )
            return self._fail(claim, error, workflow)
        if skipped.applied:
            log.warning(
                "step %s of execution %s skipped after attempt %d: %s: %s",
                claim.step_name,
                claim.execution_id,
                claim.attempt - claim.recoveries,
                type(error).__name__,
                error,
            )
        self.publish_outcome(woken)
        return None

    @staticmethod
    def _reported(
        claim: Claim, error: BaseException, max_attempts: int, retry_in: float | None = None
    ) -> StepFailed:
        """The one WARNING of a recorded failure (or retry), and the report the task raises."""
        tries = claim.attempt - claim.recoveries  # as the retry policy counts them
        report = StepFailed.of(
            error,
            execution_id=claim.execution_id,
            workflow=claim.route.workflow,
            step=claim.step_name,
            attempt=tries,
            max_attempts=max(tries, max_attempts),
            retry_in=retry_in,
        )
        log.warning("%s", report)
        return report

    def _handed_back(self, claim: Claim, workflow: Workflow | None) -> bool:
        """Whether this worker's code may not finish the claimed step's execution (its
        remaining steps' contracts differ: core.shapes), in which case the step was
        handed back, never failed: to a live worker with a compatible shape, or to wait
        for one. An execution of this code's own shape (the rule) costs a comparison."""
        recorded = claim.route.shape
        local = shape_of(workflow) if workflow is not None else None
        if recorded is None or (local is not None and local.hash == recorded):
            return False
        reason = self.manager.run(shapes.judge, claim.execution_id, recorded, local)
        if reason is None:
            return False
        handed = self.manager.run(
            shapes.hand_back,
            claim.execution_id,
            claim.step_name,
            claim.attempt,
            self.worker_id,
            reason,
            self.settings.stall_timeout,
        )
        if not handed.applied:  # no longer ours (cancelled, recovered): nothing to give
            return True
        log.warning(
            "step %s of execution %s handed back: %s; %s",
            claim.step_name,
            claim.execution_id,
            reason,
            f"sent to queue {handed.queue}"
            if handed.queue
            else "it waits for a worker with a compatible shape",
        )
        self.metrics.handed_back(claim.route.workflow, waiting=handed.queue is None)
        if handed.queue is not None:
            self._publish_committed(
                [(claim.execution_id, claim.step_name)], handed.route, queue=handed.queue
            )
        return True

    def release_held(self) -> int:
        """Send steps handed back for a compatible worker to one that is up now (each
        reconciler pass); how many were sent."""
        released = self.manager.run(
            shapes.release_held, self.settings.reconcile_batch, self.settings.stall_timeout
        )
        for item in released:
            self._publish_committed(
                [(item.execution_id, item.step_name)], item.route, queue=item.queue
            )
        return len(released)

    def migrate(self, execution_id: str, workflow: Workflow, actor: str) -> shapes.Migrated:
        """Move an open execution to ``workflow``'s shape (``core.shapes.migrate``) and
        send the steps that it made ready."""
        moved = self.manager.run(shapes.migrate, execution_id, workflow, actor)
        if moved.queued:
            self._publish_committed([(execution_id, name) for name in moved.queued], moved.route)
        return moved

    def _unknown(self, claim: Claim) -> WorkflowNotFound:
        try:
            self.registry.get(claim.route.workflow, claim.route.version)
        except WorkflowNotFound as missing:
            return missing
        return WorkflowNotFound(f"{claim.route.workflow} (step {claim.step_name})")

    def _fail(
        self, claim: Claim, error: BaseException, workflow: Workflow | None
    ) -> StepFailed | None:
        """Record a step's failure (its descendants skipped, its execution finished when
        nothing else runs); the report (None: another outcome was recorded first)."""
        descendants = workflow.descendants(claim.step_name) if workflow else None
        sinks = workflow.sinks if workflow else []
        record = error_record(error)
        try:
            failure = self.recorder.run(
                steps.fail_step,
                claim.execution_id,
                claim.step_name,
                claim.attempt,
                record,
                descendants,
                sinks,
                workflow,
            )
        except TransientDatabaseError:
            raise  # as in _succeeded
        except Exception:
            # The last resort: the failure without the error's text, which error_record
            # makes storable, so this is not expected to be reached.
            log.error(
                "recording the failure of step %s of execution %s failed; recording it "
                "without its error's text",
                claim.step_name,
                claim.execution_id,
                exc_info=True,
            )
            failure = self.recorder.run(
                steps.fail_step,
                claim.execution_id,
                claim.step_name,
                claim.attempt,
                bare_error_record(error),
                descendants,
                sinks,
                workflow,
            )
        report = None
        if failure.transition.applied:
            defined = workflow.steps.get(claim.step_name) if workflow else None
            report = self._reported(claim, error, defined.retry.max_attempts if defined else 1)
        self.metrics.ended(claim.route.workflow, failure.execution)
        if failure.execution is not None:
            self.after_finish(claim.route.workflow)
        if failure.woken is not None:
            self.publish_outcome(failure.woken)
        return report

    def record_hard_timeout(
        self, execution_id: str, step_name: str, task_id: str, limit: float | None
    ) -> None:
        """The pool process running this delivery was killed at its hard time limit:
        record the step timed out now (retry or fail by its policy) instead of waiting
        for it to look stalled. Only the claim made by this delivery (``task_id``) moves."""
        claim = self.manager.run(steps.running_claim, execution_id, step_name, task_id)
        if claim is None:
            return
        error = StepTimedOut(f"step {step_name} ran past its hard timeout of {limit}s")
        workflow = self.definition(claim.route.workflow, claim.route.version)
        step = workflow.steps.get(step_name) if workflow else None
        with step_context(execution_id, claim.route.workflow, step_name, claim.attempt):
            if workflow is None or step is None:
                self._fail(claim, error, None)
            else:
                self._failed(claim, workflow, step, error)

    # --- operations ------------------------------------------------------------------

    def cancel(self, execution_id: str, reason: str = "cancelled") -> bool:
        """Cancel an execution and every open execution below it (its child workflows,
        theirs, ...) in one transaction: open steps cancelled at once, running tasks of
        the whole tree revoked; a parent waiting on it is told (its step fails)."""
        # The unit itself, not the manager's method, which would also dispatch a start
        # through the broker: this engine admits the next execution directly below.
        cancelled = self.manager.run(children.cancel_tree, execution_id, reason, self.definition)
        result, running = cancelled.result, cancelled.running
        if not result.applied:
            return False
        if running:
            try:
                self.app.control.revoke(running)
            except Exception:  # some transports (the embedded one) have no broadcast
                log.warning("could not revoke %d running task(s)", len(running), exc_info=True)
        execution = self.manager.get_execution(execution_id)
        self.metrics.ended(execution.workflow_id, result)
        self.after_finish(execution.workflow_id)
        self.publish_outcome(cancelled.woken)
        return True

    def retry(self, execution_id: str, *, failed_items: bool = False) -> bool:
        """Re-run a failed, cancelled or timed-out execution from its unfinished steps:
        it goes back to pending, with a new deadline and its steps' attempts whole again
        (``core.executions.retry_execution``), and its start message is sent, to be
        admitted like a new execution (priority, max_concurrency). With
        ``failed_items``, its failed maps run only their failed (and cancelled) items
        again (``core.map_repair.retry_failed_items``; NothingToRetry when there are none).
        False when it is in no status a retry leaves."""
        execution = self.manager.get_execution(execution_id)
        workflow = self.registry.get(execution.workflow_id, execution.workflow_version)
        if failed_items:
            result, _ = self.manager.run(
                map_repair.retry_failed_items,
                execution_id,
                workflow.upstream_map(),
                workflow.deadline,
            )
        else:
            result = self.manager.run(
                executions.retry_execution,
                execution_id,
                workflow.upstream_map(),
                workflow.deadline,
            )
        if not result.applied:
            return False
        try:
            self.publish_starts([(execution_id, execution.workflow_id, execution.priority)])
        except Exception:  # committed: the reconciler sends starts of pending executions
            log.warning(
                "publishing the start of retried execution %s failed; the reconciler will send it",
                execution_id,
                exc_info=True,
            )
        return True

    def resolve(
        self, execution_id: str, step: str, output: Any, *, actor: str, reason: str | None
    ) -> repair.Repair:
        """Complete a failed step with ``output`` and go on from there
        (``core.repair.resolve_step``), then send the execution's start."""
        definition = self._definition_of_execution(execution_id)
        done = self.manager.run(
            repair.resolve_step,
            execution_id,
            step,
            output,
            actor=actor,
            reason=reason,
            definition=definition,
            max_payload_bytes=self.settings.max_payload_bytes,
        )
        self._repaired(done, "resolve")
        return done

    def skip(
        self, execution_id: str, step: str, *, actor: str, reason: str | None
    ) -> repair.Repair:
        """Skip a failed step and go on from there (``core.repair.skip_step``), then send
        the execution's start."""
        definition = self._definition_of_execution(execution_id)
        done = self.manager.run(
            repair.skip_step,
            execution_id,
            step,
            actor=actor,
            reason=reason,
            definition=definition,
        )
        self._repaired(done, "skip")
        return done

    def retry_group(
        self, group: str, *, as_of: datetime, limit: int, owner: str | None = None
    ) -> BulkAction:
        """Retry the executions of up to ``limit`` failed steps of failure ``group``
        that failed at or before ``as_of`` (``owner``'s only, when given): each retried
        once, whatever happens meanwhile (a retried execution's step is no longer failed;
        one that failed again did so after ``as_of``). Call again while ``remaining``."""
        found = self.manager.run(failures.members, group, owner=owner, as_of=as_of, limit=limit)
        done = sum(1 for member in found if self.retry(member.execution_id))
        if done:
            self.metrics.operator_action("retry_group", done)
        left = self.manager.run(failures.member_count, group, owner=owner, as_of=as_of)
        return BulkAction(done, left, as_of)

    def resolve_group(
        self,
        group: str,
        output: Any,
        *,
        actor: str,
        reason: str | None,
        as_of: datetime,
        limit: int,
        owner: str | None = None,
    ) -> BulkAction:
        """Resolve up to ``limit`` failed steps of failure ``group`` (failed at or
        before ``as_of``) with ``output``, each as ``resolve`` does; the output is checked
        against the step's return annotation first, once (nothing changed when it does
        not fit). Idempotent as ``retry_group``."""
        found = self.manager.run(failures.members, group, owner=owner, as_of=as_of, limit=limit)
        done = 0
        for member in found:
            definition = self._definition_of_execution(member.execution_id)
            repair.checked_output(definition, member.step, output, self.settings.max_payload_bytes)
            try:
                self.resolve(member.execution_id, member.step, output, actor=actor, reason=reason)
            except InvalidTransition:  # retried or repaired meanwhile: not a member now
                continue
            done += 1
        left = self.manager.run(failures.member_count, group, owner=owner, as_of=as_of)
        return BulkAction(done, left, as_of)

    def prune(self, *, dry_run: bool = False) -> retention.PruneReport:
        """One retention pass (``core.retention.prune``): finished executions past their
        workflow's retention deleted, payloads past theirs cleared, in short batches;
        with ``dry_run``, only counted."""
        report = retention.prune(self.manager.run, self.registry, self.settings, dry_run=dry_run)
        if dry_run:
            return report
        for part in report.parts:
            self.metrics.pruned(part.workflow, part.what, part.count)
        if report.parts:
            log.info(
                "retention: deleted %d execution(s), cleared the payloads of %d%s",
                report.total("succeeded") + report.total("failed"),
                report.total("payloads"),
                " (stopped at CONVEYOR_PRUNE_MAX_BATCHES; the next pass goes on)"
                if report.capped
                else "",
            )
        return report

    def _definition_of_execution(self, execution_id: str) -> Workflow:
        execution = self.manager.get_execution(execution_id)
        return self.registry.get(execution.workflow_id, execution.workflow_version)

    def _repaired(self, done: repair.Repair, action: str) -> None:
        self.metrics.operator_action(action)
        try:
            self.publish_starts([(done.execution_id, done.workflow, done.priority)])
        except Exception:  # committed: the reconciler sends starts of pending executions
            log.warning(
                "publishing the start of repaired execution %s failed; the reconciler will send it",
                done.execution_id,
                exc_info=True,
            )

    def publish_each(self, keys: Sequence[StepKey]) -> list[StepKey]:
        """Send a run message for each step, each on its own: one that fails (logged) does
        not keep the others from being sent (see ``_send_each``). The keys whose message
        was not sent."""
        if not keys:
            return []
        routes = self.manager.run(executions.execution_routes, sorted({k[0] for k in keys}))
        return _send_each(
            keys,
            lambda key: self.publish_steps([key], routes),
            lambda key: f"step {key[1]} of execution {key[0]}",
            "step",
        )

    def publish_starts_each(self, starts: Sequence[Start]) -> list[Start]:
        """``publish_each`` for start messages: each (execution_id, workflow, priority)
        on its own; those whose message was not sent."""
        return _send_each(
            starts,
            lambda start: self.publish_starts([start]),
            lambda start: f"the start of execution {start[0]} (workflow {start[1]})",
            "start",
        )

    def reconcile(self) -> ReconcileReport:
        """One reconciler pass (one transaction); then publish and admit what it found."""
        settings = self.settings
        began = time.monotonic()
        report = self.manager.run(
            reconciler.reconcile_pass,
            stall_timeout=settings.stall_timeout,
            republish_after=settings.republish_after,
            start_after=settings.start_after,
            limit=settings.reconcile_batch,
            max_recoveries=settings.max_crash_recoveries,
            dag_of=self.definition,
            gap=reconciler.outage_gap(settings.stall_timeout, settings.reconcile_interval),
        )
        unsent = self.publish_each(report.republish)
        try:
            self.release_held()
            # Failed steps get their failure group (core.failures), whatever failed them.
            self.manager.run(failures.backfill, settings.reconcile_batch)
        except TransientDatabaseError:  # the next pass does it
            log.warning("database unavailable; held steps and failure groups left for a later pass")
        if unsent:
            restored = self.manager.run(
                reconciler.restore_unsent, [report.unsent[key] for key in unsent]
            )
            log.warning(
                "reconciler: publishing %d of %d step message(s) failed; %d are due again "
                "at the next pass",
                len(unsent),
                len(report.republish),
                restored,
            )
        # Start messages again, not admissions: they wait their turn behind the steps of
        # running executions, as the first ones did (CONVEYOR_ORDER).
        unsent_starts = self.publish_starts_each(report.start)
        if unsent_starts:
            restored = self.manager.run(
                reconciler.restore_unsent_starts,
                [report.unsent_starts[execution_id] for execution_id, _, _ in unsent_starts],
            )
            log.warning(
                "reconciler: publishing %d of %d start message(s) failed; %d are due again "
                "at the next pass",
                len(unsent_starts),
                len(report.start),
                restored,
            )
        # A slot this pass freed, and one freed by a process that died between committing
        # a finish and admitting the next execution (after_finish never ran): admitted
        # now, not when a waiting execution's backed-off start comes due.
        # What telling parents of children this pass ended set in motion.
        if report.woken is not None:
            self.publish_outcome(report.woken)
        # Map items: a failed publish leaves them queued, re-sent after republish_after.
        self.items.publish_committed(report.items)
        for workflow in sorted({*report.freed, *report.waiting}):
            self.after_finish(workflow)
        self.metrics.reconciled_pass(
            report, time.monotonic() - began, unsent=len(unsent) + len(unsent_starts)
        )
        for crash in report.crashes:
            # The one WARNING of a failed step, as a worker logs for an error its code
            # raised; here its worker is gone, so the pass that failed it speaks for it.
            workflow = report.workflows.get(crash.execution_id, "?")
            with step_context(crash.execution_id, workflow, crash.step_name, crash.attempt):
                log.warning(
                    "step %s of execution %s (workflow %s) failed on attempt %d: StepCrashed: %s",
                    crash.step_name,
                    crash.execution_id,
                    workflow,
                    crash.attempt,
                    crash.message,
                )
        if report != ReconcileReport():
            log.info("reconciler: %s", report)
        else:  # every few seconds on an idle system: not worth an INFO line
            log.debug("reconciler: nothing to do")
        return report
