"""The workflows the benchmarks run: no-op steps, so that conveyor's own cost is measured."""

from __future__ import annotations

from typing import Any

from core.registry import WorkflowRegistry
from core.workflows import Step, StepContext, Workflow

DAG = "bench_dag"
WORK = "bench_work"
DAG_STEPS = 4


def noop(ctx: StepContext, **upstream: Any) -> None:
    """A step that does nothing (it takes whatever upstream outputs it is given)."""


def linear_name(steps: int) -> str:
    """The name of the linear workflow of ``steps`` steps."""
    return f"bench_linear_{steps}"


def linear(steps: int) -> Workflow:
    """``s0000 -> s0001 -> ... ``: ``steps`` no-op steps, each after the one before."""
    workflow = Workflow(linear_name(steps), description="benchmark: a chain of no-op steps")
    previous: tuple[str, ...] = ()
    for index in range(steps):
        name = f"s{index:04d}"
        workflow.add_step(Step(name=name, fn=noop, depends_on=previous))
        previous = (name,)
    return workflow


def dag() -> Workflow:
    """A diamond of four no-op steps: ``a -> (b, c) -> d`` (fan-out, then fan-in)."""
    workflow = Workflow(DAG, description="benchmark: a small diamond DAG")
    for name, upstream in (("a", ()), ("b", ("a",)), ("c", ("a",)), ("d", ("b", "c"))):
        workflow.add_step(Step(name=name, fn=noop, depends_on=upstream))
    return workflow


def work() -> Workflow:
    """``extract -> transform -> load``: the workflow of the reconciler's seeded rows."""
    workflow = Workflow(WORK, description="benchmark: rows the reconciler finds")
    previous: tuple[str, ...] = ()
    for name in ("extract", "transform", "load"):
        workflow.add_step(Step(name=name, fn=noop, depends_on=previous))
        previous = (name,)
    return workflow


def registry(*linear_steps: int) -> WorkflowRegistry:
    """The DAG, the reconciler's workflow and a linear workflow of each given length."""
    return WorkflowRegistry([dag(), work(), *(linear(n) for n in sorted(set(linear_steps)))])
