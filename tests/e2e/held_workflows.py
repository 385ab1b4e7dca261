"""Fan-outs for the tests of held siblings (tests/e2e/test_held_siblings.py).

Each is ``root -> (a_..., b, c, d) -> sink``: the worker that completes ``root``
continues the first branch by name (``a_...``) and holds the others. Loaded beside
``tests.e2e.workflows`` (in-process workers, and worker processes through
``CONVEYOR_WORKFLOW_MODULES``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from core.workflows import StepContext, Workflow
from tests.e2e.workflows import count_call

BRANCHES = ("b", "c", "d")
# In-process workers only: set by each branch that ran, and the gate of held_gate's a_gate.
BRANCH_RAN = {name: threading.Event() for name in BRANCHES}
GATE = threading.Event()
# The worker process of a test: this file's existence makes held_hang's first branch hang.
HANG_ENV = "HELD_HANG_FILE"


def _fan(name: str, first: str, run_first: Any, *, limited: bool = False) -> Workflow:
    workflow = Workflow(name)

    @workflow.step()
    def root(ctx: StepContext) -> int:
        count_call(ctx)
        return 10

    workflow.step(first, depends_on=["root"])(run_first)
    for branch in BRANCHES:
        # With ``limited``, b has time limits of its own (and so runs under its own task).
        bounded = limited and branch == "b"
        workflow.step(
            branch,
            depends_on=["root"],
            soft_timeout=0.5 if bounded else None,
            timeout=5.0 if bounded else None,
        )(_branch(branch, limited))

    @workflow.step(depends_on=[first, *BRANCHES])
    def sink(ctx: StepContext, **outputs: Any) -> dict[str, Any]:
        count_call(ctx)
        return outputs

    return workflow


def _branch(name: str, limited: bool) -> Any:
    def branch(ctx: StepContext, root: int) -> dict[str, Any]:
        count_call(ctx)
        if limited and name == "b":
            time.sleep(3)  # past its soft time limit: Celery interrupts it
        BRANCH_RAN[name].set()
        return {"value": root + 1, "pid": os.getpid(), "thread": threading.get_ident()}

    branch.__name__ = name
    return branch


def _first(ctx: StepContext, root: int) -> dict[str, Any]:
    count_call(ctx)
    return {"value": root, "pid": os.getpid(), "thread": threading.get_ident()}


def _a_slow(ctx: StepContext, root: int) -> bool:
    """Runs until every sibling ran, or 20 s: True when they all ran meanwhile (handed off
    while this step still ran, since this worker held them)."""
    count_call(ctx)
    return all(BRANCH_RAN[name].wait(20) for name in BRANCHES)


def _a_gate(ctx: StepContext, root: int) -> str:
    """Runs until the test opens GATE (20 s at most)."""
    count_call(ctx)
    return "opened" if GATE.wait(20) else "timed out"


def _a_hang(ctx: StepContext, root: int) -> str:
    """Hangs on attempt 1 while the file named by HELD_HANG_FILE exists (a test kills its
    worker there); returns at once after."""
    count_call(ctx)
    hang = os.environ.get(HANG_ENV)
    while ctx.attempt == 1 and hang and os.path.exists(hang):
        time.sleep(0.05)
    return f"attempt {ctx.attempt}"


held_fan = _fan("held_fan", "a_first", _first)
held_slow = _fan("held_slow", "a_slow", _a_slow)
held_gate = _fan("held_gate", "a_gate", _a_gate)
held_hang = _fan("held_hang", "a_hang", _a_hang)
held_limited = _fan("held_limited", "a_first", _first, limited=True)
