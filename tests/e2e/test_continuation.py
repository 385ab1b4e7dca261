"""In-worker continuation: a worker that completes a step runs the next released step
of the same execution itself, and every guarantee holds for it as for a delivered one."""

from __future__ import annotations

import itertools

from sqlalchemy import select

from core.database import get_db_session
from core.models import ExecutionEvent, StepExecution
from tests.e2e import workflows
from tests.e2e.conftest import running_worker, wait_for
from tests.helpers.state import events, step_row
from worker.app import ConveyorCelery
from worker.producer import enqueue

CONTINUED = "continued in worker"


def reasons(execution_id: str, step_name: str) -> list[str]:
    """Why each event of the step was written, oldest first."""
    with get_db_session() as db:
        rows = db.execute(
            select(ExecutionEvent.reason)
            .where(
                ExecutionEvent.execution_id == execution_id,
                ExecutionEvent.step_name == step_name,
            )
            .order_by(ExecutionEvent.id)
        ).scalars()
        return [r or "" for r in rows]


def start_order() -> list[tuple[str, str]]:
    """(execution, step) of every step that started, in the order they started."""
    with get_db_session() as db:
        rows = db.execute(
            select(StepExecution.execution_id, StepExecution.step_name)
            .where(StepExecution.started_at.is_not(None))
            .order_by(StepExecution.started_at)
        ).all()
        return [(r.execution_id, r.step_name) for r in rows]


def test_a_chain_continues_in_the_worker_and_records_each_continued_step(
    worker: ConveyorCelery,
) -> None:
    execution_id = enqueue("linear", {"start": 3}, app=worker)
    execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert execution.output_data == {"describe": {"result": 7, "attempt": 1}}
    # The root was claimed by the worker that admitted the execution (no message of
    # its own); each later step by the transaction that completed the step before it.
    assert reasons(execution_id, "double") == ["root step", "claimed at start", "step succeeded"]
    for name in ("add_one", "describe"):
        assert reasons(execution_id, name) == [
            "upstream steps done",
            CONTINUED,
            "step succeeded",
        ]
    assert step_row(execution_id, "describe")["celery_task_id"] is None


def test_a_continued_step_cancelled_mid_run_stops(worker: ConveyorCelery) -> None:
    workflows.RELAY_STARTED.clear()
    workflows.RELAY_RELEASE.clear()
    execution_id = enqueue("relay", {"wait": True}, app=worker)
    assert workflows.RELAY_STARTED.wait(10)
    assert CONTINUED in reasons(execution_id, "carry")

    assert worker.engine.cancel(execution_id)

    execution = wait_for(
        execution_id, lambda _: step_row(execution_id, "carry")["output_data"] is not None
    )
    assert execution.status == "cancelled"
    carry = step_row(execution_id, "carry")
    assert carry["status"] == "cancelled"
    assert carry["output_data"] == "saw cancellation"


def test_a_continued_step_delivered_again_runs_once(worker: ConveyorCelery) -> None:
    workflows.RELAY_STARTED.clear()
    workflows.RELAY_RELEASE.clear()
    execution_id = enqueue("relay", {"wait": True}, app=worker)
    assert workflows.RELAY_STARTED.wait(10)
    assert CONTINUED in reasons(execution_id, "carry")
    # What a reconciler republish or a broker redelivery would send while it runs.
    worker.engine.publish_steps([(execution_id, "carry"), (execution_id, "carry")])
    workflows.RELAY_RELEASE.set()
    execution = wait_for(execution_id)
    # And once more after it ended.
    worker.engine.publish_steps([(execution_id, "carry")])
    wait_for(execution_id, lambda _: True)

    assert execution.status == "succeeded"
    assert execution.output_data == {"carry": "handed over, carried"}
    assert workflows.CALLS[(execution_id, "carry")] == 1
    history = events(execution_id)
    assert history.count(("carry", "queued", "running")) == 1
    assert history.count(("carry", "running", "succeeded")) == 1


def test_continuation_stops_at_its_bound_and_other_work_gets_the_worker(
    conveyor_app: ConveyorCelery,
) -> None:
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"continue_max_steps": 3})
    first = enqueue("long_chain", app=conveyor_app)
    second = enqueue("long_chain", app=conveyor_app)
    # Both running before the worker starts (a new execution would wait its turn).
    engine.admit("long_chain", [first, second])
    with running_worker(conveyor_app, concurrency=1):
        wait_for(first)
        wait_for(second)
    for execution_id in (first, second):
        claims = [
            "continued" if reasons(execution_id, f"s{i:02d}")[1] == CONTINUED else "first"
            for i in range(12)
        ]
        runs = [
            len(list(group)) for kind, group in itertools.groupby(claims) if kind == "continued"
        ]
        assert max(runs) == 3, claims
    # One worker thread ran both chains: with the bound, they took turns instead of one
    # running to its end before the other began.
    order = [execution_id for execution_id, _ in start_order()]
    assert order.index(second) < len(order) - 1 - order[::-1].index(first)


def test_a_high_priority_execution_starts_within_one_slice_of_a_long_chain(
    conveyor_app: ConveyorCelery,
) -> None:
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"continue_max_seconds": 0.05})
    chain = enqueue("long_chain", app=conveyor_app)
    with running_worker(conveyor_app, concurrency=1):
        wait_for(chain, lambda _: step_row(chain, "s01")["status"] == "succeeded")
        urgent = enqueue("quick", priority=9, app=conveyor_app)
        wait_for(urgent)
        wait_for(chain)
    urgent_start = step_row(urgent, "at_once")["started_at"]
    # The chain gave the worker up after its slice: the urgent step ran in the middle
    # of the chain, not after it.
    assert urgent_start < step_row(chain, "s11")["started_at"]


def test_a_step_that_runs_past_the_bound_hands_its_successor_to_the_broker(
    conveyor_app: ConveyorCelery,
) -> None:
    """The bound is judged after each step, its run included: lingering's first step
    starts well within 0.1 s and runs 0.3 s, so its successor is published, not
    continued."""
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"continue_max_seconds": 0.1})
    execution_id = enqueue("lingering", app=conveyor_app)
    with running_worker(conveyor_app):
        execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert reasons(execution_id, "s00")[1] == "claimed at start"
    assert reasons(execution_id, "s01") == ["upstream steps done", "claimed", "step succeeded"]
    # Delivered by a message of its own.
    assert step_row(execution_id, "s01")["celery_task_id"] is not None
