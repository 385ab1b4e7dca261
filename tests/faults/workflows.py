"""Workflows of the fault suite, loaded by worker processes (CONVEYOR_WORKFLOW_MODULES).

Every run of a step's code appends one line ``execution step attempt pid`` to the file
named by ``FAULTS_RUN_LOG`` (O_APPEND: one write per line, safe across processes and
untouched by a broker flush), so the checker counts runs wherever they happened.
While the file named by ``FAULTS_GATE`` exists, steps finish their work but do not
return: a test holds them mid-step across a fault.
Outputs are arithmetic on the input, so the checker can recompute every one of them
(a sleep's output is its wake time: the checker compares it with the row's ``wake_at``).
Wait nodes (``sleepy``'s sleep, ``approval``'s event wait, ``parent``'s child, a map
step) run no code: they never appear in the run log (a child's own steps do, and a
map's items, each as ``step[index]``).

``FAULTS_RELEASE=new`` is the next release of this code, for rolling deploys: the chain's
``link_5``, ``sleepy``'s ``b`` and the map's ``total`` are marked ``version=2`` (a
change of meaning a worker must not mix with the old one; the outputs stay the same, so
the checker reads either release's executions), and ``fan`` is unchanged (it runs on
either release).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from core.workflows import Concurrency, Retry, StepContext, Workflow

RUN_LOG_ENV = "FAULTS_RUN_LOG"
RELEASE_ENV = "FAULTS_RELEASE"
# The version of the steps the next release changes: 1, or 2 in FAULTS_RELEASE=new.
CHANGED = 2 if os.environ.get(RELEASE_ENV) == "new" else 1
GATE_ENV = "FAULTS_GATE"
SPANS_ENV = "FAULTS_SPANS_LOG"
CHAIN_LENGTH = 10
FAN_WIDTH = 8
STEP_SECONDS = (0.05, 0.3)


class Seed(BaseModel):
    """Input of both workflows: the number the arithmetic starts from."""

    start: int


def run_name(ctx: StepContext) -> str:
    """The name a run is logged under: the step's, ``step[index]`` for a map's item."""
    if ctx.map_index is None:
        return ctx.step_name
    return f"{ctx.step_name}[{ctx.map_index}]"


def _record(ctx: StepContext) -> None:
    """Append this run of the step's code to the run log."""
    path = os.environ.get(RUN_LOG_ENV)
    if path:
        line = f"{ctx.execution_id} {run_name(ctx)} {ctx.attempt} {os.getpid()}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _work(ctx: StepContext, seconds: tuple[float, float] = STEP_SECONDS) -> None:
    """Record this run of the step's code, then take ``seconds`` (50-300 ms) like real
    work."""
    _record(ctx)
    time.sleep(random.uniform(*seconds))
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
    chain.step(f"link_{_i}", depends_on=[f"link_{_i - 1}"], version=CHANGED if _i == 5 else 1)(
        _link(_i)
    )


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


# a -> sleep -> b: the sleep lasts the input's ``seconds`` (decided as it is entered).
class Nap(BaseModel):
    """Input of ``sleepy``: the number, and how long its sleep lasts."""

    start: int
    seconds: float = 4.0


sleepy = Workflow("fault_sleepy", input_model=Nap)


@sleepy.step("a")
def _nap_a(ctx: StepContext) -> int:
    _work(ctx)
    return int(ctx.input.start)


def _wake_time(ctx: StepContext, a: int) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=float(ctx.input.seconds))


sleepy.sleep("nap", depends_on=["a"], until=_wake_time)


@sleepy.step("b", depends_on=["nap"], version=CHANGED)
def _nap_b(ctx: StepContext, nap: str) -> int:
    datetime.fromisoformat(nap)  # the sleep's output is its wake time
    _work(ctx)
    return int(ctx.input.start) + 1


# a -> wait for "fault.approved" with the input's key -> b.
APPROVAL_EVENT = "fault.approved"


class Approved(BaseModel):
    """The payload of ``fault.approved``."""

    value: int


def approval_key(start: int) -> str:
    """The event key of the ``approval`` execution started from ``start``."""
    return f"ticket-{start}"


def approval_payload(start: int) -> dict[str, int]:
    """The payload a test sends for the ``approval`` execution started from ``start``."""
    return {"value": start * 3}


approval = Workflow("fault_approval", input_model=Seed)


@approval.step("a")
def _approval_a(ctx: StepContext) -> int:
    _work(ctx)
    return int(ctx.input.start)


def _approval_key(ctx: StepContext, a: int) -> str:
    return approval_key(int(ctx.input.start))


approval.wait(
    "approval", depends_on=["a"], event=APPROVAL_EVENT, key=_approval_key, schema=Approved
)


@approval.step("b", depends_on=["approval"])
def _approval_b(ctx: StepContext, approval: dict[str, int]) -> int:
    _work(ctx)
    return int(approval["value"]) + int(ctx.input.start)


