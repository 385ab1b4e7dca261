"""Declaring map steps: what ``@wf.map`` accepts, and the typed errors it raises."""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import DefinitionError
from core.states import ITEMS, StepStatus
from core.workflows import MAX_MAP_ITEMS, MapSpec, StepContext, Tolerate, Workflow


def _with_source() -> Workflow:
    wf = Workflow("maps-unit")

    @wf.step()
    def source(ctx: StepContext) -> list[int]:
        return [1, 2]

    @wf.step()
    def config(ctx: StepContext) -> str:
        return "c"

    return wf


def test_a_map_is_a_wait_node_over_its_upstream_with_the_others_unmapped() -> None:
    wf = _with_source()

    @wf.map(over="source", depends_on=["config"], max_parallel=5, on_item_failure=Tolerate(2))
    def each(ctx: StepContext, item: int, config: str) -> int:
        return item

    wf.validate()
    step = wf.steps["each"]
    assert step.kind == "map"
    assert step.depends_on == ("source", "config")
    assert step.wait == MapSpec("source", 5, 10_000, Tolerate(2))
    assert wf.map_nodes == frozenset({"each"})
    assert "each" in wf.wait_downstream("source")
    assert "each" not in wf.task_downstream("source")
    assert step.output is not None  # the item's return type is checked like a step's


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_parallel": 0}, "max_parallel must be an int of 1 or more"),
        ({"max_items": 0}, "max_items must be an int of 1 or more"),
        ({"max_items": MAX_MAP_ITEMS + 1}, "is above the limit of 100,000"),
        ({"on_item_failure": "skip"}, 'on_item_failure must be "fail" or Tolerate'),
        ({"depends_on": "config"}, "depends_on takes a list of step names"),
    ],
)
def test_bad_map_options_are_refused_naming_the_option(
    options: dict[str, Any], message: str
) -> None:
    wf = _with_source()
    with pytest.raises(DefinitionError, match=message):

        @wf.map(over="source", **options)
        def each(ctx: StepContext, item: int, config: str = "") -> int:
            return item


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "must not be negative"),
        (1.5, "a fraction must be at least 0 and below 1"),
        ("all", "takes a number"),
        (True, "takes a number"),
    ],
)
def test_a_bad_tolerance_is_refused(value: Any, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        Tolerate(max_failed=value)


def test_a_tolerance_is_a_number_or_a_fraction_of_the_items() -> None:
    assert Tolerate(3).limit(1000) == 3
    assert Tolerate(0.01).limit(10_000) == 100
    assert Tolerate(0.01).limit(50) == 0


def test_the_function_takes_the_item_second_and_upstream_outputs_by_name() -> None:
    wf = _with_source()
    with pytest.raises(DefinitionError, match=r"must take \(ctx, item, ...\)"):

        @wf.map(over="source")
        def lonely(ctx: StepContext) -> int:
            return 1

    with pytest.raises(DefinitionError, match="missing: config"):

        @wf.map(over="source", depends_on=["config"])
        def forgetful(ctx: StepContext, item: int) -> int:
            return item


def test_a_map_over_an_unknown_step_or_itself_is_refused_at_validation() -> None:
    wf = _with_source()

    @wf.map(over="nowhere")
    def each(ctx: StepContext, item: int) -> int:
        return item

    with pytest.raises(DefinitionError, match="depends on unknown step"):
        wf.validate()
    selfish = Workflow("maps-self")
    with pytest.raises(DefinitionError, match="a step cannot depend on itself"):

        @selfish.map(over="again")
        def again(ctx: StepContext, item: int) -> int:
            return item


def test_items_move_by_their_own_table() -> None:
    s = StepStatus
    # The slot pass admits a pending item straight to running for the same worker.
    assert ITEMS.is_allowed(s.PENDING, s.RUNNING)
    assert ITEMS.is_allowed(s.RUNNING, s.QUEUED)  # a retry, or a stalled item recovered
    assert not ITEMS.is_allowed(s.SUCCEEDED, s.QUEUED)
    assert not ITEMS.is_allowed(s.PENDING, s.SUCCEEDED)
    # Only a retry of failed items reopens an item, and keeps succeeded ones.
    assert ITEMS.sources_of(s.PENDING, retry=True) == frozenset({s.FAILED, s.CANCELLED})
    assert ITEMS.final == frozenset({s.SUCCEEDED, s.FAILED, s.CANCELLED})
