"""Workflows whose steps go to different queues (``queue=``), for tests/e2e/test_routing.py.

Each task step returns the pool that ran it: worker processes of the routing tests run
with ``ROUTING_POOL`` set to the queue they consume (``-Q``).
"""

from __future__ import annotations

import os
from typing import Any

from core.workflows import StepContext, Workflow

POOL = "ROUTING_POOL"


def ran(ctx: StepContext) -> dict[str, Any]:
    """Where this step ran: the pool of its worker process."""
    return {"step": ctx.step_name, "pool": os.environ.get(POOL, "?")}


# A chain alternating between queues a and b (the workflow's own queue a where a step
# names none), then a fan-out of three siblings, one on a and two on b (the worker of b
# continues one and holds the other: never the one of a), joined on b.
alternating = Workflow("alternating", queue="a")


@alternating.step()
def s1(ctx: StepContext) -> dict[str, Any]:
    return ran(ctx)


@alternating.step(depends_on=["s1"], queue="b")
def s2(ctx: StepContext, s1: Any) -> dict[str, Any]:
    return ran(ctx)


@alternating.step(depends_on=["s2"])
def s3(ctx: StepContext, s2: Any) -> dict[str, Any]:
    return ran(ctx)


@alternating.step(depends_on=["s3"], queue="b")
def s4(ctx: StepContext, s3: Any) -> dict[str, Any]:
    return ran(ctx)


@alternating.step(depends_on=["s4"], queue="a")
def s5(ctx: StepContext, s4: Any) -> dict[str, Any]:
    return ran(ctx)


@alternating.step(depends_on=["s5"], queue="b")
def s6(ctx: StepContext, s5: Any) -> dict[str, Any]:
    return ran(ctx)


@alternating.step(depends_on=["s6"])
def fan_a(ctx: StepContext, s6: Any) -> dict[str, Any]:
    return ran(ctx)


@alternating.step(depends_on=["s6"], queue="b")
def fan_b(ctx: StepContext, s6: Any) -> dict[str, Any]:
    return ran(ctx)


@alternating.step(depends_on=["s6"], queue="b")
def fan_c(ctx: StepContext, s6: Any) -> dict[str, Any]:
    return ran(ctx)


@alternating.step(depends_on=["fan_a", "fan_b", "fan_c"], queue="b")
def joined(ctx: StepContext, fan_a: Any, fan_b: Any, fan_c: Any) -> dict[str, Any]:
    return ran(ctx)


# Roots on two queues: its start goes to the workflow's queue (a), and the worker that
# takes it claims no root of b.
split_roots = Workflow("split_roots", queue="a")


@split_roots.step(queue="b")
def left(ctx: StepContext) -> dict[str, Any]:
    return ran(ctx)


@split_roots.step()
def right(ctx: StepContext) -> dict[str, Any]:
    return ran(ctx)


@split_roots.step(depends_on=["left", "right"], queue="b")
def both(ctx: StepContext, left: Any, right: Any) -> dict[str, Any]:
    return ran(ctx)


# A map whose items run on b between steps of a: the map's output is its items' outputs.
mapped = Workflow("mapped_routing", queue="a")


@mapped.step()
def listed(ctx: StepContext) -> list[int]:
    return list(range(6))


@mapped.map(over="listed", queue="b", max_parallel=2)
def per_item(ctx: StepContext, item: int) -> dict[str, Any]:
    return ran(ctx)


@mapped.step(depends_on=["per_item"])
def gathered(ctx: StepContext, per_item: list[dict[str, Any]]) -> dict[str, Any]:
    return {**ran(ctx), "items": sorted({item["pool"] for item in per_item})}


# A step on a queue no worker consumes until the test starts one.
stranded = Workflow("stranded")


@stranded.step()
def ahead(ctx: StepContext) -> dict[str, Any]:
    return ran(ctx)


@stranded.step(depends_on=["ahead"], queue="nobody")
def behind(ctx: StepContext, ahead: Any) -> dict[str, Any]:
    return ran(ctx)
