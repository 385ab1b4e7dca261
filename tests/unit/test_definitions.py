"""Workflow definitions refuse mistakes at declaration or registration, naming them."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import event, given, settings
from pydantic import BaseModel

from core.config import get_settings
from core.errors import DefinitionError, InputValidationError, WorkflowNotFound
from core.executions import step_specs
from core.registry import WorkflowRegistry
from core.workflows import Retry, Step, StepContext, Workflow
from tests.helpers.dags import DagSpec, dag_specs


def _noop(ctx: StepContext) -> None:
    return None


def test_duplicate_step_names_are_refused() -> None:
    flow = Workflow("dup")
    flow.step("a")(_noop)
    with pytest.raises(DefinitionError, match=r"workflow 'dup', step 'a': .* already defined"):
        flow.step("a")(_noop)


def test_cycles_are_refused_at_registration() -> None:
    flow = Workflow("loop")

    @flow.step(depends_on=["c"])
    def a(ctx: StepContext, c: Any) -> None: ...

    @flow.step(depends_on=["a"])
    def b(ctx: StepContext, a: Any) -> None: ...

    @flow.step(depends_on=["b"])
    def c(ctx: StepContext, b: Any) -> None: ...

    with pytest.raises(DefinitionError, match=r"workflow 'loop' has a cycle: .*a.*b.*c"):
        WorkflowRegistry([flow])


def test_unknown_dependencies_are_refused_at_registration() -> None:
    flow = Workflow("orphan")

    @flow.step(depends_on=["ghost"])
    def a(ctx: StepContext, ghost: Any) -> None: ...

    with pytest.raises(DefinitionError, match=r"step 'a': depends on unknown step.* ghost"):
        WorkflowRegistry([flow])


def test_parameters_must_match_dependencies() -> None:
    flow = Workflow("params")
    flow.step("first")(_noop)

    with pytest.raises(DefinitionError, match="missing: first"):

        @flow.step(depends_on=["first"])
        def second(ctx: StepContext) -> None: ...

    with pytest.raises(DefinitionError, match="parameters surprise are not upstream steps"):

        @flow.step()
        def third(ctx: StepContext, surprise: int) -> None: ...

    with pytest.raises(DefinitionError, match="must take the step context first"):
        flow.step("fourth")(lambda: None)


class Opaque:
    """Not JSON in any way pydantic knows."""


class Row(BaseModel):
    """A model output, stored as JSON."""

    when: dt.date


def test_non_json_return_types_are_refused() -> None:
    flow = Workflow("outputs")
    with pytest.raises(DefinitionError, match="cannot be stored as JSON"):

        @flow.step()
        def bad(ctx: StepContext) -> Opaque:
            return Opaque()

    @flow.step()
    def good(ctx: StepContext) -> Row:
        return Row(when=dt.date(2026, 11, 25))

    assert flow.steps["good"].to_json(Row(when=dt.date(2026, 11, 25))) == {"when": "2026-11-25"}


def test_input_errors_list_every_field() -> None:
    class In(BaseModel):
        n: int
        name: str

    flow = Workflow("typed", input_model=In)
    flow.step("a")(_noop)
    with pytest.raises(InputValidationError) as error:
        flow.validate_input({"n": "x"})
    assert "n: Input should be a valid integer" in str(error.value)
    assert "name: Field required" in str(error.value)
    assert flow.validate_input({"n": "3", "name": "z"}) == {"n": 3, "name": "z"}


def test_registry_finds_newest_version_and_names_what_it_has() -> None:
    v1, v2 = Workflow("w", version=1), Workflow("w", version=2)
    v1.step("a")(_noop)
    v2.step("a")(_noop)
    registry = WorkflowRegistry([v1, v2])
    assert registry.get("w") is v2
    assert registry.get("w", 1) is v1
    with pytest.raises(WorkflowNotFound, match="no workflow 'x'; registered: w"):
        registry.get("x")
    clash = Workflow("w", version=2)
    clash.step("a")(_noop)
    with pytest.raises(DefinitionError, match="registered twice"):
        registry.register(clash)


def test_retry_backoff_doubles_and_is_capped() -> None:
    retry = Retry(
        max_attempts=5, backoff=1.0, backoff_max=5.0, jitter=False, retry_on=(TimeoutError,)
    )
    assert [retry.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    assert retry.should_retry(TimeoutError(), 4)
    assert not retry.should_retry(TimeoutError(), 5)
    assert not retry.should_retry(ValueError(), 1)
    jittered = Retry(backoff=1.0, backoff_max=8.0)
    assert all(0 <= jittered.delay(3) <= 4.0 for _ in range(100))
    with pytest.raises(DefinitionError, match="max_attempts must be at least 1"):
        Retry(max_attempts=0)


def test_a_dependency_named_twice_is_refused_naming_the_step_and_the_name() -> None:
    # Accepted before, every execution hung: the step waited for two upstream
    # completions and its one upstream step completes once.
    flow = Workflow("twice")
    flow.step("up")(_noop)
    with pytest.raises(
        DefinitionError, match=r"workflow 'twice', step 'down': depends on up more than once"
    ):

        @flow.step(depends_on=["up", "up"])
        def down(ctx: StepContext, up: Any) -> None: ...

    assert "down" not in flow.steps


def test_self_and_unknown_dependencies_and_a_bare_string_are_refused() -> None:
    flow = Workflow("odd")
    flow.step("up")(_noop)
    with pytest.raises(DefinitionError, match=r"step 'me': a step cannot depend on itself"):

        @flow.step(depends_on=["me"])
        def me(ctx: StepContext, me: Any) -> None: ...

    # A string is an iterable of one-letter names: "up" would mean steps u and p.
    with pytest.raises(DefinitionError, match=r"step 'down': depends_on takes a list of step"):

        @flow.step(depends_on="up")
        def down(ctx: StepContext, up: Any) -> None: ...

    with pytest.raises(DefinitionError, match=r"step 'num': depends_on holds 3, not a step name"):
        flow.add_step(Step(name="num", fn=_noop, depends_on=(3,)))  # type: ignore[arg-type]

    @flow.step(depends_on=["ghost"])
    def haunted(ctx: StepContext, ghost: Any) -> None: ...

    with pytest.raises(DefinitionError, match=r"step 'haunted': depends on unknown step.* ghost"):
        WorkflowRegistry([flow])


def refused_at(spec: DagSpec) -> tuple[str | None, str, Workflow | None]:
    """Where conveyor refuses ``spec`` ('declaration', 'registration' or None), its
    message, and the workflow when it is accepted."""
    try:
        workflow = spec.build("unit")
    except DefinitionError as error:
        return "declaration", str(error), None
    try:
        WorkflowRegistry([workflow])
    except DefinitionError as error:
        return "registration", str(error), None
    return None, "", workflow


@settings(max_examples=500, deadline=None)
@given(dag_specs())
def test_random_definitions_are_refused_exactly_where_a_reference_check_refuses_them(
    spec: DagSpec,
) -> None:
    expected = spec.refusal()
    event(f"refused at {expected}" if expected else "accepted")
    where, message, workflow = refused_at(spec)
    assert where == expected, f"{spec}: refused at {where} ({message}); expected {expected}"
    if workflow is not None:
        # Each step waits for as many completions as it has distinct upstream steps.
        assert {s.name: s.unmet_deps for s in step_specs(workflow)} == {
            name: len(set(deps)) for name, deps in spec.deps.items()
        }


# --- wait nodes: wf.sleep, wf.wait, wf.child ---------------------------------------------


def _chain_of_children(levels: int) -> Workflow:
    """A root workflow whose child node starts a workflow whose child node starts ...,
    ``levels`` workflows below the root."""
    below = Workflow(f"level-{levels}")
    below.step("work")(_noop)
    for level in range(levels - 1, -1, -1):
        above = Workflow(f"level-{level}")
        above.child("down", workflow=below)
        below = above
    return below


def test_child_workflows_nesting_past_the_depth_limit_are_refused_at_registration() -> None:
    WorkflowRegistry().register(_chain_of_children(8))  # 8 levels below the root: allowed
    with pytest.raises(DefinitionError, match=r"nest deeper than 8 levels: level-0 -> .*level-9"):
        WorkflowRegistry().register(_chain_of_children(9))


def test_the_depth_limit_of_child_workflows_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_MAX_CHILD_DEPTH", "2")
    get_settings.cache_clear()
    try:
        WorkflowRegistry().register(_chain_of_children(2))
        with pytest.raises(DefinitionError, match=r"nest deeper than 2 levels"):
            WorkflowRegistry().register(_chain_of_children(3))
    finally:
        monkeypatch.delenv("CONVEYOR_MAX_CHILD_DEPTH")
        get_settings.cache_clear()


def test_child_workflows_starting_each_other_are_refused_at_registration() -> None:
    itself = Workflow("itself")
    itself.child("again", workflow=itself)
    with pytest.raises(DefinitionError, match="form a cycle: itself -> itself"):
        WorkflowRegistry().register(itself)
    ping, pong = Workflow("ping"), Workflow("pong")
    ping.child("serve", workflow=pong)
    pong.child("answer", workflow=ping)
    registry = WorkflowRegistry()
    with pytest.raises(DefinitionError, match="form a cycle: ping -> pong -> ping"):
        registry.register(ping)
    with pytest.raises(WorkflowNotFound):
        registry.get("ping")


def test_a_child_that_is_no_workflow_is_refused() -> None:
    flow = Workflow("parent")
    with pytest.raises(DefinitionError, match="child 'load': workflow must be a Workflow"):
        flow.child("load", workflow="etl")  # type: ignore[arg-type]


def test_a_sleep_takes_either_a_duration_or_until() -> None:
    flow = Workflow("sleeper")
    with pytest.raises(DefinitionError, match="sleep 'nap': give either duration= or until="):
        flow.sleep("nap")
    with pytest.raises(DefinitionError, match="not both or none"):
        flow.sleep(
            "nap",
            duration=dt.timedelta(seconds=1),
            until=lambda ctx: dt.datetime.now(dt.UTC),
        )
    with pytest.raises(DefinitionError, match="duration must be a timedelta of 0 or more"):
        flow.sleep("nap", duration=dt.timedelta(seconds=-1))
    assert "nap" not in flow.steps


class Approval(BaseModel):
    approved: bool


def test_a_wait_refuses_a_bad_timeout_a_schema_that_is_no_model_and_a_bare_string() -> None:
    flow = Workflow("approvals")
    flow.step("request")(_noop)
    with pytest.raises(DefinitionError, match="wait 'ok': timeout must be a positive timedelta"):
        flow.wait("ok", event="approved", timeout=dt.timedelta(0))
    with pytest.raises(DefinitionError, match="timeout must be a positive timedelta"):
        flow.wait("ok", event="approved", timeout=7)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="schema must be a pydantic model class"):
        flow.wait("ok", event="approved", schema=dict)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="event must be a name of 1-200 characters"):
        flow.wait("ok", event="")
    with pytest.raises(DefinitionError, match="depends_on takes a list of step names"):
        flow.wait("ok", event="approved", depends_on="request")
    with pytest.raises(DefinitionError, match="depends_on takes a list of step names"):
        flow.sleep("nap", depends_on="request", duration=dt.timedelta(seconds=1))
    with pytest.raises(DefinitionError, match="depends_on takes a list of step names"):
        flow.child("load", workflow=Workflow("other"), depends_on="request")
    flow.wait("ok", event="approved", depends_on=["request"], schema=Approval)
    assert flow.wait_nodes == {"ok"}


def test_a_waits_callable_takes_the_context_and_its_upstream_steps() -> None:
    flow = Workflow("callables")
    flow.step("request")(_noop)
    child = Workflow("child")
    child.step("work")(_noop)
    with pytest.raises(DefinitionError, match=r"'ok'.*missing: request"):
        flow.wait("ok", event="approved", depends_on=["request"], key=lambda ctx: "k")
    with pytest.raises(DefinitionError, match=r"'nap'.*surprise are not upstream steps"):
        flow.sleep("nap", until=lambda ctx, surprise: surprise)
    with pytest.raises(DefinitionError, match=r"'load'.*missing: request"):
        flow.child("load", workflow=child, depends_on=["request"], input=lambda ctx: {})
    flow.child("load", workflow=child, depends_on=["request"], input=lambda ctx, request: {})
    assert [s.wait_kind for s in step_specs(flow)] == [None, "child"]


def test_not_registered_names_the_setting_that_registers() -> None:
    from core.registry import WorkflowRegistry

    with pytest.raises(WorkflowNotFound, match=r"none are registered .*CONVEYOR_WORKFLOW_MODULES"):
        WorkflowRegistry().get("anything")
