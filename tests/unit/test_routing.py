"""Routing definitions: ``queue=`` on workflows, steps and maps, checked and resolved."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from core.config import get_settings
from core.errors import DefinitionError
from core.workflows import StepContext, Workflow
from worker.engine import start_queue


def _noop(ctx: StepContext) -> None:
    return None


def test_a_steps_own_queue_wins_over_its_workflows() -> None:
    flow = Workflow("reports", queue="reports")
    flow.step("render", queue="gpu")(_noop)
    flow.step("mail")(_noop)
    assert flow.queue_of("render") == "gpu"
    assert flow.queue_of("mail") == "reports"
    assert flow.routed


def test_neither_given_is_the_default_queue() -> None:
    flow = Workflow("plain")
    flow.step("only")(_noop)
    assert flow.queue_of("only") == get_settings().default_queue == "conveyor"
    assert flow.queue_of("only", "celery") == "celery"
    assert not flow.routed


def test_a_map_runs_its_items_on_its_queue() -> None:
    flow = Workflow("mapped")

    @flow.step()
    def numbers(ctx: StepContext) -> list[int]:
        return [1, 2]

    @flow.map(over="numbers", queue="gpu")
    def square(ctx: StepContext, item: int) -> int:
        return item * item

    assert flow.queue_of("square") == "gpu"
    assert flow.queue_of("numbers") == "conveyor"


@pytest.mark.parametrize("bad", ["", "   ", "q" * 201, 7, b"gpu", ["gpu"]])
def test_a_bad_step_queue_is_refused_naming_workflow_and_step(bad: Any) -> None:
    flow = Workflow("routed")
    with pytest.raises(DefinitionError, match=r"workflow 'routed', step 'render': queue must"):
        flow.step("render", queue=bad)(_noop)
    assert "render" not in flow.steps


@pytest.mark.parametrize("bad", ["", "q" * 201, 3])
def test_a_bad_workflow_queue_is_refused_naming_the_workflow(bad: Any) -> None:
    with pytest.raises(DefinitionError, match=r"workflow 'routed': queue must"):
        Workflow("routed", queue=bad)


def test_a_bad_map_queue_is_refused_naming_the_map() -> None:
    flow = Workflow("mapped")
    with pytest.raises(DefinitionError, match=r"workflow 'mapped', map 'square': queue must"):
        flow.map(over="numbers", queue="", name="square")(lambda ctx, item: item)


def test_a_queue_name_of_200_characters_is_accepted() -> None:
    flow = Workflow("long", queue="q" * 200)
    flow.step("only")(_noop)
    assert flow.queue_of("only") == "q" * 200


def test_a_start_goes_to_the_queue_of_its_roots() -> None:
    flow = Workflow("gpu_roots", queue="reports")
    flow.step("first", queue="gpu")(_noop)
    flow.step("second", queue="gpu")(_noop)
    flow.step("after", depends_on=["first", "second"])(lambda ctx, first, second: None)
    assert start_queue(flow, "conveyor") == "gpu"


def test_a_start_of_roots_on_several_queues_goes_to_the_workflows_queue() -> None:
    flow = Workflow("split", queue="reports")
    flow.step("first", queue="gpu")(_noop)
    flow.step("second")(_noop)
    assert start_queue(flow, "conveyor") == "reports"
    plain = Workflow("split_plain")
    plain.step("first", queue="gpu")(_noop)
    plain.step("second", queue="cpu")(_noop)
    assert start_queue(plain, "conveyor") == "conveyor"


def test_a_start_of_a_workflow_with_waits_goes_to_the_workflows_queue() -> None:
    flow = Workflow("waits_first", queue="reports")
    flow.step("first", queue="gpu")(_noop)
    flow.sleep("pause", depends_on=["first"], duration=timedelta(seconds=1))
    assert start_queue(flow, "conveyor") == "reports"