# a -> child (a three-step chain from a * 10) -> b.
CHILD_CHAIN = 3
chain3 = Workflow("fault_chain3", input_model=Seed)


@chain3.step("link_0")
def _child_first_link(ctx: StepContext) -> int:
    _work(ctx)
    return int(ctx.input.start)


for _i in range(1, CHILD_CHAIN):
    chain3.step(f"link_{_i}", depends_on=[f"link_{_i - 1}"])(_link(_i))

parent = Workflow("fault_parent", input_model=Seed)


@parent.step("a")
def _parent_a(ctx: StepContext) -> int:
    _work(ctx)
    return int(ctx.input.start)


def _child_input(ctx: StepContext, a: int) -> dict[str, int]:
    return {"start": a * 10}


parent.child("child", depends_on=["a"], workflow=chain3, input=_child_input)


@parent.step("b", depends_on=["child"])
def _parent_b(ctx: StepContext, child: dict[str, int]) -> int:
    _work(ctx)
    return int(child[f"link_{CHILD_CHAIN - 1}"]) + 1


# numbers -> square (a map: each item doubled) -> total (an order-sensitive sum of the
# map's list: sum of index * output). ``items`` long, from ``start``; each item takes
# ``item_seconds`` (up to that many seconds, from a tenth of it; 0: no pause).
class Mapped(BaseModel):
    """Input of the map workflows: the first number, the list's length, item work."""

    start: int
    items: int = 30
    item_seconds: float = STEP_SECONDS[1]


def _numbers(ctx: StepContext) -> list[int]:
    _work(ctx)
    return [int(ctx.input.start) + i for i in range(int(ctx.input.items))]


def _square(ctx: StepContext, item: int) -> int:
    most = float(ctx.input.item_seconds)
    if most > 0:
        _work(ctx, (most / 10, most))
    else:
        _record(ctx)
    return item * 2


def _total(ctx: StepContext, square: list[int]) -> int:
    _work(ctx)
    return sum(index * value for index, value in enumerate(square))


def _map_workflow(name: str, max_parallel: int) -> Workflow:
    workflow = Workflow(name, input_model=Mapped)
    workflow.step("numbers")(_numbers)
    workflow.map(over="numbers", max_parallel=max_parallel, name="square")(_square)
    workflow.step("total", depends_on=["square"], version=CHANGED)(_total)
    return workflow


MAP_PARALLEL = 8
WIDE_MAP_PARALLEL = 20
# The fault mixes' map: a few dozen items, 8 at a time.
mapped = _map_workflow("fault_map", MAP_PARALLEL)
# The big maps of tests/faults/test_map_faults.py: thousands of items, 20 at a time.
wide_map = _map_workflow("fault_wide_map", WIDE_MAP_PARALLEL)

# One no-op step: the high-priority execution that must get through a big map.
single = Workflow("fault_single", input_model=Seed)


@single.step("only")
def _only(ctx: StepContext) -> int:
    _record(ctx)
    return int(ctx.input.start)


# One step under a per-key concurrency limit whose input says how it behaves
# (tests/faults/test_limit_faults.py). ``limited`` shares the text key ``fault-limit``
# (2 at a time) across its executions, ``limited_one`` the key ``fault-limit-one`` (1).
# Each run appends ``start`` and (unless its process dies) ``end`` lines with wall-clock
# times to the file named by ``FAULTS_SPANS_LOG``, so a test can check that no two runs
# under a key overlapped.
LIMIT_KEY = "fault-limit"
LIMIT = 2
ONE_KEY = "fault-limit-one"
HARD_TIMEOUT = 3.0  # seconds: Celery's time limit of the limited step
FLAKY_BACKOFF = 0.3
ACTS = ("succeed", "flaky", "fail", "cancel", "timeout", "crash", "hold")
# What each act's execution ends as.
ACT_STATUS = {
    "succeed": "succeeded",
    "flaky": "succeeded",  # attempt 1 raises Flaky, the retry succeeds
    "fail": "failed",  # raises an error no retry is spent on
    "cancel": "cancelled",  # runs until the test cancels its execution
    "timeout": "failed",  # sleeps past HARD_TIMEOUT: killed, not retried
    # attempt 1 SIGKILLs its own pool process (once the gate file is gone); the recovery
    # succeeds
    "crash": "succeeded",
    "hold": "succeeded",  # attempt 1 waits while the gate file exists, then succeeds
}


class Flaky(Exception):
    """The error the limited step retries (attempt 1 of ``flaky``)."""


class Broken(Exception):
    """An error the limited step does not retry (``fail``)."""


class Act(BaseModel):
    """Input of the limited workflows: the number, and what the step does."""

    start: int
    act: str = "succeed"
    seconds: float = 0.1


