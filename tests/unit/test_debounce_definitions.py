"""Debounce definitions and debounced enqueues refuse mistakes before anything is
written, naming them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from core.errors import DefinitionError, InputValidationError
from core.executions import execution_of
from core.registry import WorkflowRegistry
from core.schedules import Schedule
from core.workflows import Debounce, StepContext, Workflow

SECOND = timedelta(seconds=1)


class Change(BaseModel):
    user_id: str


def _noop(ctx: StepContext) -> None:
    return None


def _debounced(key: Any) -> Workflow:
    flow = Workflow("debounced", input_model=Change, debounce=Debounce(key=key, period=SECOND))
    flow.step("run")(_noop)
    return flow


def _enqueued(flow: Workflow, data: Any, **options: Any) -> Any:
    return execution_of(
        WorkflowRegistry([flow]), flow.name, data, max_payload_bytes=10_000, **options
    )


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"key": None, "period": SECOND}, r"key=\) takes text or a function"),
        ({"key": "", "period": SECOND}, r"key=\): a key must be 1-255 characters"),
        ({"key": "k" * 256, "period": SECOND}, r"key=\): a key must be 1-255 characters"),
        ({"key": "k", "period": timedelta(0)}, r"period=\) must be a timedelta above 0"),
        ({"key": "k", "period": 30}, r"period=\) must be a timedelta above 0"),
        (
            {"key": "k", "period": 2 * SECOND, "max_wait": SECOND},
            r"max_wait=\) must be a timedelta of at least period",
        ),
    ],
)
def test_a_bad_debounce_is_refused_naming_the_problem(
    arguments: dict[str, Any], problem: str
) -> None:
    with pytest.raises(DefinitionError, match=problem):
        Debounce(**arguments)


def test_max_wait_equal_to_the_period_or_none_is_accepted() -> None:
    assert Debounce(key="k", period=SECOND, max_wait=SECOND).max_wait == SECOND
    assert Debounce(key="k", period=SECOND).max_wait is None


def test_a_workflow_takes_only_a_debounce_and_no_schedules_with_it() -> None:
    with pytest.raises(DefinitionError, match="debounce takes a Debounce, got dict"):
        Workflow("w", debounce={"key": "k"})  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="a debounced workflow cannot have schedules"):
        Workflow(
            "w",
            debounce=Debounce(key="k", period=SECOND),
            schedules=[Schedule(every=timedelta(minutes=5))],
        )


def test_the_key_function_gets_the_input_model_and_an_int_key_is_its_text() -> None:
    flow = _debounced(lambda change: change.user_id)
    assert _enqueued(flow, {"user_id": "u1"}).debounce.key == "u1"
    counted = _debounced(lambda change: len(change.user_id))
    assert _enqueued(counted, {"user_id": "abc"}).debounce.key == "3"


def test_a_text_key_puts_every_enqueue_in_one_window() -> None:
    new = _enqueued(_debounced("all"), {"user_id": "u1"})
    assert (new.debounce.key, new.debounce.period, new.debounce.max_wait) == ("all", 1.0, None)


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (lambda change: None, "must return text of 1-255 characters"),
        (lambda change: "", "must return text of 1-255 characters"),
        (lambda change: True, "must return text of 1-255 characters"),
        (lambda change: change.missing, "the debounce key function failed on this input"),
    ],
)
def test_a_key_function_that_gives_no_key_refuses_the_enqueue(key: Any, problem: str) -> None:
    with pytest.raises(InputValidationError, match=problem):
        _enqueued(_debounced(key), {"user_id": "u1"})


def test_an_idempotency_key_is_refused_for_a_debounced_workflow() -> None:
    with pytest.raises(InputValidationError, match="is debounced") as refused:
        _enqueued(_debounced("k"), {"user_id": "u1"}, idempotency_key="once")
    assert refused.value.errors[0]["field"] == "idempotency_key"


def test_input_is_checked_before_the_key_function_runs() -> None:
    with pytest.raises(InputValidationError, match="user_id"):
        _enqueued(_debounced(lambda change: change.user_id), {"user": "u1"})
