"""Conveyor's benchmark workflows: no-op steps, so that conveyor's own cost is measured.

Workers load this module with ``CONVEYOR_WORKFLOW_MODULES=bench.workflows``; the long
chain has ``BENCH_LONG_STEPS`` steps (default 1,000). The first step of each workflow
returns the time it started (enqueue -> first start; the map's first returns its list);
the others return nothing. The flow-control scenarios have their own: the chain of 10
with every step under a per-key limit that never binds, and a one-step workflow with and
without a limit of 1 per input key.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

from core.registry import WorkflowRegistry
from core.workflows import Concurrency, Step, StepContext, Workflow

CHAIN_STEPS = 10
FANOUT_WIDTH = 8
DAG = "bench_dag"
FANOUT = "bench_fanout"
WORK = "bench_work"
DAG_STEPS = 4
SLEEPER = "bench_sleeper"
MAP = "bench_map"
MAP_PARALLEL = 32
WAITER = "bench_waiter"
GO = "bench.go"
LIMITED_CHAIN = "bench_limited_10"
# Above the most steps of one key that can be open at once (one per execution, and the
# executions of a submission have distinct ``i``): the limit is checked, never binds.
LIMITED_CHAIN_LIMIT = 10
KEYED = "bench_keyed"
UNKEYED = "bench_unkeyed"
KEYED_STEP = "work"


def stamp(ctx: StepContext) -> float:
    """Return the time the step started (seconds since the epoch)."""
    return time.time()


def noop(ctx: StepContext, **upstream: Any) -> None:
    """A step that does nothing (it takes whatever upstream outputs it is given)."""


def stamp_after(ctx: StepContext, **upstream: Any) -> float:
    """Return the time the step started, after whatever upstream steps it has."""
    return time.time()


def linear_name(steps: int) -> str:
    """The name of the linear workflow of ``steps`` steps."""
    return f"bench_linear_{steps}"


def linear(steps: int) -> Workflow:
    """``s0000 -> s0001 -> ...``: ``steps`` steps, each after the one before."""
    workflow = Workflow(linear_name(steps), description="benchmark: a chain of no-op steps")
    previous: tuple[str, ...] = ()
    for index in range(steps):
        name = f"s{index:04d}"
        workflow.add_step(Step(name=name, fn=noop if previous else stamp, depends_on=previous))
        previous = (name,)
    return workflow


def _execution_key(data: Any) -> Any:
    """The limited chain's key: the execution's index in its submission."""
    return data["i"]


def limited_chain(steps: int = CHAIN_STEPS) -> Workflow:
    """The chain of ``linear(steps)`` with every step under
    ``Concurrency(key=input i, limit=10)``: one key per execution and step, a limit that
    never binds, so that only the cost of checking it is measured."""
    workflow = Workflow(LIMITED_CHAIN, description="benchmark: a chain under a loose limit")
    limit = Concurrency(key=_execution_key, limit=LIMITED_CHAIN_LIMIT)
    previous: tuple[str, ...] = ()
    for index in range(steps):
        name = f"s{index:04d}"
        fn = noop if previous else stamp
        workflow.add_step(Step(name=name, fn=fn, depends_on=previous, limits=(limit,)))
        previous = (name,)
    return workflow


def _input_key(data: Any) -> Any:
    """The keyed workflow's key: the input's ``key``."""
    return data["key"]


def keyed(limited: bool) -> Workflow:
    """One no-op step, ``work``: under ``Concurrency(key=input key, limit=1)`` (``limited``),
    or the same without it."""
    name, what = (KEYED, "under a limit of 1 per key") if limited else (UNKEYED, "no limit")
    workflow = Workflow(name, description=f"benchmark: one step, {what}")
    limits = (Concurrency(key=_input_key, limit=1),) if limited else ()
    workflow.add_step(Step(name=KEYED_STEP, fn=noop, limits=limits))
    return workflow


def fan_out(width: int = FANOUT_WIDTH) -> Workflow:
    """``root -> (p0 ... p7) -> sink``: one step, ``width`` in parallel, then one."""
    workflow = Workflow(FANOUT, description="benchmark: fan-out then fan-in")
    workflow.add_step(Step(name="root", fn=stamp))
    parts = tuple(f"p{index}" for index in range(width))
    for name in parts:
        workflow.add_step(Step(name=name, fn=noop, depends_on=("root",)))
    workflow.add_step(Step(name="sink", fn=noop, depends_on=parts))
    return workflow


def items(ctx: StepContext) -> list[int]:
    """The map's list: ``n`` (the input's) numbers."""
    return list(range(int(ctx.input["n"])))


def noop_item(ctx: StepContext, item: Any) -> None:
    """A map item that does nothing."""


def map_workflow() -> Workflow:
    """``root -> items (a map, 32 at a time) -> sink``: one step, the input's ``n`` items
    through ``@wf.map``, then one (the map's width is the input's, so one definition
    serves every width up to 10,000)."""
    workflow = Workflow(MAP, description="benchmark: a map of no-op items")
    workflow.add_step(Step(name="root", fn=items))
    workflow.map(over="root", max_parallel=MAP_PARALLEL, name="each")(noop_item)
    workflow.add_step(Step(name="sink", fn=noop, depends_on=("each",)))
    return workflow


def dag() -> Workflow:
    """A diamond of four no-op steps: ``a -> (b, c) -> d`` (the overhead extra)."""
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


def sleeper() -> Workflow:
    """``nap`` (a sleep of 30 days) -> ``after``: the waits extra's sleeping executions,
    bulk-loaded as rows (bench/waits.py)."""
    workflow = Workflow(SLEEPER, description="benchmark: a long sleep, then a no-op")
    workflow.sleep("nap", duration=timedelta(days=30))
    workflow.add_step(Step(name="after", fn=noop, depends_on=("nap",)))
    return workflow


def waiter() -> Workflow:
    """``go`` (a wait for event ``bench.go`` keyed by the input's ``key``) -> ``started``
    (returns the time it started): send_event -> dependent step started."""
    workflow = Workflow(WAITER, description="benchmark: wait for an event, then a step")
    workflow.wait("go", event=GO, key=lambda ctx: str(ctx.input["key"]))
    workflow.add_step(Step(name="started", fn=stamp_after, depends_on=("go",)))
    return workflow


def long_steps() -> int:
    """Steps of the long chain: ``BENCH_LONG_STEPS``, default 1,000."""
    return int(os.environ.get("BENCH_LONG_STEPS", "1000"))


def registry(long: int | None = None) -> WorkflowRegistry:
    """Every benchmark workflow, with a long chain of ``long`` steps (or none)."""
    found = [linear(CHAIN_STEPS), fan_out(), dag(), work(), sleeper(), waiter(), map_workflow()]
    found += [limited_chain(), keyed(limited=True), keyed(limited=False)]
    if long is not None and long != CHAIN_STEPS:
        found.append(linear(long))
    return WorkflowRegistry(found)


# What the workers register (module-level Workflow objects).
chain = linear(CHAIN_STEPS)
fanout = fan_out()
mapping = map_workflow()
sleeping = sleeper()
waiting = waiter()
chain_limited = limited_chain()
keyed_limited = keyed(limited=True)
keyed_unlimited = keyed(limited=False)
chain_long = linear(long_steps()) if long_steps() != CHAIN_STEPS else chain
