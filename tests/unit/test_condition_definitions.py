"""Conditional steps as declared: ``when=``, ``trigger=`` and ``Retry(on_exhausted=)``
checked at definition, and how a workflow splits its downstream steps."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Annotated, Any, Optional

import pytest

from core.conditions import skip_reasons
from core.errors import DefinitionError
from core.workflows import Retry, StepContext, Workflow


def _with_root() -> Workflow:
    wf = Workflow("conditions")

    @wf.step()
    def up(ctx: StepContext) -> int:
        return 1

    return wf


def test_an_unknown_trigger_is_refused() -> None:
    wf = _with_root()
    with pytest.raises(DefinitionError, match=r"step 'down'.*trigger must be one of .*'any'"):

        @wf.step(depends_on=["up"], trigger="any")
        def down(ctx: StepContext, up: int) -> int:
            return up


@pytest.mark.parametrize(
    ("when", "problem"),
    [
        ("yes", "when must be a function"),
        (lambda ctx, other: True, "when's parameters other are not upstream steps"),
        (lambda *, up: True, "when must take the step context first"),
    ],
)
def test_a_bad_condition_is_refused(when: Any, problem: str) -> None:
    wf = _with_root()
    with pytest.raises(DefinitionError, match=f"step 'down': {problem}"):

        @wf.step(depends_on=["up"], when=when)
        def down(ctx: StepContext, up: int) -> int:
            return up


def test_a_condition_may_name_some_or_all_upstream_steps() -> None:
    wf = _with_root()

    @wf.step(depends_on=["up"], when=lambda ctx: True)
    def takes_none(ctx: StepContext, up: int) -> int:
        return up

    @wf.step(depends_on=["up"], when=lambda ctx, **upstream: True)
    def takes_all(ctx: StepContext, up: int) -> int:
        return up

    assert wf.gated == {"takes_none", "takes_all"}


def up_may_be_none(ctx: StepContext, up: int | None) -> int:
    return up or 0


def up_is_optional(ctx: StepContext, up: Optional[int]) -> int:  # noqa: UP045
    return up or 0


def up_is_any(ctx: StepContext, up: Any) -> int:
    return 0


def up_is_annotated(ctx: StepContext, up: Annotated[int | None, "meta"]) -> int:
    return 0


def up_by_keyword(ctx: StepContext, **upstream: int) -> int:
    return 0


def up_unresolved(ctx: StepContext, up: Missing | None) -> int:  # type: ignore[name-defined]  # noqa: F821
    return 0


@pytest.mark.parametrize("trigger", ["none_failed", "all_done"])
@pytest.mark.parametrize(
    "fn",
    [up_may_be_none, up_is_optional, up_is_any, up_is_annotated, up_by_keyword, up_unresolved],
)
def test_a_parameter_that_takes_none_is_accepted(trigger: str, fn: Any) -> None:
    wf = _with_root()
    wf.step("down", depends_on=["up"], trigger=trigger)(fn)
    assert wf.steps["down"].trigger == trigger


def up_is_int(ctx: StepContext, up: int) -> int:
    return up


def up_unannotated(ctx, up):  # type: ignore[no-untyped-def]
    return up


@pytest.mark.parametrize("trigger", ["none_failed", "all_done"])
@pytest.mark.parametrize("fn", [up_is_int, up_unannotated])
def test_a_parameter_that_cannot_take_none_is_refused(trigger: str, fn: Any) -> None:
    wf = _with_root()
    with pytest.raises(
        DefinitionError,
        match=rf"step 'down': under trigger '{trigger}' parameter 'up' receives None .*"
        r"annotate it `T \| None`",
    ):
        wf.step("down", depends_on=["up"], trigger=trigger)(fn)


def test_all_success_needs_no_optional_parameter() -> None:
    wf = _with_root()
    wf.step("down", depends_on=["up"])(up_is_int)
    assert not wf.gated


def test_a_map_checks_its_unmapped_parameters_not_its_item() -> None:
    wf = _with_root()

    @wf.step()
    def items(ctx: StepContext) -> list[int]:
        return [1, 2]

    @wf.map(over="items", depends_on=["up"], trigger="all_done")
    def each(ctx: StepContext, item: int, up: int | None) -> int:
        return item

    assert wf.steps["each"].trigger == "all_done"
    with pytest.raises(DefinitionError, match="parameter 'up' receives None"):

        @wf.map(over="items", depends_on=["up"], trigger="none_failed")
        def strict(ctx: StepContext, item: int, up: int) -> int:
            return item


def test_on_exhausted_is_fail_or_skip() -> None:
    assert Retry().on_exhausted == "fail"
    assert Retry(max_attempts=2, on_exhausted="skip").on_exhausted == "skip"
    with pytest.raises(DefinitionError, match='on_exhausted must be "fail" or "skip"'):
        Retry(on_exhausted="ignore")


def test_on_exhausted_skip_is_refused_on_waits_and_maps() -> None:
    wf = _with_root()
    optional = Retry(max_attempts=2, on_exhausted="skip")
    with pytest.raises(
        DefinitionError, match=r"step 'approval'.*task steps only, not to this event step"
    ):
        wf.wait("approval", depends_on=["up"], event="approved", retry=optional)
    with pytest.raises(
        DefinitionError, match=r"step 'each'.*task steps only, not to this map step"
    ):

        @wf.map(over="up", retry=optional)
        def each(ctx: StepContext, item: int) -> int:
            return item


def test_gated_steps_are_released_apart_from_the_fused_completion() -> None:
    wf = _with_root()

    @wf.step(depends_on=["up"])
    def plain(ctx: StepContext, up: int) -> int:
        return up

    @wf.step(depends_on=["up"], when=lambda ctx, up: up > 0)
    def conditional(ctx: StepContext, up: int) -> int:
        return up

    @wf.step(depends_on=["plain", "conditional"], trigger="all_done")
    def handler(ctx: StepContext, plain: int | None, conditional: int | None) -> None:
        return None

    wf.sleep("nap", depends_on=["up"], duration=timedelta(seconds=1))
    assert wf.gated == {"conditional", "handler"}
    assert wf.task_downstream("up") == ["plain"]
    assert wf.wait_downstream("up") == ["nap"]
    assert wf.gated_downstream("up") == ["conditional"]
    assert wf.gated_downstream("plain") == ["handler"]
    assert wf.task_downstream("plain") == []


def test_skip_reasons_are_the_latest_reason_of_each_skip() -> None:
    def event(step: str | None, to: str, reason: str | None) -> SimpleNamespace:
        return SimpleNamespace(step_name=step, to_status=to, reason=reason)

    history = [
        event(None, "running", "admitted"),
        event("a", "queued", "root step"),
        event("b", "skipped", "condition false: when(<lambda>) of b"),
        event("c", "skipped", "upstream step b skipped"),
        event("c", "pending", "execution retried"),
        event("c", "skipped", "upstream step b failed"),
    ]
    assert skip_reasons(history) == {
        "b": "condition false: when(<lambda>) of b",
        "c": "upstream step b failed",
    }
