"""The step engine: a step's life on a worker, from its message to what it sets in motion.

claim (``core.steps.claim``) -> run the step's code (no transaction open) -> record its
outcome in one transaction (``core.steps.complete``, or a retry or failure) -> publish
what that transaction released (commit, then publish) -> continue: run the next
released step of the same execution here, claimed by the completing transaction,
without a broker round trip, within a bound (``CONVEYOR_CONTINUE_MAX_STEPS`` and
``CONVEYOR_CONTINUE_MAX_SECONDS``) so a long chain cannot starve other work.

Every transition is a compare-and-set in ``core``; the engine only decides what to
ask for and publishes what a committed transaction queued.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded

from core import executions, reconciler, steps
from core.config import Settings
from core.database import Database, get_database
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.errors import InputValidationError, StepTimedOut, WorkflowNotFound
from core.models import check_json
from core.outcomes import Admission, Claim, ReconcileReport, Route
from core.registry import WorkflowRegistry
from core.states import StepStatus
from core.transactions import RetryPolicy
from core.workflows import Step, Workflow
from worker.config import broker_priority
from worker.context import RunningStep
from worker.failures import StepFailed
from worker.heartbeat import Heartbeat
from worker.logs import step_context
from worker.metrics import Metrics, get_metrics
from worker.tracing import Tracing

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

RUN_STEP = "conveyor.run_step"
START_EXECUTION = "conveyor.start_execution"
TRACEBACK_LIMIT = 16_000
# Recording an outcome after the step's code ran is worth waiting for: if the database
# is restarting, keep trying for about two minutes before leaving it to stall recovery.
PATIENT = RetryPolicy(attempts=40, initial_wait=0.1, max_wait=5.0)

StepKey = tuple[str, str]


def error_record(error: BaseException) -> dict[str, Any]:
    """An exception as stored on a failed step: type, message, traceback."""
    kind = type(error)
    text = "".join(traceback.format_exception(error))
    return {
        "type": kind.__name__ if kind.__module__ == "builtins" else kind.__qualname__,
        "module": kind.__module__,
        "message": str(error),
        "traceback": text[-TRACEBACK_LIMIT:],
    }


def encode_output(value: Any, max_bytes: int) -> str | None:
    """A step's output as JSON text, encoded once (None for None); a typed error when it
    is not strict JSON or larger than ``max_bytes``."""
    if value is None:
        return None
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        check_json("output_data", value)  # raises, naming the problem
        raise
    if len(encoded) > max_bytes and len(encoded.encode()) > max_bytes:
        raise InputValidationError(
            f"output_data is {len(encoded.encode())} bytes of JSON; the limit is {max_bytes} "
            "(CONVEYOR_MAX_PAYLOAD_BYTES)"
        )
    return encoded


def _unlimited(step: Step) -> bool:
    """Whether a step may run under another step's Celery task (it has no time limits)."""
    return step.soft_timeout is None and step.timeout is None


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

    @property
    def worker_id(self) -> str:
        """Who claims steps: this host and process (see Heartbeat.worker_id)."""
        return self.heartbeats.worker_id

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
        """Send a start message for each (execution_id, workflow, priority)."""
        headers = self.tracing.headers()
        with self.app.producer_or_acquire() as producer:
            for execution_id, workflow, priority in starts:
                self.app.send_task(
                    START_EXECUTION,
                    # Keyword arguments, so Flower shows what each value is.
                    kwargs={"execution_id": execution_id, "workflow": workflow},
                    priority=broker_priority(self.settings, priority, kind="start"),
                    producer=producer,
                    # The name Celery's logs, events and Flower show (see README).
                    shadow=f"{START_EXECUTION}:{workflow}",
                    headers=headers,
                )

    def publish_steps(
        self,
        keys: Sequence[StepKey],
        route: Route | Mapping[str, Route] | None = None,
        *,
        countdown: float | None = None,
    ) -> None:
        """Send a run message for each step; a known ``route`` (one, or one per execution)
        saves looking it up."""
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
                options: dict[str, Any] = {"headers": headers}
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
                self.app.send_task(
                    RUN_STEP, kwargs=kwargs, countdown=countdown, producer=producer, **options
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
        limit = workflow.max_concurrency if workflow else None
        ids = list(execution_ids)
        claim: Claim | None = None
        roots = [s for s in workflow.steps.values() if not s.depends_on] if workflow else []
        # Breadth-first order starts everything first: its roots wait their turn.
        depth_first = self.settings.order == "depth_first"
        if run_here and depth_first and roots and all(_unlimited(s) for s in roots):
            admission, claim = self.manager.run(
                steps.admit_and_claim, workflow_name, ids, limit, self.worker_id
            )
        else:
            admission = self.manager.run(executions.admit, workflow_name, ids, limit)
        self.metrics.admitted(workflow_name, admission)
        self.publish_steps(admission.queued, admission.routes)
        if claim is not None:
            self._run_from(claim)
        return admission

    def after_finish(self, workflow_name: str) -> None:
        """A slot freed up: admit the next waiting execution of a limited workflow."""
        try:
            limited = self.registry.get(workflow_name).max_concurrency is not None
        except WorkflowNotFound:
            return
        if limited:
            self.admit(workflow_name, [])

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
        started = time.monotonic()
        continued = 0
        next_step: Claim | None = claim
        parent = None  # the span of the step that released the next one, once continued
        while next_step is not None:
            within_bound = (
                continued < self.settings.continue_max_steps
                and time.monotonic() - started < self.settings.continue_max_seconds
            )
            with (
                step_context(
                    next_step.execution_id,
                    next_step.route.workflow,
                    next_step.step_name,
                    next_step.attempt,
                ),
                self.tracing.step_span(next_step, parent) as span,
            ):
                outcome = self._run(next_step, may_continue=within_bound)
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

    def _run(self, claim: Claim, *, may_continue: bool) -> Claim | StepFailed | None:
        """Run one claimed step and record its outcome; the step to continue with, or the
        recorded failure."""
        self.metrics.claimed(claim)
        workflow = self.definition(claim.route.workflow, claim.route.version)
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
                encoded = encode_output(output, self.settings.max_payload_bytes)
            except SoftTimeLimitExceeded:
                timed_out = StepTimedOut(
                    f"step {step.name} ran past its soft timeout of {step.soft_timeout}s"
                )
                return self._failed(claim, workflow, step, timed_out)
            except Exception as error:
                return self._failed(claim, workflow, step, error)
            # Recorded while still beating: a database that is restarting may keep this
            # waiting, and the step must not look stalled meanwhile.
            return self._succeeded(claim, workflow, output, encoded, may_continue)

    def _succeeded(
        self,
        claim: Claim,
        workflow: Workflow,
        output: Any,
        encoded: str | None,
        may_continue: bool,
    ) -> Claim | None:
        continue_as = (
            self.worker_id if may_continue and self._continuable(workflow, claim) else None
        )
        completion = self.recorder.run(
            steps.complete, claim, output, encoded, workflow, continue_as
        )
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
        self.publish_steps([(claim.execution_id, n) for n in completion.queued], claim.route)
        self.metrics.ended(workflow.name, completion.execution)
        if completion.execution is not None:
            self.after_finish(workflow.name)
        return completion.continued

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
        permanent = isinstance(error, InputValidationError)
        if not permanent and step.retry.should_retry(error, tries):
            delay = step.retry.delay(tries)
            moved = self.recorder.run(
                steps.schedule_retry,
                claim.execution_id,
                step.name,
                claim.attempt,
                delay,
                error_record(error),
            )
            self.metrics.retried(claim, moved)
            if moved.applied and delay <= self.settings.retry_countdown_max:
                # Long delays are left to the reconciler, which publishes due retries;
                # nothing depends on an ETA message held by the broker.
                self.publish_steps([(claim.execution_id, step.name)], claim.route, countdown=delay)
            if not moved.applied:
                return None
            return self._reported(claim, error, step.retry.max_attempts, retry_in=delay)
        return self._fail(claim, error, workflow)

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
        failure = self.recorder.run(
            steps.fail_step,
            claim.execution_id,
            claim.step_name,
            claim.attempt,
            error_record(error),
            workflow.descendants(claim.step_name) if workflow else None,
            workflow.sinks if workflow else [],
        )
        report = None
        if failure.transition.applied:
            defined = workflow.steps.get(claim.step_name) if workflow else None
            report = self._reported(claim, error, defined.retry.max_attempts if defined else 1)
        self.metrics.ended(claim.route.workflow, failure.execution)
        if failure.execution is not None:
            self.after_finish(claim.route.workflow)
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
        """Cancel an execution: open steps cancelled at once, running tasks revoked."""
        running = [
            s.celery_task_id
            for s in self.manager.get_steps(execution_id)
            if s.status == StepStatus.RUNNING and s.celery_task_id
        ]
        # The unit itself, not the manager's method, which would also dispatch a start
        # through the broker: this engine admits the next execution directly below.
        result = self.manager.run(executions.cancel_execution, execution_id, reason)
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
        return True

    def retry(self, execution_id: str) -> bool:
        """Re-run a failed, cancelled or timed-out execution from its unfinished steps."""
        execution = self.manager.get_execution(execution_id)
        workflow = self.registry.get(execution.workflow_id, execution.workflow_version)
        graph = {name: list(step.depends_on) for name, step in workflow.steps.items()}
        result, queued = self.manager.run(executions.retry_execution, execution_id, graph)
        if not result.applied:
            return False
        route = Route(execution.workflow_id, execution.workflow_version, execution.priority)
        try:
            self.publish_steps(queued, route)
        except Exception:  # committed: the reconciler republishes unclaimed queued steps
            log.warning(
                "publishing the retried steps failed; the reconciler will send them", exc_info=True
            )
        return True

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
        )
        self.publish_steps(report.republish)
        # Start messages again, not admissions: they wait their turn behind the steps of
        # running executions, as the first ones did (CONVEYOR_ORDER).
        self.publish_starts(report.start)
        for workflow in report.freed:
            self.after_finish(workflow)
        self.metrics.reconciled_pass(report, time.monotonic() - began)
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
