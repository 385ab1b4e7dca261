"""Child workflows (``wf.child``) through a real worker, database and broker.

Beat does not run here: a test calls ``Engine.wake()`` (``conveyor.wake``) or
``Engine.reconcile()`` (``conveyor.reconcile``) when it wants them, and admits
executions itself (``Engine.admit``, what a start message runs) when no worker runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import Connection, event, select, update

from core import steps
from core.children import cancel_tree, child_id
from core.database import get_database, get_db_session
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from core.outcomes import WaitOutcome
from core.registry import WorkflowRegistry, configure_registry
from core.sql import utcnow
from core.waits import establish, read_execution
from core.workflows import Retry, StepContext, Workflow
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
from tests.faults.inject import LOG_ENV, faulty, injected_lines
from tests.helpers.state import execution_row, step_row
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue

RAN: list[tuple[str, str, object]] = []

# --- a parent that hands its extract to a child and reports the child's output -------

leaf = Workflow("children-leaf")


@leaf.step()
def double(ctx: StepContext) -> int:
    RAN.append((ctx.execution_id, "double", ctx.input))
    return int(ctx.input["n"]) * 2


parent = Workflow("children-parent")


@parent.step()
def extract(ctx: StepContext) -> dict[str, int]:
    return {"n": int(ctx.input["n"])}


parent.child(
    "load", workflow=leaf, depends_on=["extract"], input=lambda ctx, extract: {"n": extract["n"]}
)


@parent.step(depends_on=["load"])
def report(ctx: StepContext, load: dict[str, Any]) -> dict[str, Any]:
    RAN.append((ctx.execution_id, "report", load))
    return load


# --- a child that fails, under a parent step that retries once -------------------------

failing = Workflow("children-failing")


@failing.step()
def explode(ctx: StepContext) -> None:
    raise RuntimeError(f"boom in {ctx.execution_id}")


retrying = Workflow("children-retrying")
# A long backoff: the test makes the retry due itself (no beat runs here).
retrying.child("attempt", workflow=failing, retry=Retry(max_attempts=2, backoff=3600))


@retrying.step(depends_on=["attempt"])
def after(ctx: StepContext, attempt: Any) -> None:
    RAN.append((ctx.execution_id, "after", attempt))


# --- three levels: top -> middle -> bottom (a long sleep and a task) -------------------

bottom = Workflow("children-bottom", deadline=timedelta(days=1))
bottom.sleep("nap", duration=timedelta(hours=1))


@bottom.step()
def work(ctx: StepContext) -> str:
    return "worked"


middle = Workflow("children-middle")
middle.child("inner", workflow=bottom)
top = Workflow("children-top", deadline=timedelta(hours=1))
top.child("outer", workflow=middle)


@top.step(depends_on=["outer"])
def wrap_up(ctx: StepContext, outer: Any) -> None:
    RAN.append((ctx.execution_id, "wrap_up", outer))


class Count(BaseModel):
    n: int


counted = Workflow("children-counted", input_model=Count)
counted.step("count")(lambda ctx: ctx.input.n)
# Its input is refused by the child's model: the node fails, no child is started.
misfed = Workflow("children-misfed")
misfed.child("feed", workflow=counted, input=lambda ctx: {"n": "many"})

# A root child node: admitting the parent starts its child.
single = Workflow("children-single")
single.child("only", workflow=leaf, input=lambda ctx: {"n": 1})


@pytest.fixture
def app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    registry = WorkflowRegistry([parent, retrying, top, single, misfed])  # and children
    configure_registry(registry)
    RAN.clear()
    return create_app(clean_app_settings(database, redis_url), registry)


def _children_of(execution_id: str) -> list[dict[str, Any]]:
    with get_db_session() as session:
        rows = session.scalars(
            select(WorkflowExecution)
            .where(WorkflowExecution.parent_execution_id == execution_id)
            .order_by(WorkflowExecution.parent_attempt)
        ).all()
        return [
            {c.key: getattr(r, c.key) for c in WorkflowExecution.__table__.columns} for r in rows
        ]


def _reasons(execution_id: str, step: str | None) -> list[str | None]:
    with get_db_session() as session:
        query = select(ExecutionEvent.reason).where(ExecutionEvent.execution_id == execution_id)
        if step is None:
            query = query.where(ExecutionEvent.step_name.is_(None))
        else:
            query = query.where(ExecutionEvent.step_name == step)
        return list(session.scalars(query.order_by(ExecutionEvent.id)))


def _admit(app: ConveyorCelery, workflow: Workflow, execution_id: str) -> None:
    """What the start message of ``execution_id`` runs, here without a worker."""
    app.engine.admit(workflow.name, [execution_id])


def test_the_parent_gets_the_childs_output_and_its_dependent_runs_once(
    app: ConveyorCelery,
) -> None:
    with running_worker(app):
        execution_id = enqueue(parent, {"n": 21}, app=app, priority=7)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded", finished.error
    [child] = _children_of(execution_id)
    assert child["execution_id"] == child_id(execution_id, "load", 1)
    assert child["status"] == "succeeded"
    assert child["output_data"] == {"double": 42}
    # Where it hangs in its tree, and what it inherits from its parent.
    assert child["parent_step_name"] == "load"
    assert child["parent_attempt"] == 1
    assert child["root_execution_id"] == execution_id
    assert child["depth"] == 1
    assert child["priority"] == 7
    assert child["parent_woken_at"] is not None
    assert step_row(execution_id, "load")["output_data"] == {"double": 42}
    assert step_row(execution_id, "load")["child_execution_id"] == child["execution_id"]
    assert [r for r in RAN if r[1] == "report"] == [(execution_id, "report", {"double": 42})]
    assert [r for r in RAN if r[1] == "double"] == [(child["execution_id"], "double", {"n": 21})]
    assert finished.output_data == {"report": {"double": 42}}
    assert _reasons(execution_id, "load") == [
        "upstream steps done",
        f"child {child['execution_id']} succeeded",
    ]


def test_a_failed_child_fails_the_parent_step_whose_retry_starts_a_new_child(
    app: ConveyorCelery,
) -> None:
    with running_worker(app):
        execution_id = enqueue(retrying, {}, app=app)
        first = child_id(execution_id, "attempt", 1)
        # The first child failed: the parent step waits again, at its next attempt.
        wait_for(execution_id, lambda _: step_row(execution_id, "attempt")["attempt"] == 2)
        assert execution_row(first)["status"] == "failed"
        row = step_row(execution_id, "attempt")
        # Waiting again at its next attempt, unarmed until its backoff ends.
        assert row["status"] == "waiting"
        assert row["child_execution_id"] is None
        assert row["error"]["type"] == "ChildFailed"
        assert (
            f"child execution {first} of workflow 'children-failing' ended failed"
            in (row["error"]["message"])
        )
        assert "RuntimeError in step explode: boom in" in row["error"]["message"]
        with get_db_session(commit=True) as session:
            session.execute(
                update(StepExecution)
                .where(StepExecution.execution_id == execution_id)
                .where(StepExecution.step_name == "attempt")
                .values(wake_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        assert app.engine.wake() == 1
        finished = wait_for(execution_id)
    second = child_id(execution_id, "attempt", 2)
    assert second != first
    children = _children_of(execution_id)
    assert [(c["execution_id"], c["parent_attempt"], c["status"]) for c in children] == [
        (first, 1, "failed"),
        (second, 2, "failed"),
    ]
    assert finished.status == "failed"
    row = step_row(execution_id, "attempt")
    assert (row["status"], row["attempt"], row["child_execution_id"]) == ("failed", 2, second)
    assert f"child execution {second}" in row["error"]["message"]
    assert step_row(execution_id, "after")["status"] == "skipped"
    assert not [r for r in RAN if r[1] == "after"]


def test_a_child_whose_start_was_lost_after_its_commit_is_started_by_the_reconciler(
    app: ConveyorCelery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The transaction that created the child committed; its start message never left
    # (as when the worker dies between the commit and the publish).
    execution_id = enqueue(parent, {"n": 4}, app=app)
    child = child_id(execution_id, "load", 1)
    log = tmp_path / "injected"
    monkeypatch.setenv(LOG_ENV, str(log))
    with running_worker(app):
        with monkeypatch.context() as patched:
            patched.setattr(
                ConveyorCelery, "send_task", faulty(ConveyorCelery.send_task, f"fail-start:{child}")
            )
            # Until the publish after the child's commit has failed.
            wait_for(execution_id, lambda _: bool(injected_lines(log)))
        assert execution_row(child)["status"] == "pending"
        assert step_row(execution_id, "load")["child_execution_id"] == child
        assert step_row(execution_id, "load")["status"] == "waiting"
        with get_db_session(commit=True) as session:
            session.execute(
                update(WorkflowExecution)
                .where(WorkflowExecution.execution_id == child)
                .values(updated_at=utcnow(-app.engine.settings.start_after - 1))
            )
        report = app.engine.reconcile()
        assert [started for started, _, _ in report.start] == [child]
        finished = wait_for(execution_id)
    assert finished.status == "succeeded", finished.error
    assert [c["execution_id"] for c in _children_of(execution_id)] == [child]
    assert [r for r in RAN if r[1] == "report"] == [(execution_id, "report", {"double": 8})]


def test_a_replayed_establishment_finds_the_child_it_started(app: ConveyorCelery) -> None:
    execution_id = enqueue(middle, {}, app=app)
    _admit(app, middle, execution_id)  # the root child node is established: a child
    expected = child_id(execution_id, "inner", 1)
    assert [c["execution_id"] for c in _children_of(execution_id)] == [expected]

    def replay(conn: Any) -> WaitOutcome:
        # The establishing transaction once more, as a replay after a lost commit
        # acknowledgement would run it.
        execution = read_execution(conn, execution_id, middle)
        row = conn.execute(
            select(StepExecution.execution_id, StepExecution.step_name, StepExecution.attempt)
            .where(StepExecution.execution_id == execution_id)
            .where(StepExecution.step_name == "inner")
        ).one()
        outcome = WaitOutcome()
        establish(conn, execution, [row], {}, app.engine.definition, outcome)
        return outcome

    again = app.engine.manager.run(replay)
    assert again.starts == []  # nothing new to start
    children = _children_of(execution_id)
    assert [c["execution_id"] for c in children] == [expected]
    assert step_row(execution_id, "inner")["child_execution_id"] == expected
    with get_db_session() as session:
        steps = session.scalars(
            select(StepExecution.step_name).where(StepExecution.execution_id == expected)
        ).all()
    assert sorted(steps) == ["nap", "work"]  # its steps inserted once
    assert _reasons(expected, None) == ["created"]


def test_a_child_past_the_depth_limit_fails_its_node_and_is_not_started(
    app: ConveyorCelery,
) -> None:
    # Registration refuses definitions nesting deeper than 8; an execution already that
    # deep (its parent's definition changed since) is refused at run time too.
    execution_id = enqueue(middle, {}, app=app)
    with get_db_session(commit=True) as session:
        session.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == execution_id)
            .values(depth=8)
        )
    _admit(app, middle, execution_id)
    row = step_row(execution_id, "inner")
    assert row["status"] == "failed"
    assert row["error"]["type"] == "DefinitionError"
    assert (
        "would nest 9 levels below its root execution; the limit is 8" in (row["error"]["message"])
    )
    assert row["child_execution_id"] is None
    assert _children_of(execution_id) == []
    assert execution_row(execution_id)["status"] == "failed"


def test_an_input_the_child_refuses_fails_its_node_and_starts_nothing(
    app: ConveyorCelery,
) -> None:
    execution_id = enqueue(misfed, {}, app=app)
    _admit(app, misfed, execution_id)
    row = step_row(execution_id, "feed")
    assert row["status"] == "failed"
    assert row["error"]["type"] == "InputValidationError"
    assert "input for workflow 'children-counted' is not valid: n:" in row["error"]["message"]
    assert _children_of(execution_id) == []
    assert execution_row(execution_id)["status"] == "failed"


def test_cancelling_the_parent_cancels_the_whole_tree_in_its_transaction(
    app: ConveyorCelery,
) -> None:
    execution_id = enqueue(top, {}, app=app)
    _admit(app, top, execution_id)
    [mid] = _children_of(execution_id)
    _admit(app, middle, mid["execution_id"])
    [low] = _children_of(mid["execution_id"])
    _admit(app, bottom, low["execution_id"])
    assert (low["depth"], low["root_execution_id"]) == (2, execution_id)
    assert step_row(low["execution_id"], "nap")["status"] == "waiting"
    # A task of the grandchild running in some worker: its Celery task is revoked too.
    with get_db_session(commit=True) as session:
        session.execute(
            update(StepExecution)
            .where(StepExecution.execution_id == low["execution_id"])
            .where(StepExecution.step_name == "work")
            .values(status="running", celery_task_id="task-of-the-grandchild")
        )

    cancelled = app.engine.manager.run(cancel_tree, execution_id, "enough", app.engine.definition)

    assert cancelled.result.applied
    assert cancelled.running == ["task-of-the-grandchild"]
    for tree_member in (execution_id, mid["execution_id"], low["execution_id"]):
        assert execution_row(tree_member)["status"] == "cancelled"
    assert _reasons(mid["execution_id"], None)[-1] == "parent cancelled"
    assert _reasons(low["execution_id"], None)[-1] == "parent cancelled"
    assert step_row(execution_id, "outer")["status"] == "cancelled"
    assert step_row(execution_id, "wrap_up")["status"] == "cancelled"
    assert step_row(mid["execution_id"], "inner")["status"] == "cancelled"
    for name in ("nap", "work"):
        assert step_row(low["execution_id"], name)["status"] == "cancelled"
        assert _reasons(low["execution_id"], name)[-1] == "parent cancelled"
    # The cascade told no parent anything (each parent was cancelled itself).
    assert execution_row(mid["execution_id"])["parent_woken_at"] is not None
    assert execution_row(low["execution_id"])["parent_woken_at"] is not None
    # Cancelling again changes nothing.
    assert not app.engine.cancel(execution_id)


def test_cancelling_a_child_fails_its_parent_step(app: ConveyorCelery) -> None:
    execution_id = enqueue(middle, {}, app=app)
    _admit(app, middle, execution_id)
    [low] = _children_of(execution_id)
    assert app.engine.cancel(low["execution_id"], reason="not needed")
    row = step_row(execution_id, "inner")
    assert row["status"] == "failed"
    assert row["error"]["type"] == "ChildFailed"
    assert "ended cancelled" in row["error"]["message"]
    assert execution_row(execution_id)["status"] == "failed"
    assert execution_row(low["execution_id"])["parent_woken_at"] is not None


def test_a_child_past_its_deadline_times_out_and_fails_its_parent_step_in_one_pass(
    app: ConveyorCelery,
) -> None:
    execution_id = enqueue(top, {}, app=app)
    _admit(app, top, execution_id)
    [mid] = _children_of(execution_id)
    _admit(app, middle, mid["execution_id"])
    [low] = _children_of(mid["execution_id"])
    # Deadlines are capped by the parent's: top's hour bounds every level below it,
    # though bottom's own deadline is a day and middle has none.
    top_deadline = execution_row(execution_id)["deadline_at"]
    assert mid["deadline_at"] == top_deadline
    assert low["deadline_at"] == top_deadline
    with get_db_session(commit=True) as session:
        session.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == low["execution_id"])
            .values(deadline_at=datetime.now(UTC) - timedelta(seconds=1))
        )

    report = app.engine.reconcile()

    assert report.timed_out == [low["execution_id"]]
    assert execution_row(low["execution_id"])["status"] == "timed_out"
    row = step_row(mid["execution_id"], "inner")
    assert row["status"] == "failed"
    assert row["error"]["type"] == "ChildFailed"
    assert (
        f"child execution {low['execution_id']} of workflow 'children-bottom' ended "
        in (row["error"]["message"])
    )
    assert "ended timed_out" in row["error"]["message"]
    # middle ended with it, and told top in the same pass: the failure went all the way up.
    assert execution_row(mid["execution_id"])["status"] == "failed"
    assert step_row(execution_id, "outer")["status"] == "failed"
    assert execution_row(execution_id)["status"] == "failed"
    assert step_row(execution_id, "wrap_up")["status"] == "skipped"
    assert report.parents_woken == [low["execution_id"]]
    assert execution_row(mid["execution_id"])["parent_woken_at"] is not None
    assert report.woken is not None
    assert {result.execution_id for result, _ in report.woken.finished} == {
        mid["execution_id"],
        execution_id,
    }


# --- a parent cancelled while its child finishes (PostgreSQL: row locks) --------------


@pytest.mark.postgresql_only
@pytest.mark.parametrize("first", ["cancel", "child"])
def test_a_parent_cancelled_while_its_child_finishes_does_not_deadlock(
    app: ConveyorCelery, first: str
) -> None:
    # Two transactions on two connections, each run once (no retry of the runner: a
    # deadlock fails the test). The child's last step completes: its transaction holds
    # the child's row, then tells the parent (the parent's step, then the parent's row).
    # The parent is cancelled: its transaction holds the parent's row and steps, then
    # cascades to the child's row.
    # - "cancel": the cancel holds the parent's step first; the child skips the step
    #   another transaction holds (it is being ended), and the next reconciler pass finds
    #   the parent no longer waiting.
    # - "child": the child ended the parent's step first; the cancel then holds the
    #   parent's row, which the child's finish check and re-park leave to it.
    engine = app.engine
    execution_id = enqueue(single, {}, app=app)
    _admit(app, single, execution_id)
    child = child_id(execution_id, "only", 1)
    _admit(app, leaf, child)
    claim = engine.manager.run(steps.claim, child, "double", "w1", "task-1", [], lambda _: [])
    assert claim is not None
    child_paused, cancel_reached = threading.Event(), threading.Event()
    told: list[str] = []

    def before(_conn: Any, _cursor: Any, text: str, *_: Any) -> None:
        name = threading.current_thread().name.partition("_")[0]
        if name == "child" and text.startswith("SELECT") and "parent_woken_at IS NULL" in text:
            told.append(text)
            if first == "cancel":
                child_paused.set()  # it holds the child's row
                assert cancel_reached.wait(10)
        ended_parent_step = first == "child" and told and not child_paused.is_set()
        if name == "child" and ended_parent_step and "pg_advisory_xact_lock" in text:
            # It ended the parent's step; next, the parent's finish check.
            child_paused.set()
            assert cancel_reached.wait(10)
        if name == "cancel":
            if first == "cancel" and "WITH RECURSIVE" in text and "celery_task_id" not in text:
                cancel_reached.set()  # the cascade: the parent's steps are held
            if first == "child" and text.startswith("UPDATE execution_steps SET status"):
                cancel_reached.set()  # the parent's row is held; its steps come next

    database = get_database().engine
    event.listen(database, "before_cursor_execute", before)

    def in_transaction(work: Callable[[Connection], Any]) -> Any:
        with database.begin() as conn:
            return work(conn)

    def complete(conn: Connection) -> Any:
        return steps.complete(conn, claim, 2, "2", leaf, None, engine.definition)

    def cancel(conn: Connection) -> Any:
        return cancel_tree(conn, execution_id, "enough", engine.definition)

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="child") as one:
            completion = one.submit(in_transaction, complete)
            assert child_paused.wait(10)
            with ThreadPoolExecutor(1, thread_name_prefix="cancel") as other:
                cancelled = other.submit(in_transaction, cancel)
                assert completion.result(timeout=20).execution.to_status == "succeeded"
                assert cancelled.result(timeout=20).result.applied
    finally:
        event.remove(database, "before_cursor_execute", before)
    assert execution_row(child)["status"] == "succeeded"  # it ended before the cascade
    assert execution_row(execution_id)["status"] == "cancelled"
    if first == "cancel":
        assert step_row(execution_id, "only")["status"] == "cancelled"
        assert execution_row(child)["parent_woken_at"] is None  # skipped: the step was held
        report = engine.reconcile()
        assert report.parents_woken == [child]
        assert step_row(execution_id, "only")["status"] == "cancelled"
    else:
        assert step_row(execution_id, "only")["status"] == "succeeded"
        assert step_row(execution_id, "only")["output_data"] == {"double": 2}
    assert execution_row(child)["parent_woken_at"] is not None
