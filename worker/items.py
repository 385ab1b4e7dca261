"""A map item's life on a worker: its message, claim, run, record and continuation.

The same shape as a step's (``worker.engine``): claim (``core.maps.claim_item``) ->
run the map's function on the item (no transaction open, heartbeating) -> record its
outcome in one transaction (``core.maps.complete_item``: the item's output, the map
counted down, the slot passed on or the map aggregated) -> publish what that
committed -> continue with the next item this worker was handed (the slot pass
admits it running here), within the continuation bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded

from core import map_children, maps, shapes
from core.errors import InputValidationError, OutputNotStorable, StepTimedOut
from core.maps import ItemCompletion, ItemKey
from core.outcomes import Claim, Route
from core.shapes import shape_of
from core.workflows import MapSpec, Step, Workflow
from worker.config import broker_priority
from worker.context import RunningStep
from worker.failures import StepFailed
from worker.logs import step_context

if TYPE_CHECKING:
    from worker.engine import Engine

log = logging.getLogger(__name__)

RUN_ITEM = "conveyor.run_item"


class ItemRunner:
    """Runs the items of map steps for one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- publishing (after the commit that queued the items) -------------------------

    def publish(
        self,
        keys: Sequence[ItemKey],
        routes: Mapping[str, Route] | None = None,
        *,
        countdown: float | None = None,
        queue: str | None = None,
    ) -> None:
        """Send a ``conveyor.run_item`` message for each (execution, step, index);
        ``queue`` overrides the items' own (a shape's queue)."""
        if not keys:
            return
        engine = self.engine
        if routes is None or any(k[0] not in routes for k in keys):
            from core.executions import execution_routes

            routes = engine.manager.run(execution_routes, sorted({k[0] for k in keys}))
        headers = engine.tracing.headers()
        with engine.app.producer_or_acquire() as producer:
            for execution_id, step_name, index in keys:
                route = routes[execution_id]
                workflow = engine.definition(route.workflow, route.version)
                step = workflow.steps.get(step_name) if workflow else None
                limits: dict[str, Any] = {"queue": engine.settings.default_queue}
                if step is not None:  # the item's own time limits and queue, as a step's
                    assert workflow is not None
                    limits = {
                        "soft_time_limit": step.soft_timeout,
                        "time_limit": step.timeout,
                        "queue": workflow.queue_of(step_name, engine.settings.default_queue),
                    }
                if queue is not None:
                    limits["queue"] = queue
                engine.app.send_task(
                    RUN_ITEM,
                    kwargs={
                        "execution_id": execution_id,
                        "step_name": step_name,
                        "index": index,
                        "workflow": route.workflow,
                        "version": route.version,
                    },
                    countdown=countdown,
                    producer=producer,
                    headers=headers,
                    priority=broker_priority(engine.settings, route.priority),
                    shadow=f"{RUN_ITEM}:{route.workflow}.{step_name}[{index}]",
                    **limits,
                )

    def publish_committed(
        self,
        keys: Sequence[ItemKey],
        routes: Mapping[str, Route] | None = None,
        *,
        countdown: float | None = None,
        queue: str | None = None,
    ) -> None:
        """``publish`` for items a transaction committed as queued; a failure is logged:
        the reconciler re-sends queued items nobody claimed."""
        try:
            self.publish(keys, routes, countdown=countdown, queue=queue)
        except Exception:
            log.warning(
                "publishing %d map item message(s) failed after their commit; the reconciler "
                "will send them",
                len(keys),
                exc_info=True,
            )

    # --- an item's life -------------------------------------------------------------

    def run(
        self,
        execution_id: str,
        step_name: str,
        index: int,
        task_id: str | None,
        workflow_name: str,
        version: int,
    ) -> None:
        """Claim, run and record a delivered item, then the items this worker is handed;
        a claim that loses is a duplicate or early delivery, or a cancelled map: a no-op.
        Raises ``StepFailed`` when an item failed."""
        engine = self.engine
        workflow = engine.definition(workflow_name, version)
        step = workflow.steps.get(step_name) if workflow else None
        if workflow is None or step is None:
            # A worker without this workflow (a rolling deploy): leave the item queued
            # for one that has it (the reconciler re-sends it), never fail it here.
            log.warning(
                "map item %s/%s[%d] of unknown workflow %s v%s left queued",
                execution_id,
                step_name,
                index,
                workflow_name,
                version,
            )
            return
        if isinstance(step.wait, MapSpec) and step.wait.child is not None:
            # A child map's item: its claim starts its child execution; the child's end
            # ends the item (core.maps.child_item_ended).
            started = engine.manager.run(
                map_children.start_child_item,
                execution_id,
                workflow,
                step,
                index,
                task_id,
                engine.definition,
            )
            if started is not None:
                engine.publish_outcome(started)
            return
        claim = engine.manager.run(
            maps.claim_item, execution_id, step, index, engine.worker_id, task_id
        )
        if claim is None:
            log.info(
                "map item %s/%s[%d] not claimed: duplicate or early delivery, or its map ended",
                execution_id,
                step_name,
                index,
            )
            return
        if self._handed_back(claim, workflow):
            return
        deadline = time.monotonic() + engine.settings.continue_max_seconds
        continued = 0
        current: Claim | None = claim
        while current is not None:
            more = continued < engine.settings.continue_max_steps
            assert current.map_index is not None
            with step_context(
                current.execution_id,
                current.route.workflow,
                f"{current.step_name}[{current.map_index}]",
                current.attempt,
            ):
                outcome = self._run(current, workflow, step, more, deadline)
            if isinstance(outcome, StepFailed):
                raise outcome
            current = outcome
            continued += 1

    def _handed_back(self, claim: Claim, workflow: Workflow) -> bool:
        """Whether this worker's code may not finish the item's execution (core.shapes,
        as ``Engine._handed_back`` for a step), in which case the item was queued again:
        sent to a live worker with a compatible shape, or left for the reconciler's
        re-send."""
        engine = self.engine
        recorded = claim.route.shape
        if recorded is None or shape_of(workflow).hash == recorded:
            return False
        reason = engine.manager.run(shapes.judge, claim.execution_id, recorded, shape_of(workflow))
        if reason is None:
            return False
        assert claim.map_index is not None
        handed = engine.manager.run(
            shapes.hand_back_item,
            claim.execution_id,
            claim.step_name,
            claim.map_index,
            claim.attempt,
            engine.worker_id,
            engine.settings.stall_timeout,
        )
        if handed.applied:
            log.warning(
                "map item %s/%s[%d] handed back: %s",
                claim.execution_id,
                claim.step_name,
                claim.map_index,
                reason,
            )
            engine.metrics.handed_back(claim.route.workflow, waiting=handed.queue is None)
            if handed.queue is not None and handed.route is not None:
                key = (claim.execution_id, claim.step_name, claim.map_index)
                self.publish_committed(
                    [key], {claim.execution_id: handed.route}, queue=handed.queue
                )
        return True

    def _run(
        self, claim: Claim, workflow: Workflow, step: Step, may_continue: bool, deadline: float
    ) -> Claim | StepFailed | None:
        engine = self.engine
        assert claim.map_index is not None
        engine.metrics.claimed(claim)
        key = (claim.execution_id, claim.step_name, claim.map_index)
        with engine.heartbeats.beating_item(key):
            try:
                context = RunningStep(claim, workflow, engine.manager, engine.heartbeats)
                with engine.metrics.running(claim):
                    value = step.fn(context, claim.item, **claim.upstream)
                output = step.to_json(value)
                _check_size(step, output, engine.settings.max_payload_bytes)
            except SoftTimeLimitExceeded:
                timed_out = StepTimedOut(
                    f"item {claim.map_index} of map {step.name} ran past its soft timeout of "
                    f"{step.soft_timeout}s"
                )
                return self._failed(claim, workflow, step, timed_out)
            except Exception as error:
                return self._failed(claim, workflow, step, error)
            here = may_continue and time.monotonic() < deadline and _unlimited(step)
            completion: ItemCompletion = engine.recorder.run(
                maps.complete_item,
                claim,
                output,
                workflow,
                engine.worker_id if here else None,
                engine.definition,
            )
        if not completion.applied:
            log.info(
                "completion of map item %s/%s[%d] not applied: it is no longer running "
                "at attempt %d",
                claim.execution_id,
                claim.step_name,
                claim.map_index,
                claim.attempt,
            )
            return None
        engine.metrics.items(workflow.name, step.name, "succeeded")
        self._published(completion, claim.route)
        return completion.continued

    def _published(self, completion: ItemCompletion, route: Route) -> None:
        self.publish_committed(completion.queued, {k[0]: route for k in completion.queued})
        if completion.woken is not None:
            self.engine.publish_outcome(completion.woken)

    def _failed(
        self, claim: Claim, workflow: Workflow, step: Step, error: BaseException
    ) -> StepFailed | None:
        """Record an item's error as a retry to come, or its failure for good."""
        from worker.engine import error_record

        engine = self.engine
        tries = claim.attempt - claim.recoveries
        permanent = isinstance(error, InputValidationError | OutputNotStorable)
        record = error_record(error)
        if not permanent and step.retry.should_retry(error, tries):
            delay = step.retry.delay(tries)
            moved = engine.recorder.run(maps.retry_item, claim, delay, record)
            if not moved:
                return None
            engine.metrics.items(workflow.name, step.name, "retried")
            if delay <= engine.settings.retry_countdown_max:
                assert claim.map_index is not None
                key = (claim.execution_id, claim.step_name, claim.map_index)
                self.publish_committed([key], {claim.execution_id: claim.route}, countdown=delay)
            return _report(claim, error, step.retry.max_attempts, retry_in=delay)
        completion = engine.recorder.run(maps.fail_item, claim, record, workflow, engine.definition)
        if not completion.applied:
            return None
        engine.metrics.items(workflow.name, step.name, "failed")
        self._published(completion, claim.route)
        return _report(claim, error, step.retry.max_attempts)

    def record_hard_timeout(
        self,
        execution_id: str,
        step_name: str,
        index: int,
        task_id: str,
        limit: float | None,
        workflow_name: str,
        version: int,
    ) -> None:
        """The pool process running this item was killed at its hard time limit: record
        the item timed out now (retry or fail by its policy)."""
        engine = self.engine
        workflow = engine.definition(workflow_name, version)
        step = workflow.steps.get(step_name) if workflow else None
        if workflow is None or step is None:
            return
        claim = engine.manager.run(maps.running_item, execution_id, step, index, task_id)
        if claim is None:
            return
        error = StepTimedOut(
            f"item {index} of map {step_name} ran past its hard timeout of {limit}s"
        )
        with step_context(execution_id, workflow_name, f"{step_name}[{index}]", claim.attempt):
            self._failed(claim, workflow, step, error)


def _unlimited(step: Step) -> bool:
    return step.soft_timeout is None and step.timeout is None


def _check_size(step: Step, output: Any, max_bytes: int) -> None:
    from worker.engine import storable_output

    storable_output(step.name, output, max_bytes)


def _report(
    claim: Claim, error: BaseException, max_attempts: int, retry_in: float | None = None
) -> StepFailed:
    tries = claim.attempt - claim.recoveries
    report = StepFailed.of(
        error,
        execution_id=claim.execution_id,
        workflow=claim.route.workflow,
        step=f"{claim.step_name}[{claim.map_index}]",
        attempt=tries,
        max_attempts=max(tries, max_attempts),
        retry_in=retry_in,
    )
    log.warning("%s", report)
    return report
