"""The step engine: admits executions, runs steps, records every outcome, publishes.

Every transition is a compare-and-set in ``core``; the engine only decides what to
ask for and publishes what a committed transaction queued (commit, then publish).
No transaction is open while a step's own code runs.
"""

from __future__ import annotations

import logging
import traceback
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from core import scheduling
from core.config import Settings
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.errors import InputValidationError, StepTimedOut, WorkflowNotFound
from core.operations import check_payload
from core.registry import WorkflowRegistry
from core.states import StepStatus
from core.transactions import RetryPolicy
from core.workflows import Step, Workflow
from worker.config import broker_priority
from worker.context import RunningStep
from worker.heartbeat import Heartbeat

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


def _parsed_input(workflow: Workflow, data: Any) -> Any:
    """The stored input as the step sees it; a stored input its model refuses is a
    permanent error of the step (it would fail the same way on every attempt)."""
    try:
        return workflow.parse_input(data)
    except ValidationError as exc:
        raise InputValidationError(
            f"stored input of workflow {workflow.name!r} no longer fits its input model: {exc}"
        ) from exc


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


@dataclass(frozen=True)
class Route:
    """Where and how a step's message goes: its workflow, version and priority."""

    workflow: str
    version: int
    priority: int


class Engine:
    """Runs workflows on one Celery app against conveyor's state database."""

    def __init__(self, app: Celery, settings: Settings, registry: WorkflowRegistry) -> None:
        self.app = app
        self.settings = settings
        self.registry = registry
        self.manager = SyncEnhancedExecutionStateManager()
        self.recorder = SyncEnhancedExecutionStateManager(retry_policy=PATIENT)
        self.heartbeats = Heartbeat(self.manager, settings.heartbeat_interval)

    @property
    def worker_id(self) -> str:
        """Who claims steps: this host and process (see Heartbeat.worker_id)."""
        return self.heartbeats.worker_id

    # --- publishing (always after the commit that made the work) -------------------

    def publish_starts(self, executions: Iterable[tuple[str, str, int]]) -> None:
        """Send a start message for each (execution_id, workflow, priority)."""
        with self.app.producer_or_acquire() as producer:
            for execution_id, workflow, priority in executions:
                self.app.send_task(
                    START_EXECUTION,
                    # Keyword arguments, so Flower shows what each value is.
                    kwargs={"execution_id": execution_id, "workflow": workflow},
                    priority=broker_priority(self.settings, priority),
                    producer=producer,
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
            found = self.manager.run(
                partial(scheduling.execution_routes, sorted({k[0] for k in keys}))
            )
            routes = {eid: Route(*values) for eid, values in found.items()}
        with self.app.producer_or_acquire() as producer:
            for execution_id, step_name in keys:
                target = routes.get(execution_id)
                options: dict[str, Any] = {}
                if target is not None:
                    options["priority"] = broker_priority(self.settings, target.priority)
                    step = self._step_or_none(target, step_name)
                    if step is not None:
                        options["soft_time_limit"] = step.soft_timeout
                        options["time_limit"] = step.timeout
                self.app.send_task(
                    RUN_STEP,
                    kwargs={"execution_id": execution_id, "step_name": step_name},
                    countdown=countdown,
                    producer=producer,
                    **options,
                )

    def _step_or_none(self, route: Route, step_name: str) -> Step | None:
        try:
            return self.registry.get(route.workflow, route.version).steps.get(step_name)
        except WorkflowNotFound:
            return None

    # --- executions ------------------------------------------------------------------

    def admit(self, workflow_name: str, execution_ids: Sequence[str]) -> scheduling.Admission:
        """Start what may start (concurrency limit, priority, FIFO) and publish its roots."""
        try:
            limit = self.registry.get(workflow_name).max_concurrency
        except WorkflowNotFound:
            limit = None
        dialect = self.settings.sync_database_url.get_backend_name()
        admission = self.manager.run(
            partial(scheduling.admit, dialect, workflow_name, list(execution_ids), limit)
        )
        routes = {eid: Route(*values) for eid, values in admission.routes.items()}
        self.publish_steps(admission.queued, routes)
        return admission

    def after_finish(self, workflow_name: str) -> None:
        """A slot freed up: admit the next waiting execution of a limited workflow."""
        try:
            limited = self.registry.get(workflow_name).max_concurrency is not None
        except WorkflowNotFound:
            return
        if limited:
            self.admit(workflow_name, [])

    # --- steps -----------------------------------------------------------------------

    def run_step(self, execution_id: str, step_name: str, task_id: str | None) -> None:
        """Claim, run and record one step; a claim that loses is a duplicate: no-op."""
        claim = self.manager.run(
            partial(
                scheduling.claim,
                execution_id,
                step_name,
                self.worker_id,
                task_id,
                partial(self._upstream_of, step_name),
            )
        )
        if not claim.claimed or claim.execution is None:
            log.info(
                "step %s/%s not claimed (it is %s): duplicate or early delivery",
                execution_id,
                step_name,
                claim.transition.current_status,
            )
            return
        execution = claim.execution
        attempt = claim.transition.attempt or 1
        route = Route(execution.workflow_id, execution.workflow_version, execution.priority)
        try:
            workflow = self.registry.get(execution.workflow_id, execution.workflow_version)
            step = workflow.steps[step_name]
        except (WorkflowNotFound, KeyError) as exc:
            problem = (
                exc
                if isinstance(exc, WorkflowNotFound)
                else WorkflowNotFound(f"{execution.workflow_id} (step {step_name})")
            )
            self._fail(execution_id, step_name, attempt, problem, None, route)
            return
        key = (execution_id, step_name)
        # Once claimed, the step is ours: every way out of this block records an outcome
        # (success, retry or failure), so no exception can leave it running.
        with self.heartbeats.beating(key):
            try:
                context = RunningStep(
                    execution_id=execution_id,
                    step_name=step_name,
                    attempt=attempt,
                    input=_parsed_input(workflow, execution.input_data),
                    manager=self.manager,
                    heartbeats=self.heartbeats,
                )
                value = step.fn(context, **claim.upstream)
                output = check_payload(
                    "output_data", step.to_json(value), self.settings.max_payload_bytes
                )
            except SoftTimeLimitExceeded:
                timed_out = StepTimedOut(
                    f"step {step_name} ran past its soft timeout of {step.soft_timeout}s"
                )
                self._failed(execution_id, workflow, step, claim, timed_out, route)
                return
            except Exception as error:
                self._failed(execution_id, workflow, step, claim, error, route)
                return
            # Recorded while still beating: a database that is restarting may keep this
            # waiting, and the step must not look stalled meanwhile.
            self._succeeded(execution_id, workflow, step, attempt, output, route)

    def _upstream_of(self, step_name: str, workflow: str, version: int) -> Sequence[str]:
        try:
            step = self.registry.get(workflow, version).steps.get(step_name)
        except WorkflowNotFound:
            return ()
        return step.depends_on if step is not None else ()

    def _succeeded(
        self,
        execution_id: str,
        workflow: Workflow,
        step: Step,
        attempt: int,
        output: Any,
        route: Route,
    ) -> None:
        completion = self.recorder.complete_step(
            execution_id,
            step.name,
            attempt=attempt,
            output_data=output,
            downstream=workflow.downstream(step.name),
            sinks=workflow.sinks,
        )
        if not completion.transition.applied:
            if completion.transition.current_status == StepStatus.CANCELLED:
                self.recorder.run(
                    partial(scheduling.record_late_output, execution_id, step.name, attempt, output)
                )
            log.info(
                "completion of %s/%s not applied: it is %s",
                execution_id,
                step.name,
                completion.transition.current_status,
            )
            return
        self.publish_steps([(execution_id, name) for name in completion.queued], route)
        if completion.execution is not None:
            self.after_finish(workflow.name)

    def _failed(
        self,
        execution_id: str,
        workflow: Workflow,
        step: Step,
        claim: scheduling.Claim,
        error: BaseException,
        route: Route,
    ) -> None:
        attempt = claim.transition.attempt or 1
        # Attempts taken by crash recoveries do not count against the retry policy.
        tries = attempt - claim.recoveries
        permanent = isinstance(error, InputValidationError)
        if not permanent and step.retry.should_retry(error, tries):
            delay = step.retry.delay(tries)
            moved = self.recorder.run(
                partial(
                    scheduling.schedule_retry,
                    execution_id,
                    step.name,
                    attempt,
                    delay,
                    error_record(error),
                )
            )
            if moved.applied and delay <= self.settings.retry_countdown_max:
                # Long delays are left to the reconciler, which publishes due retries;
                # nothing depends on an ETA message held by the broker.
                self.publish_steps([(execution_id, step.name)], route, countdown=delay)
            return
        self._fail(execution_id, step.name, attempt, error, workflow, route)

    def _fail(
        self,
        execution_id: str,
        step_name: str,
        attempt: int,
        error: BaseException,
        workflow: Workflow | None,
        route: Route,
    ) -> None:
        descendants = workflow.descendants(step_name) if workflow else None
        failure = self.recorder.run(
            partial(
                scheduling.fail_step,
                execution_id,
                step_name,
                attempt,
                error_record(error),
                descendants,
                workflow.sinks if workflow else [],
            )
        )
        if failure.execution is not None:
            self.after_finish(route.workflow)

    def record_hard_timeout(
        self, execution_id: str, step_name: str, task_id: str, limit: float | None
    ) -> None:
        """The pool process running this delivery was killed at its hard time limit:
        record the step timed out now (retry or fail by its policy) instead of waiting
        for it to look stalled. Only the claim made by this delivery (``task_id``) moves."""
        claim = self.manager.run(
            partial(scheduling.running_claim, execution_id, step_name, task_id)
        )
        if claim is None or claim.execution is None:
            return
        execution = claim.execution
        route = Route(execution.workflow_id, execution.workflow_version, execution.priority)
        error = StepTimedOut(f"step {step_name} ran past its hard timeout of {limit}s")
        try:
            workflow = self.registry.get(execution.workflow_id, execution.workflow_version)
            step = workflow.steps[step_name]
        except (WorkflowNotFound, KeyError):
            self._fail(execution_id, step_name, claim.transition.attempt or 1, error, None, route)
            return
        self._failed(execution_id, workflow, step, claim, error, route)

    # --- operations ------------------------------------------------------------------

    def cancel(self, execution_id: str, reason: str = "cancelled") -> bool:
        """Cancel an execution: open steps cancelled at once, running tasks revoked."""
        running = [
            s.celery_task_id
            for s in self.manager.get_steps(execution_id)
            if s.status == StepStatus.RUNNING and s.celery_task_id
        ]
        # The plan itself, not the manager's method, which would also dispatch a start
        # through the broker: this engine admits the next execution directly below.
        result = self.manager.run(self.manager.requests.cancel_execution(execution_id, reason))
        if not result.applied:
            return False
        if running:
            try:
                self.app.control.revoke(running)
            except Exception:  # some transports (the embedded one) have no broadcast
                log.warning("could not revoke %d running task(s)", len(running), exc_info=True)
        execution = self.manager.get_execution(execution_id)
        self.after_finish(execution.workflow_id)
        return True

    def retry(self, execution_id: str) -> bool:
        """Re-run a failed, cancelled or timed-out execution from its unfinished steps."""
        execution = self.manager.get_execution(execution_id)
        workflow = self.registry.get(execution.workflow_id, execution.workflow_version)
        graph = {name: list(step.depends_on) for name, step in workflow.steps.items()}
        result, queued = self.manager.run(partial(scheduling.retry_execution, execution_id, graph))
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

    def reconcile(self) -> scheduling.ReconcileReport:
        """One reconciler pass (one transaction); then publish and admit what it found."""
        settings = self.settings
        report = self.manager.run(
            partial(
                scheduling.reconcile_scan,
                stall_timeout=settings.stall_timeout,
                republish_after=settings.republish_after,
                start_after=settings.start_after,
                limit=settings.reconcile_batch,
                max_recoveries=settings.max_crash_recoveries,
                dag_of=self._dag_of,
            )
        )
        self.publish_steps(report.republish)
        by_workflow: dict[str, list[str]] = defaultdict(list)
        for execution_id, workflow in report.start:
            by_workflow[workflow].append(execution_id)
        for workflow, ids in by_workflow.items():
            self.admit(workflow, ids)
        for workflow in report.freed:
            if workflow not in by_workflow:
                self.after_finish(workflow)
        if report != scheduling.ReconcileReport():
            log.info("reconciler: %s", report)
        return report

    def _dag_of(self, workflow: str, version: int) -> Workflow | None:
        try:
            return self.registry.get(workflow, version)
        except WorkflowNotFound:
            return None
