"""Retention (core.retention): finished executions past their retention deleted with
everything of theirs, payloads cleared past theirs, never an open execution; by beat's
conveyor.prune, `conveyor prune` and its --dry-run."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from conveyor.api.app import create_app as create_api
from conveyor.api.auth import TOKEN_COOKIE
from conveyor.cli.main import CliState, app
from core.accounts import Role
from core.database import get_db_session
from core.errors import DefinitionError
from core.models import (
    ExecutionEvent,
    InboxEvent,
    MapItem,
    StepExecution,
    WorkflowExecution,
)
from core.workflows import Retention, Workflow
from tests.e2e.conftest import running_worker, wait_for
from tests.helpers.api import client, serve, user_with_token
from worker.app import ConveyorCelery
from worker.config import PRUNE
from worker.producer import enqueue, send_event

DAY = timedelta(days=1)


def _kept() -> Workflow:
    """A workflow with its own retention: 2 days succeeded, forever failed, payloads 1 day;
    a map and an event wait, so that items and inbox events go with an execution."""
    wf = Workflow(
        "kept",
        retention=Retention(succeeded=timedelta(days=2), failed="forever", payloads=DAY),
    )

    @wf.step()
    def numbers(ctx: Any) -> list[int]:
        if ctx.input and ctx.input.get("fail"):
            raise ValueError("told to fail")
        return [1, 2, 3]

    @wf.map(over="numbers")
    def double(ctx: Any, item: int) -> int:
        return item * 2

    wf.wait("go", event="go", depends_on=["double"], key=lambda ctx, **_: ctx.execution_id)
    return wf


def _plain() -> Workflow:
    wf = Workflow("plain")  # the settings' retention

    @wf.step()
    def only(ctx: Any) -> str:
        return "done"

    return wf


@pytest.fixture
def kept(conveyor_app: ConveyorCelery) -> Iterator[ConveyorCelery]:
    conveyor_app.engine.registry.register(_kept())
    conveyor_app.engine.registry.register(_plain())
    with running_worker(conveyor_app):
        yield conveyor_app


def _run_kept(app: ConveyorCelery, **input_: Any) -> str:
    execution_id = enqueue("kept", input_ or None, app=app)
    if not input_:
        wait_for(execution_id, lambda e: e.status == "running" and _waiting_for_go(e))
        send_event("go", key=execution_id, payload={"ok": True}, app=app)
    wait_for(execution_id)
    return execution_id


def _waiting_for_go(execution: Any) -> bool:
    with get_db_session() as db:
        status = db.execute(
            select(StepExecution.status).where(
                StepExecution.execution_id == execution.execution_id,
                StepExecution.step_name == "go",
            )
        ).scalar_one()
    return bool(status == "waiting")


def _age(execution_id: str, days: float) -> None:
    """Make an execution look as if it ended ``days`` ago."""
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == execution_id)
            .values(finished_at=datetime.now(UTC) - timedelta(days=days))
        )


def _rows(execution_id: str) -> dict[str, int]:
    with get_db_session() as db:

        def count(model: Any, column: Any) -> int:
            return int(
                db.execute(
                    select(func.count()).select_from(model).where(column == execution_id)
                ).scalar_one()
            )

        return {
            "execution": count(WorkflowExecution, WorkflowExecution.execution_id),
            "steps": count(StepExecution, StepExecution.execution_id),
            "events": count(ExecutionEvent, ExecutionEvent.execution_id),
            "items": count(MapItem, MapItem.execution_id),
            "inbox": count(InboxEvent, InboxEvent.consumed_by_execution),
        }


def test_a_finished_execution_past_its_retention_goes_with_everything_of_its_own(
    kept: ConveyorCelery,
) -> None:
    old, recent, failed = _run_kept(kept), _run_kept(kept), _run_kept(kept, fail=True)
    before = _rows(old)
    assert (before["steps"], before["items"], before["inbox"]) == (3, 3, 1)
    assert before["events"] > 0
    _age(old, 3)  # past the workflow's 2 days
    _age(recent, 1.5)
    _age(failed, 400)  # failed: kept forever
    report = kept.engine.prune()
    assert _rows(old) == {"execution": 0, "steps": 0, "events": 0, "items": 0, "inbox": 0}
    assert _rows(recent)["execution"] == 1
    assert _rows(failed)["execution"] == 1
    assert report.total("succeeded") == 1
    # A second pass finds nothing more to delete.
    assert kept.engine.prune().total("succeeded") == 0


def test_payloads_are_cleared_and_the_skeleton_kept(kept: ConveyorCelery) -> None:
    execution_id = _run_kept(kept)
    _age(execution_id, 1.5)  # past payloads=1 day, not past succeeded=2 days
    before = _rows(execution_id)
    report = kept.engine.prune()
    assert report.total("payloads") == 1
    with get_db_session() as db:
        execution = db.get(WorkflowExecution, execution_id)
        assert execution is not None
        assert execution.status == "succeeded"
        assert execution.output_data is None
        assert execution.payloads_cleared_at is not None
        outputs = db.execute(
            select(StepExecution.output_data, StepExecution.finished_at).where(
                StepExecution.execution_id == execution_id
            )
        ).all()
        assert [o for o, _ in outputs] == [None, None, None]
        assert all(finished is not None for _, finished in outputs)
        items = db.execute(
            select(MapItem.output_data).where(MapItem.execution_id == execution_id)
        ).scalars()
        assert list(items) == [None, None, None]
        payload = db.execute(
            select(InboxEvent.payload).where(InboxEvent.consumed_by_execution == execution_id)
        ).scalar_one()
        assert payload is None
    assert _rows(execution_id) == before  # statuses, timings and history stay
    assert kept.engine.prune().total("payloads") == 0


def test_open_executions_are_never_touched_whatever_their_age(kept: ConveyorCelery) -> None:
    waiting = enqueue("kept", app=kept)
    wait_for(waiting, lambda e: e.status == "running" and _waiting_for_go(e))
    _age(waiting, 1000)  # an open execution with an old finished_at (a retried one)
    report = kept.engine.prune()
    assert _rows(waiting)["execution"] == 1
    assert report.total() == 0
    send_event("go", key=waiting, app=kept)
    assert wait_for(waiting).status == "succeeded"


def test_the_settings_retention_applies_to_workflows_without_their_own(
    kept: ConveyorCelery,
) -> None:
    old = enqueue("plain", app=kept)
    young = enqueue("plain", app=kept)
    for execution_id in (old, young):
        wait_for(execution_id)
    _age(old, 31)  # the default is 30 days
    _age(young, 29)
    kept.engine.prune()
    assert (_rows(old)["execution"], _rows(young)["execution"]) == (0, 1)
    # A workflow no process registers any more: the settings' retention too.
    with get_db_session(commit=True) as db:
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id == young)
            .values(workflow_id="gone")
        )
    _age(young, 31)
    assert kept.engine.prune().total("succeeded") == 1
    assert _rows(young)["execution"] == 0
    forever = kept.engine.settings.model_copy(update={"retention_succeeded": None})
    kept.engine.settings = forever
    again = enqueue("plain", app=kept)
    wait_for(again)
    _age(again, 10_000)
    assert kept.engine.prune().total() == 0


def test_a_pruned_execution_frees_its_idempotency_key(kept: ConveyorCelery) -> None:
    first = enqueue("plain", idempotency_key="invoice-7", app=kept)
    assert enqueue("plain", idempotency_key="invoice-7", app=kept) == first
    wait_for(first)
    _age(first, 31)
    kept.engine.prune()
    second = enqueue("plain", idempotency_key="invoice-7", app=kept)
    assert second != first
    assert wait_for(second).status == "succeeded"


def test_prune_dry_run_changes_nothing_and_says_what_it_would_remove(
    kept: ConveyorCelery,
) -> None:
    ids = [enqueue("plain", app=kept) for _ in range(3)]
    for execution_id in ids:
        wait_for(execution_id)
        _age(execution_id, 40)
    runner, state = CliRunner(), CliState(celery_app=kept)
    dry = runner.invoke(app, ["prune", "--dry-run"], obj=state)
    assert dry.exit_code == 0, dry.output
    assert "Would remove" in dry.stdout
    assert "plain" in dry.stdout
    assert "3" in dry.stdout
    assert all(_rows(e)["execution"] == 1 for e in ids)
    done = runner.invoke(app, ["prune", "--json"], obj=state)
    assert done.exit_code == 0, done.output
    assert '"count": 3' in done.stdout
    assert all(_rows(e)["execution"] == 0 for e in ids)


def test_beat_task_runs_the_pass(kept: ConveyorCelery) -> None:
    execution_id = enqueue("plain", app=kept)
    wait_for(execution_id)
    _age(execution_id, 40)
    assert PRUNE in kept.conf.beat_schedule["conveyor-prune"]["task"]
    kept.tasks[PRUNE].apply()
    assert _rows(execution_id)["execution"] == 0


def test_the_api_shows_each_workflows_retention(kept: ConveyorCelery) -> None:
    _, token = user_with_token("ops@example.com", Role.ADMIN)
    with serve(create_api(kept)) as url, client(url, token) as http:
        own = http.get("/workflows/kept").json()["retention"]
        assert own == {
            "succeeded_seconds": 2 * 86400.0,
            "failed_seconds": None,
            "payloads_seconds": 86400.0,
        }
        default = http.get("/workflows/plain").json()["retention"]
        assert default == {
            "succeeded_seconds": 30 * 86400.0,
            "failed_seconds": 90 * 86400.0,
            "payloads_seconds": None,
        }
        http.cookies.set(TOKEN_COOKIE, token)
        page = http.get("/ui/workflows/kept")
        assert "succeeded 2 d, failed forever; payloads 1 d" in page.text


def test_bad_retention_is_refused_naming_the_field() -> None:
    with pytest.raises(DefinitionError, match=r"Retention\(failed=\) must not be negative"):
        Retention(failed=-DAY)
    with pytest.raises(DefinitionError, match=r"Retention\(payloads=\): a timedelta"):
        Retention(payloads=3)  # type: ignore[arg-type]
