"""The workflow "deploy" as two releases of a team's code define it, for rolling-deploy
tests (tests/e2e/test_versions.py): ``build(code, change)`` makes release ``code``
("old" or "new") with one ``change`` from the old code:

- "": none; "body": third's body rewritten, same contract;
- "renamed": third renamed third_renamed; "extra": a step fourth added at the end;
- "version": second marked ``version=2`` (a change of meaning, same signature).

Each step returns the codes that ran it and its upstream steps ("old>new>new"), so a
test reads from the output which release ran which step. A worker process picks its
release from CONVEYOR_TEST_DEPLOY ("old", or "new:<change>").
"""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel

from core.workflows import Workflow

CHANGES = ("", "body", "renamed", "extra", "version")


class DeployInput(BaseModel):
    # Seconds second takes: long enough for an execution to be in flight at a switch.
    pause: float = 0.0


def build(code: str, change: str = "") -> Workflow:
    """Release ``code`` of the workflow, with ``change``."""
    assert change in CHANGES, change
    wf = Workflow("deploy", input_model=DeployInput)

    @wf.step()
    def first(ctx: Any) -> str:
        return code

    @wf.step(depends_on=["first"], version=2 if change == "version" else 1)
    def second(ctx: Any, first: str) -> str:
        time.sleep(ctx.input.pause)
        return f"{first}>{code}"

    def third(ctx: Any, second: str) -> str:
        return f"{second}>{code}{'*' if change == 'body' else ''}"

    last = "third_renamed" if change == "renamed" else "third"
    wf.step(last, depends_on=["second"])(third)
    if change == "extra":

        @wf.step(depends_on=[last])
        def fourth(ctx: Any, third: str) -> str:
            return f"{third}>{code}"

    return wf


def build_map(code: str, change: str = "") -> Workflow:
    """Release ``code`` of "deploy_map": a list, a map over it, a total; ``change``
    "renamed" renames the total (the map's items are what a deploy catches mid-way)."""
    wf = Workflow("deploy_map")

    @wf.step()
    def numbers(ctx: Any) -> list[int]:
        return list(range(20))

    @wf.map(over="numbers", max_parallel=4)
    def tag(ctx: Any, item: int) -> str:
        return f"{code}:{item}"

    def total(ctx: Any, tag: list[str]) -> list[str]:
        return tag

    wf.step("total_renamed" if change == "renamed" else "total", depends_on=["tag"])(total)
    return wf


def _release() -> tuple[Workflow, Workflow]:
    code, _, change = os.environ.get("CONVEYOR_TEST_DEPLOY", "old").partition(":")
    return build(code, change), build_map(code, change)


deploy, deploy_map = _release()
