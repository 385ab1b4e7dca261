"""Workflows of the fault suite, loaded by worker processes (CONVEYOR_WORKFLOW_MODULES).

Every run of a step's code appends one line ``execution step attempt pid`` to the file
named by ``FAULTS_RUN_LOG`` (O_APPEND: one write per line, safe across processes and
untouched by a broker flush), so the checker counts runs wherever they happened.
While the file named by ``FAULTS_GATE`` exists, steps finish their work but do not
return: a test holds them mid-step across a fault.
Outputs are arithmetic on the input, so the checker can recompute every one of them.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from core.workflows import StepContext, Workflow

RUN_LOG_ENV = "FAULTS_RUN_LOG"
GATE_ENV = "FAULTS_GATE"
CHAIN_LENGTH = 10
FAN_WIDTH = 8
STEP_SECONDS = (0.05, 0.3)


class Seed(BaseModel):
    """Input of both workflows: the number the arithmetic starts from."""

    start: int


def _work(ctx: StepContext) -> None:
    """Record this run of the step's code, then take 50-300 ms like real work."""
    path = os.environ.get(RUN_LOG_ENV)
    if path:
        line = f"{ctx.execution_id} {ctx.step_name} {ctx.attempt} {os.getpid()}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    time.sleep(random.uniform(*STEP_SECONDS))
    gate = os.environ.get(GATE_ENV)
    while gate and os.path.exists(gate):  # a test holds every step here for a while
        time.sleep(0.02)


# A chain of ten steps: link_0 -> link_1 -> ... -> link_9, each adding 1.
chain = Workflow("fault_chain", input_model=Seed)


@chain.step("link_0")
def _first_link(ctx: StepContext) -> int:
    _work(ctx)
    return int(ctx.input.start)


def _link(index: int) -> Callable[..., int]:
    def link(ctx: StepContext, **upstream: int) -> int:
        _work(ctx)
        return upstream[f"link_{index - 1}"] + 1

    link.__name__ = f"link_{index}"
    return link


for _i in range(1, CHAIN_LENGTH):
    chain.step(f"link_{_i}", depends_on=[f"link_{_i - 1}"])(_link(_i))


# A fan-out and fan-in: split -> branch_0..branch_7 -> join (the sum of the branches).
fan = Workflow("fault_fan", input_model=Seed)


@fan.step()
def split(ctx: StepContext) -> list[int]:
    _work(ctx)
    return [int(ctx.input.start) + i for i in range(FAN_WIDTH)]


def _branch(index: int) -> Callable[..., int]:
    def branch(ctx: StepContext, split: list[int]) -> int:
        _work(ctx)
        return split[index] * 2

    branch.__name__ = f"branch_{index}"
    return branch


for _i in range(FAN_WIDTH):
    fan.step(f"branch_{_i}", depends_on=["split"])(_branch(_i))


@fan.step(depends_on=[f"branch_{i}" for i in range(FAN_WIDTH)])
def join(ctx: StepContext, **branches: int) -> int:
    _work(ctx)
    return sum(branches.values())


def expected_outputs(workflow: str, start: int) -> dict[str, Any]:
    """Every step's correct output for an execution of ``workflow`` from ``start``."""
    if workflow == chain.name:
        return {f"link_{i}": start + i for i in range(CHAIN_LENGTH)}
    if workflow == fan.name:
        branches = {f"branch_{i}": (start + i) * 2 for i in range(FAN_WIDTH)}
        return {
            "split": [start + i for i in range(FAN_WIDTH)],
            **branches,
            "join": sum(branches.values()),
        }
    raise ValueError(f"not a fault-suite workflow: {workflow}")


def joins(workflow: str) -> list[str]:
    """Steps of ``workflow`` with more than one upstream step."""
    definition = chain if workflow == chain.name else fan
    return [name for name, step in definition.steps.items() if len(step.depends_on) > 1]


def sinks(workflow: str) -> list[str]:
    """Steps of ``workflow`` nothing depends on (their outputs are the execution's)."""
    return list((chain if workflow == chain.name else fan).sinks)
