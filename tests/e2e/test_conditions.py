"""Conditional steps through a real worker, database and broker: ``when=`` conditions,
``trigger=`` rules, the reach of a skip, and optional steps (``on_exhausted="skip"``)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from core.database import get_db_session
from core.errors import DefinitionError
from core.models import ExecutionEvent
from core.registry import WorkflowRegistry, configure_registry
from core.workflows import Concurrency, Retry, StepContext, Workflow
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, running_worker, wait_for
from tests.helpers.state import (
    database_reachable_for,
    execution_row,
    force_step_status,
    step_row,
)
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue


def _diamond(trigger: str, b_fails: bool) -> Workflow:
    """a -> (b, c) -> d: b skipped by its condition (input kind is not "refund") or
    failing; d under ``trigger``."""
    wf = Workflow(f"cond-diamond-{trigger}-{'fail' if b_fails else 'skip'}")

    @wf.step()
    def a(ctx: StepContext) -> dict[str, str]:
        return {"kind": ctx.input["kind"]}

    if b_fails:

        @wf.step(depends_on=["a"])
        def b(ctx: StepContext, a: dict[str, str]) -> str:
            raise RuntimeError("b broke")

    else:

        @wf.step(depends_on=["a"], when=lambda ctx, a: a["kind"] == "refund")
        def b(ctx: StepContext, a: dict[str, str]) -> str:
            return "b ran"

    @wf.step(depends_on=["a"])
    def c(ctx: StepContext, a: dict[str, str]) -> str:
        return "c ran"

    @wf.step(depends_on=["b", "c"], trigger=trigger)
    def d(ctx: StepContext, b: str | None, c: str | None) -> dict[str, str | None]:
        return {"b": b, "c": c}

    return wf


DIAMONDS = {
    (t, f): _diamond(t, f)
    for t in ("all_success", "none_failed", "all_done")
    for f in (False, True)
}


def is_go(ctx: StepContext, up: str) -> bool:
    return bool(ctx.input.get("go"))


# r -> x (condition false) -> y -> z, r -> w; finale (all_done) after z and w.
cascade = Workflow("cond-cascade")


@cascade.step()
def r(ctx: StepContext) -> str:
    return "r"


@cascade.step(depends_on=["r"], when=lambda ctx, r: False)
def x(ctx: StepContext, r: str) -> str:
    return "x"


@cascade.step(depends_on=["x"])
def y(ctx: StepContext, x: str) -> str:
    return "y"


@cascade.step(depends_on=["y"])
def z(ctx: StepContext, y: str) -> str:
    return "z"


@cascade.step(depends_on=["r"])
def w(ctx: StepContext, r: str) -> str:
    return "w"


@cascade.step(depends_on=["z", "w"], trigger="all_done")
def finale(ctx: StepContext, z: str | None, w: str | None) -> dict[str, str | None]:
    return {"z": z, "w": w}


# A root with a condition: ``when(ctx)``, nothing upstream.
rooted = Workflow("cond-root")


@rooted.step(when=lambda ctx: bool(ctx.input["go"]))
def maybe(ctx: StepContext) -> str:
    return "maybe ran"


@rooted.step(depends_on=["maybe"])
def after_maybe(ctx: StepContext, maybe: str) -> str:
    return f"after {maybe}"


@rooted.step()
def always(ctx: StepContext) -> str:
    return "always ran"


# The same root under a per-key limit: its condition is judged before it takes a slot.
rooted_limited = Workflow("cond-root-limited")


@rooted_limited.step(
    when=lambda ctx: bool(ctx.input["go"]), concurrency=Concurrency(key="cond-root", limit=1)
)
def limited_maybe(ctx: StepContext) -> str:
    return "maybe ran"


@rooted_limited.step(depends_on=["limited_maybe"])
def after_limited(ctx: StepContext, limited_maybe: str) -> str:
    return f"after {limited_maybe}"


# A condition that raises fails its own step, not the one that released it.
def broken_condition(ctx: StepContext, start: str) -> bool:
    raise ValueError("no verdict")


raising = Workflow("cond-raising")


@raising.step()
def start(ctx: StepContext) -> str:
    return "start"


@raising.step(depends_on=["start"], when=broken_condition)
def judged(ctx: StepContext, start: str) -> str:
    return "judged"


@raising.step(depends_on=["judged"], trigger="all_done")
def cleanup(ctx: StepContext, judged: str | None) -> str:
    return f"cleaned up after {judged}"


# An optional step: its attempts spent, it is skipped and the execution succeeds.
optional = Workflow("cond-optional")


@optional.step(retry=Retry(max_attempts=2, backoff=0, on_exhausted="skip"))
def enrich(ctx: StepContext) -> str:
    raise ConnectionError("enrichment service down")


@optional.step(depends_on=["enrich"], trigger="none_failed")
def publish(ctx: StepContext, enrich: str | None) -> str:
    return f"published with {enrich}"


@optional.step(depends_on=["enrich"])
def strict(ctx: StepContext, enrich: str) -> str:
    return "needs enrichment"


# A step whose worker dies too often: its all_done handler still runs.
crashing = Workflow("cond-crashing")


@crashing.step()
def work(ctx: StepContext) -> str:
    return "worked"


@crashing.step(depends_on=["work"])
def after_work(ctx: StepContext, work: str) -> str:
    return "after"


@crashing.step(depends_on=["work"], trigger="all_done")
def handler(ctx: StepContext, work: str | None) -> str:
    return f"handled {work}"


# A wait node under a trigger: a sleep after a failure, then a step after the sleep.
napping = Workflow("cond-sleep")


@napping.step()
def breaks(ctx: StepContext) -> str:
    raise RuntimeError("broke before the pause")


napping.sleep("pause", depends_on=["breaks"], duration=timedelta(0), trigger="all_done")


@napping.step(depends_on=["pause"])
def resumed(ctx: StepContext, pause: str) -> str:
    return "resumed"


# Eight branches ending at once (odd ones failing) into one all_done join.
fan_in = Workflow("cond-fan-in")


@fan_in.step()
def spread(ctx: StepContext) -> int:
    return 8


def _branch(index: int) -> None:
    def branch(ctx: StepContext, spread: int) -> int:
        if index % 2:
            raise RuntimeError(f"branch {index} broke")
        return index

    fan_in.step(f"branch{index}", depends_on=["spread"])(branch)


for _index in range(8):
    _branch(_index)


@fan_in.step(
    depends_on=[f"branch{i}" for i in range(8)], trigger="all_done", when=lambda ctx, **up: True
)
def join(ctx: StepContext, **branches: int | None) -> dict[str, int | None]:
    return dict(sorted(branches.items()))


@pytest.fixture
def app(database: TestDatabase, redis_url: str) -> ConveyorCelery:
    registry = WorkflowRegistry(
        [
            *DIAMONDS.values(),
            cascade,
            rooted,
            rooted_limited,
            raising,
            optional,
            fan_in,
            crashing,
            napping,
        ]
    )
    configure_registry(registry)
    return create_app(clean_app_settings(database, redis_url), registry)


def _reasons(execution_id: str, step: str) -> list[str | None]:
    with get_db_session() as session:
        return list(
            session.scalars(
                select(ExecutionEvent.reason)
                .where(ExecutionEvent.execution_id == execution_id)
                .where(ExecutionEvent.step_name == step)
                .order_by(ExecutionEvent.id)
            )
        )


def _statuses(execution_id: str, names: str) -> dict[str, str]:
    return {name: step_row(execution_id, name)["status"] for name in names.split()}


def _skipped_count(app: ConveyorCelery, workflow: str, step: str, why: str) -> float:
    found = app.engine.metrics.registry.get_sample_value(
        "conveyor_steps_skipped_total", {"workflow": workflow, "step": step, "why": why}
    )
    return found or 0.0


@pytest.mark.parametrize(
    ("trigger", "b_fails", "d_status", "d_output", "outcome"),
    [
        # b skipped by its condition.
        ("all_success", False, "skipped", None, "succeeded"),
        ("none_failed", False, "succeeded", {"b": None, "c": "c ran"}, "succeeded"),
        ("all_done", False, "succeeded", {"b": None, "c": "c ran"}, "succeeded"),
        # b failed.
        ("all_success", True, "skipped", None, "failed"),
        ("none_failed", True, "skipped", None, "failed"),
        ("all_done", True, "succeeded", {"b": None, "c": "c ran"}, "failed"),
    ],
)
def test_a_diamond_follows_the_trigger_of_its_join(
    app: ConveyorCelery,
    trigger: str,
    b_fails: bool,
    d_status: str,
    d_output: dict[str, Any] | None,
    outcome: str,
) -> None:
    workflow = DIAMONDS[(trigger, b_fails)]
    with running_worker(app):
        execution_id = enqueue(workflow, {"kind": "invoice"}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == outcome
    b_status = "failed" if b_fails else "skipped"
    assert _statuses(execution_id, "a b c d") == {
        "a": "succeeded",
        "b": b_status,
        "c": "succeeded",
        "d": d_status,
    }
    assert step_row(execution_id, "d")["output_data"] == d_output
    if not b_fails:
        assert (
            _reasons(execution_id, "b")[-1]
            == "condition false: when(_diamond.<locals>.<lambda>) of b"
        )
    if d_status == "skipped":
        # A plain (all_success) step is skipped at once; a gated one once decided.
        why = "" if trigger == "all_success" else f" (trigger {trigger})"
        assert _reasons(execution_id, "d")[-1] == f"upstream step b {b_status}{why}"
        # Skipped without ever being queued.
        assert _reasons(execution_id, "d") == [_reasons(execution_id, "d")[-1]]
    if outcome == "succeeded":
        # A sink that was skipped is in the output as null.
        assert finished.output_data == {"d": d_output}


def test_a_true_condition_runs_the_step(app: ConveyorCelery) -> None:
    workflow = DIAMONDS[("all_success", False)]
    with running_worker(app):
        execution_id = enqueue(workflow, {"kind": "refund"}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded"
    assert finished.output_data == {"d": {"b": "b ran", "c": "c ran"}}


def test_a_skip_cascades_three_levels_and_an_all_done_step_still_runs(
    app: ConveyorCelery,
) -> None:
    before = _skipped_count(app, cascade.name, "x", "condition")
    with running_worker(app):
        execution_id = enqueue(cascade, {}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded"
    assert _statuses(execution_id, "r x y z w finale") == {
        "r": "succeeded",
        "x": "skipped",
        "y": "skipped",
        "z": "skipped",
        "w": "succeeded",
        "finale": "succeeded",
    }
    assert step_row(execution_id, "finale")["output_data"] == {"z": None, "w": "w"}
    assert _reasons(execution_id, "x") == ["condition false: when(<lambda>) of x"]
    assert _reasons(execution_id, "y") == ["upstream step x skipped"]
    assert _reasons(execution_id, "z") == ["upstream step y skipped"]
    assert _skipped_count(app, cascade.name, "x", "condition") == before + 1
    assert _skipped_count(app, cascade.name, "z", "upstream") >= 1


@pytest.mark.parametrize(
    ("go", "maybe", "after"), [(True, "succeeded", "succeeded"), (False, "skipped", "skipped")]
)
def test_a_root_with_a_condition(app: ConveyorCelery, go: bool, maybe: str, after: str) -> None:
    with running_worker(app):
        execution_id = enqueue(rooted, {"go": go}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded"
    assert _statuses(execution_id, "maybe after_maybe always") == {
        "maybe": maybe,
        "after_maybe": after,
        "always": "succeeded",
    }
    if not go:
        assert _reasons(execution_id, "maybe")[-1] == "condition false: when(<lambda>) of maybe"
        assert _reasons(execution_id, "after_maybe") == ["upstream step maybe skipped"]


@pytest.mark.parametrize(("go", "status"), [(True, "succeeded"), (False, "skipped")])
def test_a_root_with_a_condition_and_a_limit_is_judged_before_it_runs(
    app: ConveyorCelery, go: bool, status: str
) -> None:
    with running_worker(app):
        execution_id = enqueue(rooted_limited, {"go": go}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded"
    assert _statuses(execution_id, "limited_maybe after_limited") == {
        "limited_maybe": status,
        "after_limited": status,
    }
    if not go:
        assert "condition false: when(<lambda>) of limited_maybe" in _reasons(
            execution_id, "limited_maybe"
        )


def test_a_condition_that_raises_fails_its_own_step(app: ConveyorCelery) -> None:
    with running_worker(app):
        execution_id = enqueue(raising, {}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "failed"
    assert _statuses(execution_id, "start judged cleanup") == {
        "start": "succeeded",
        "judged": "failed",
        "cleanup": "succeeded",
    }
    judged = step_row(execution_id, "judged")
    assert judged["error"]["type"] == "ValueError"
    assert judged["error"]["message"] == "no verdict"
    assert _reasons(execution_id, "judged") == [
        "condition raised: ValueError in when(broken_condition)"
    ]
    assert finished.error is not None
    assert finished.error["step"] == "judged"


def test_a_join_of_branches_ending_at_once_is_decided_once(app: ConveyorCelery) -> None:
    with running_worker(app, concurrency=8):
        execution_id = enqueue(fan_in, {}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "failed"
    assert step_row(execution_id, "join")["output_data"] == {
        f"branch{i}": None if i % 2 else i for i in range(8)
    }
    reasons = _reasons(execution_id, "join")
    assert reasons.count("upstream steps done") == 1
    assert reasons[-1] == "step succeeded"


def test_a_step_crashed_too_often_still_releases_its_all_done_handler(
    app: ConveyorCelery,
) -> None:
    from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager

    settings = app.engine.settings
    database_reachable_for(settings.stall_timeout)
    execution_id = enqueue(crashing, {}, app=app)
    app.engine.admit(crashing.name, [execution_id])
    manager = SyncEnhancedExecutionStateManager()
    assert manager.claim_step(execution_id, "work", worker="gone:1", celery_task_id=None)
    old = datetime.now(UTC) - timedelta(hours=1)
    spent = settings.max_crash_recoveries
    force_step_status(execution_id, "work", "running", heartbeat_at=old, recoveries=spent)
    # One pass fails the step, skips its plain dependent and queues the handler (its
    # message sent after the commit).
    report = app.engine.reconcile()
    assert report.stalled_failed == [(execution_id, "work")]
    assert _statuses(execution_id, "work after_work handler") == {
        "work": "failed",
        "after_work": "skipped",
        "handler": "queued",
    }
    with running_worker(app):
        finished = wait_for(execution_id)
    assert finished.status == "failed"
    assert step_row(execution_id, "handler")["output_data"] == "handled None"


def test_a_wait_node_follows_its_trigger(app: ConveyorCelery) -> None:
    with running_worker(app):
        execution_id = enqueue(napping, {}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "failed"
    assert _statuses(execution_id, "breaks pause resumed") == {
        "breaks": "failed",
        "pause": "succeeded",
        "resumed": "succeeded",
    }
    assert _reasons(execution_id, "pause") == ["upstream steps done", "wake time passed"]


def test_a_late_message_or_completion_of_a_skipped_step_changes_nothing(
    app: ConveyorCelery,
) -> None:
    from core.outcomes import Claim, Route
    from core.steps import complete

    workflow = DIAMONDS[("all_success", False)]
    with running_worker(app):
        execution_id = enqueue(workflow, {"kind": "invoice"}, app=app)
        wait_for(execution_id)
        before = (step_row(execution_id, "b"), execution_row(execution_id))
        history = _reasons(execution_id, "b")
        # A stray run message for the skipped step: its claim fails.
        app.engine.run_step(execution_id, "b", str(uuid.uuid4()), workflow.name, 1)
        # A late completion (as if a worker had run it): not applied.
        route = Route(workflow.name, 1, 0)
        claim = Claim(execution_id, "b", 1, 0, route, {"kind": "invoice"}, {})
        done = app.engine.recorder.run(complete, claim, "late", '"late"', workflow)
    assert not done.transition.applied
    assert done.transition.current_status == "skipped"
    assert (step_row(execution_id, "b"), execution_row(execution_id)) == before
    assert _reasons(execution_id, "b") == history


def test_an_optional_step_is_skipped_when_its_attempts_are_spent(app: ConveyorCelery) -> None:
    before = _skipped_count(app, optional.name, "enrich", "exhausted")
    with running_worker(app):
        execution_id = enqueue(optional, {}, app=app)
        finished = wait_for(execution_id)
    assert finished.status == "succeeded"
    enrich = step_row(execution_id, "enrich")
    assert (enrich["status"], enrich["attempt"]) == ("skipped", 2)
    assert enrich["error"]["type"] == "ConnectionError"
    reasons = _reasons(execution_id, "enrich")
    assert reasons[-1] == 'skipped: attempts exhausted after ConnectionError (on_exhausted="skip")'
    assert reasons.count("retry in 0.0s after ConnectionError") == 1
    assert _statuses(execution_id, "publish strict") == {
        "publish": "succeeded",
        "strict": "skipped",
    }
    assert step_row(execution_id, "publish")["output_data"] == "published with None"
    assert _reasons(execution_id, "strict") == ["upstream step enrich skipped"]
    assert _skipped_count(app, optional.name, "enrich", "exhausted") == before + 1


@pytest.mark.parametrize("trigger", ["none_failed", "all_done"])
def test_a_parameter_that_cannot_take_none_is_refused(trigger: str) -> None:
    wf = Workflow("cond-refused")

    @wf.step()
    def up(ctx: StepContext) -> int:
        return 1

    with pytest.raises(DefinitionError, match=r"step 'down'.*parameter 'up'.*`T \| None`"):

        @wf.step(depends_on=["up"], trigger=trigger)
        def down(ctx: StepContext, up: int) -> int:
            return up


def test_the_api_and_the_cli_say_why_a_step_was_skipped(app: ConveyorCelery) -> None:
    from typer.testing import CliRunner

    from conveyor.api.app import create_app as create_api
    from conveyor.cli.main import CliState
    from conveyor.cli.main import app as cli
    from core.accounts import Role
    from tests.helpers.api import client, serve, user_with_token

    with running_worker(app):
        execution_id = enqueue(cascade, {}, app=app)
        wait_for(execution_id)
    _, token = user_with_token("ops@example.com", Role.ADMIN)
    with serve(create_api(app)) as url, client(url, token) as http:
        body = http.get(f"/executions/{execution_id}").json()
        declared = http.get(f"/workflows/{cascade.name}").json()
    steps = {s["name"]: (s["trigger"], s["condition"]) for s in declared["steps"]}
    assert steps["x"] == ("all_success", "<lambda>")
    assert steps["finale"] == ("all_done", None)
    reasons = {s["name"]: s["skip_reason"] for s in body["steps"]}
    assert reasons == {
        "r": None,
        "x": "condition false: when(<lambda>) of x",
        "y": "upstream step x skipped",
        "z": "upstream step y skipped",
        "w": None,
        "finale": None,
    }
    state = CliState(celery_app=app)
    shown = CliRunner().invoke(cli, ["status", execution_id], obj=state, catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert "skipped because" in shown.stdout
    assert "condition false: when(<lambda>) of x" in shown.stdout
    as_json = CliRunner().invoke(
        cli, ["status", execution_id, "--json"], obj=state, catch_exceptions=False
    )
    steps = {s["name"]: s["skip_reason"] for s in json.loads(as_json.stdout)["steps"]}
    assert steps == reasons