def _span(ctx: StepContext, mark: str) -> None:
    path = os.environ.get(SPANS_ENV)
    if path:
        line = f"{ctx.execution_id} {ctx.attempt} {os.getpid()} {mark} {time.time():.6f}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _act(ctx: StepContext) -> int:
    _record(ctx)
    _span(ctx, "start")
    try:
        act = str(ctx.input.act)
        first = ctx.attempt == 1
        gate = os.environ.get(GATE_ENV)
        while act in ("hold", "crash") and first and gate and os.path.exists(gate):
            time.sleep(0.02)
        if act == "crash" and first:
            os.kill(os.getpid(), signal.SIGKILL)  # the pool process dies mid-step
        if act == "timeout":
            time.sleep(HARD_TIMEOUT * 10)  # Celery kills the pool process at HARD_TIMEOUT
        if act == "cancel":
            while not ctx.is_cancelled():  # until the test cancels the execution
                time.sleep(0.02)
            return -1
        time.sleep(float(ctx.input.seconds))
        if act == "flaky" and first:
            raise Flaky("attempt 1 of a flaky step")
        if act == "fail":
            raise Broken("a step that fails for good")
        return int(ctx.input.start)
    finally:
        _span(ctx, "end")


def _limited_workflow(name: str, key: str, limit: int) -> Workflow:
    workflow = Workflow(name, input_model=Act)
    workflow.step(
        "call",
        concurrency=Concurrency(key=key, limit=limit),
        retry=Retry(max_attempts=2, backoff=FLAKY_BACKOFF, jitter=False, retry_on=(Flaky,)),
        timeout=HARD_TIMEOUT,
    )(_act)
    return workflow


limited = _limited_workflow("fault_limited", LIMIT_KEY, LIMIT)
limited_one = _limited_workflow("fault_limited_one", ONE_KEY, 1)

WORKFLOWS = {
    w.name: w
    for w in (
        chain,
        fan,
        sleepy,
        approval,
        chain3,
        parent,
        mapped,
        wide_map,
        single,
        limited,
        limited_one,
    )
}
MAP_WORKFLOWS = frozenset({mapped.name, wide_map.name})
LIMITED_WORKFLOWS = frozenset({limited.name, limited_one.name})
# A sleep's expected output: its wake time, which the checker reads from the row.
WAKE_TIME = "<the sleep's wake_at>"


def definition(workflow: str) -> Workflow:
    """The fault-suite workflow called ``workflow``."""
    if workflow not in WORKFLOWS:
        raise ValueError(f"not a fault-suite workflow: {workflow}")
    return WORKFLOWS[workflow]


def expected_outputs(workflow: str, start: int, items: int = 0) -> dict[str, Any]:
    """Every step's correct output for an execution of ``workflow`` from ``start`` (a
    map workflow's list ``items`` long; ``WAKE_TIME`` for a sleep)."""
    if workflow in MAP_WORKFLOWS:
        numbers = [start + i for i in range(items)]
        square = [n * 2 for n in numbers]
        total = sum(index * value for index, value in enumerate(square))
        return {"numbers": numbers, "square": square, "total": total}
    if workflow == single.name:
        return {"only": start}
    if workflow in LIMITED_WORKFLOWS:  # an execution whose act succeeds
        return {"call": start}
    if workflow == chain3.name:
        return {f"link_{i}": start + i for i in range(CHILD_CHAIN)}
    if workflow == parent.name:
        last = start * 10 + CHILD_CHAIN - 1
        return {"a": start, "child": {f"link_{CHILD_CHAIN - 1}": last}, "b": last + 1}
    if workflow == sleepy.name:
        return {"a": start, "nap": WAKE_TIME, "b": start + 1}
    if workflow == approval.name:
        payload = approval_payload(start)
        return {"a": start, "approval": payload, "b": payload["value"] + start}
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
    steps = definition(workflow).steps
    return [name for name, step in steps.items() if len(step.depends_on) > 1]


def sinks(workflow: str) -> list[str]:
    """Steps of ``workflow`` nothing depends on (their outputs are the execution's)."""
    return list(definition(workflow).sinks)


def wait_nodes(workflow: str) -> dict[str, str]:
    """The wait nodes of ``workflow`` (they run no code), each with its kind."""
    steps = definition(workflow).steps
    # A task behind limits waits as a row to be admitted, but runs code: not a wait node.
    waits = definition(workflow).wait_nodes
    return {name: steps[name].kind for name in waits if steps[name].kind != "task"}


def map_nodes(workflow: str) -> list[str]:
    """The map steps of ``workflow``."""
    return sorted(definition(workflow).map_nodes)


def map_length(workflow: str, input_data: Any) -> int:
    """The length of the list a map workflow's execution maps (0 for the others)."""
    if workflow not in MAP_WORKFLOWS:
        return 0
    return int(Mapped.model_validate(input_data).items)
