"""Repairing a failed execution (core.repair): resolve a failed step with an output, or
skip it, through Python, the CLI and the API; the execution goes on from there, and the
history says who did it and why."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import select
from typer.testing import CliRunner

from conveyor.api.app import create_app as create_api
from conveyor.cli.main import CliState, app
from core.accounts import Role
from core.database import get_db_session
from core.errors import InputValidationError, InvalidTransition
from core.models import ExecutionEvent
from core.workflows import Workflow
from tests.e2e.conftest import running_worker, wait_for
from tests.helpers.api import client, serve, user_with_token
from tests.helpers.state import (
    events,
    execution_row,
    force_execution_status,
    force_step_status,
    step_row,
)
from worker.app import ConveyorCelery
from worker.producer import enqueue, resolve, skip

RUNS: Counter[tuple[str, str]] = Counter()
SEEN: dict[str, Any] = {}


class Total(BaseModel):
    amount: int
    currency: str = "EUR"


def _mend() -> Workflow:
    """a -> b (fails: the outside system is down) -> c -> d, and b -> report (none_failed)."""
    wf = Workflow("mend")

    @wf.step()
    def a(ctx: Any) -> int:
        RUNS[(ctx.execution_id, "a")] += 1
        return 1

    @wf.step(depends_on=["a"])
    def b(ctx: Any, a: int) -> Total:
        RUNS[(ctx.execution_id, "b")] += 1
        raise ConnectionError("billing is down")

    @wf.step(depends_on=["b"])
    def c(ctx: Any, b: dict[str, Any]) -> int:
        RUNS[(ctx.execution_id, "c")] += 1
        SEEN[ctx.execution_id] = b
        return int(b["amount"]) * 2

    @wf.step(depends_on=["c"])
    def d(ctx: Any, c: int) -> int:
        RUNS[(ctx.execution_id, "d")] += 1
        return c + 1

    @wf.step(depends_on=["b"], trigger="none_failed")
    def report(ctx: Any, b: dict[str, Any] | None) -> str:
        RUNS[(ctx.execution_id, "report")] += 1
        return "without billing" if b is None else f"billed {b['amount']}"

    return wf


@pytest.fixture
def mend(conveyor_app: ConveyorCelery) -> Iterator[ConveyorCelery]:
    conveyor_app.engine.registry.register(_mend())
    RUNS.clear()
    with running_worker(conveyor_app):
        yield conveyor_app


def _failed(app: ConveyorCelery, **options: Any) -> str:
    execution_id = enqueue("mend", app=app, **options)
    assert wait_for(execution_id).status == "failed"
    assert step_row(execution_id, "b")["status"] == "failed"
    return execution_id


def test_an_output_that_does_not_fit_is_refused_naming_the_field_and_changes_nothing(
    mend: ConveyorCelery,
) -> None:
    execution_id = _failed(mend)
    before = events(execution_id)
    with pytest.raises(InputValidationError, match=r"output\.amount") as refused:
        resolve(execution_id, "b", {"amount": "lots"}, app=mend)
    assert [e["field"] for e in refused.value.errors] == ["output.amount"]
    assert events(execution_id) == before
    assert execution_row(execution_id)["status"] == "failed"
    assert step_row(execution_id, "b")["status"] == "failed"


def test_an_output_past_the_payload_limit_is_refused_and_changes_nothing(
    mend: ConveyorCelery,
) -> None:
    # As a step's own output would be (OutputNotStorable): CONVEYOR_MAX_PAYLOAD_BYTES.
    execution_id = _failed(mend)
    before = events(execution_id)
    limit = mend.engine.settings.max_payload_bytes
    huge = {"amount": 1, "currency": "x" * limit}
    with pytest.raises(InputValidationError, match="CONVEYOR_MAX_PAYLOAD_BYTES"):
        resolve(execution_id, "b", huge, app=mend)
    assert events(execution_id) == before
    assert step_row(execution_id, "b")["status"] == "failed"


def test_resolving_a_step_mid_dag_runs_its_dependents_once_with_that_output(
    mend: ConveyorCelery,
) -> None:
    execution_id = _failed(mend)
    resolve(execution_id, "b", {"amount": 21}, reason="billed by hand", actor="ops", app=mend)
    execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert SEEN[execution_id] == {"amount": 21, "currency": "EUR"}  # as the annotation made it
    assert execution.output_data == {"d": 43, "report": "billed 21"}
    assert RUNS[(execution_id, "b")] == 1  # never run again
    assert RUNS[(execution_id, "c")] == RUNS[(execution_id, "d")] == 1
    assert RUNS[(execution_id, "a")] == 1  # done steps keep their outputs
    history = events(execution_id)
    assert ("b", "failed", "succeeded") in history
    with pytest.raises(InvalidTransition, match="only a failed step"):
        resolve(execution_id, "b", {"amount": 1}, app=mend)  # once is all


def test_the_history_names_who_resolved_and_why(mend: ConveyorCelery) -> None:
    execution_id = _failed(mend)
    resolve(execution_id, "b", {"amount": 2}, reason="billed by hand", actor="ops", app=mend)
    wait_for(execution_id)
    with get_db_session() as db:
        reasons = db.execute(
            select(ExecutionEvent.reason).where(
                ExecutionEvent.execution_id == execution_id, ExecutionEvent.step_name == "b"
            )
        ).scalars()
        assert "resolved by ops: billed by hand" in list(reasons)


def test_skipping_a_step_skips_its_all_success_dependents_and_runs_the_others(
    mend: ConveyorCelery,
) -> None:
    execution_id = _failed(mend)
    skip(execution_id, "b", reason="no billing this month", actor="ops", app=mend)
    execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert {n: step_row(execution_id, n)["status"] for n in ("b", "c", "d", "report")} == {
        "b": "skipped",
        "c": "skipped",
        "d": "skipped",
        "report": "succeeded",
    }
    assert RUNS[(execution_id, "c")] == 0
    assert RUNS[(execution_id, "report")] == 1
    assert execution.output_data == {"d": None, "report": "without billing"}


def test_a_resolve_racing_a_retry_applies_once(conveyor_app: ConveyorCelery) -> None:
    conveyor_app.engine.registry.register(_mend())
    with running_worker(conveyor_app):
        execution_id = _failed(conveyor_app)
    # No worker from here on: a retried execution stays pending, so it cannot fail again
    # and be repaired afterwards (two operations one after the other, not a race).
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def do_resolve() -> None:
        barrier.wait()
        try:
            resolve(execution_id, "b", {"amount": 5}, app=conveyor_app)
            outcomes.append("resolved")
        except InvalidTransition:
            outcomes.append("refused")

    def do_retry() -> None:
        barrier.wait()
        outcomes.append("retried" if conveyor_app.engine.retry(execution_id) else "refused")

    threads = [threading.Thread(target=do_resolve), threading.Thread(target=do_retry)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) in (["refused", "resolved"], ["refused", "retried"])
    reopened = [e for e in events(execution_id) if e == (None, "failed", "pending")]
    assert len(reopened) == 1


def test_resolve_and_skip_from_the_command_line(mend: ConveyorCelery) -> None:
    first, second = _failed(mend), _failed(mend)
    state = CliState(celery_app=mend)
    runner = CliRunner()
    bad = runner.invoke(app, ["resolve", first, "b", "--output", '{"amount": []}'], obj=state)
    assert bad.exit_code == 1
    assert "output.amount" in bad.stderr
    done = runner.invoke(
        app, ["resolve", first, "b", "--output", '{"amount": 4}', "--reason", "fixed"], obj=state
    )
    assert done.exit_code == 0, done.output
    skipped = runner.invoke(app, ["skip", second, "b"], obj=state)
    assert skipped.exit_code == 0, skipped.output
    assert "skipped with it: c, d" in skipped.stdout
    assert wait_for(first).output_data == {"d": 9, "report": "billed 4"}
    assert wait_for(second).status == "succeeded"


def test_the_api_lets_the_owner_and_admins_repair_and_no_one_else(mend: ConveyorCelery) -> None:
    owner_id, owner_token = user_with_token("owner@example.com")
    _, other_token = user_with_token("other@example.com")
    _, admin_token = user_with_token("admin@example.com", Role.ADMIN)
    mine = _failed(mend, triggered_by=owner_id)
    theirs = _failed(mend, triggered_by=owner_id)
    with (
        serve(create_api(mend)) as url,
        client(url, owner_token) as owner,
        client(url, other_token) as other,
        client(url, admin_token) as admin,
    ):
        path = f"/executions/{mine}/steps/b/resolve"
        assert other.post(path, json={"output": {"amount": 1}}).status_code == 404
        refused = owner.post(path, json={"output": {"amount": "x"}})
        assert refused.status_code == 422
        assert [e["field"] for e in refused.json()["errors"]] == ["output.amount"]
        assert (
            owner.post(f"/executions/{mine}/steps/a/resolve", json={"output": 1}).status_code == 409
        )
        done = owner.post(path, json={"output": {"amount": 7}, "reason": "by hand"})
        assert done.status_code == 200, done.text
        # Re-opened: pending until a worker admits it, which may already have happened.
        assert done.json()["status"] in ("pending", "running")
        assert done.json()["attempt"] == 2
        assert other.post(f"/executions/{theirs}/steps/b/skip", json={}).status_code == 404
        assert admin.post(f"/executions/{theirs}/steps/b/skip", json={}).status_code == 200
    assert wait_for(mine).output_data == {"d": 15, "report": "billed 7"}
    assert wait_for(theirs).status == "succeeded"
    assert ("b", "failed", "skipped") in events(theirs)


def _joined() -> Workflow:
    """a -> b (fails) -> c, and e after both b and c with none_failed: a skip of b skips
    c, and e must still run (its upstream steps have all ended)."""
    wf = Workflow("mend_joined")

    @wf.step()
    def a(ctx: Any) -> int:
        return 1

    @wf.step(depends_on=["a"])
    def b(ctx: Any, a: int) -> int:
        raise ConnectionError("down")

    @wf.step(depends_on=["b"])
    def c(ctx: Any, b: int) -> int:
        return b

    @wf.step(depends_on=["b", "c"], trigger="none_failed")
    def e(ctx: Any, b: int | None, c: int | None) -> str:
        RUNS[(ctx.execution_id, "e")] += 1
        return f"b={b} c={c}"

    return wf


def _mapped() -> Workflow:
    """numbers -> double (a map whose items fail) -> total."""
    wf = Workflow("mend_mapped")

    @wf.step()
    def numbers(ctx: Any) -> list[int]:
        return [1, 2, 3]

    @wf.map(over="numbers")
    def double(ctx: Any, item: int) -> int:
        raise ConnectionError("down")

    @wf.step(depends_on=["double"])
    def total(ctx: Any, double: list[int]) -> int:
        return sum(double)

    return wf


def test_skipping_a_step_runs_a_none_failed_step_that_also_waited_for_a_skipped_one(
    conveyor_app: ConveyorCelery,
) -> None:
    conveyor_app.engine.registry.register(_joined())
    with running_worker(conveyor_app):
        execution_id = enqueue("mend_joined", app=conveyor_app)
        assert wait_for(execution_id).status == "failed"
        skip(execution_id, "b", app=conveyor_app)
        execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert execution.output_data == {"e": "b=None c=None"}
    assert RUNS[(execution_id, "e")] == 1
    assert step_row(execution_id, "c")["status"] == "skipped"


def test_a_map_step_is_resolved_with_the_list_of_its_items_outputs(
    conveyor_app: ConveyorCelery,
) -> None:
    conveyor_app.engine.registry.register(_mapped())
    with running_worker(conveyor_app):
        execution_id = enqueue("mend_mapped", app=conveyor_app)
        assert wait_for(execution_id).status == "failed"
        with pytest.raises(InputValidationError, match="must be a list"):
            resolve(execution_id, "double", 5, app=conveyor_app)
        with pytest.raises(InputValidationError) as refused:
            resolve(execution_id, "double", [2, "four", 6], app=conveyor_app)
        assert [e["field"] for e in refused.value.errors] == ["output.1"]
        assert step_row(execution_id, "double")["status"] == "failed"
        resolve(execution_id, "double", [2, 4, 6], app=conveyor_app)
        execution = wait_for(execution_id)
    assert execution.status == "succeeded"
    assert execution.output_data == {"total": 12}


def test_resolving_the_last_open_step_finishes_the_execution_at_once(
    mend: ConveyorCelery,
) -> None:
    # Every other step already ended (c and d resolved, report ran): nothing is left to
    # run, so the repair's own start finishes the execution, not the next reconciler pass.
    execution_id = _failed(mend)
    resolve(execution_id, "b", {"amount": 2}, app=mend)
    assert wait_for(execution_id).status == "succeeded"
    force_step_status(execution_id, "d", "failed", error={"type": "Boom", "message": "late"})
    force_execution_status(execution_id, "failed")
    resolve(execution_id, "d", 99, app=mend)
    began = time.monotonic()
    execution = wait_for(execution_id, timeout=30)
    print(f"\nfinished {time.monotonic() - began:.2f}s after the resolve")
    assert execution.status == "succeeded"
    assert execution.output_data == {"d": 99, "report": "billed 2"}
