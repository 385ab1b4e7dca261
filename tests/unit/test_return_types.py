"""Return annotations: refused when a step is declared if JSON cannot hold them, or
converted to JSON as documented (sets as lists, models and dataclasses as objects)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import BaseModel

from core.errors import DefinitionError
from core.workflows import StepContext, Workflow


class Blob(BaseModel):
    """A model that holds bytes."""

    name: str
    data: bytes


@dataclass
class Tagged:
    """A dataclass output."""

    tags: set[str]


def test_a_return_type_holding_bytes_is_refused_naming_the_step() -> None:
    workflow = Workflow("binary")

    def raw(ctx: StepContext) -> bytes:
        return b""

    def nested(ctx: StepContext) -> dict[str, list[bytes]]:
        return {}

    def modelled(ctx: StepContext) -> Blob:
        return Blob(name="", data=b"")

    for fn in (raw, nested, modelled):
        with pytest.raises(DefinitionError, match=rf"step '{fn.__name__}': .* holds bytes"):
            workflow.step()(fn)
    assert workflow.steps == {}


def test_sets_models_and_dataclasses_are_stored_as_json() -> None:
    workflow = Workflow("converted")

    @workflow.step()
    def numbers(ctx: StepContext) -> set[int]:
        return {3, 1, 2}

    @workflow.step()
    def tagged(ctx: StepContext) -> Tagged:
        return Tagged(tags={"a"})

    assert workflow.steps["numbers"].to_json({3, 1, 2}) == [1, 2, 3]
    assert workflow.steps["tagged"].to_json(Tagged(tags={"a"})) == {"tags": ["a"]}
