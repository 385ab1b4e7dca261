"""Workflows with map steps that the map tests (e2e, API, CLI, dashboard, faults) run."""

from __future__ import annotations

import threading
from typing import Any

from core.workflows import Retry, StepContext, Tolerate, Workflow


def _poisoned(ctx: StepContext, item: Any) -> bool:
    """Items the input names as poison fail on every attempt."""
    return isinstance(ctx.input, dict) and item in ctx.input.get("poison", [])


summaries = Workflow("maps-summaries")


@summaries.step()
def extract(ctx: StepContext) -> Any:
    return ctx.input["files"]


@summaries.step()
def prefix(ctx: StepContext) -> str:
    return ctx.input.get("prefix", "sum")


@summaries.map(over="extract", depends_on=["prefix"], max_parallel=4)
def summarise(ctx: StepContext, item: Any, prefix: str) -> dict[str, Any]:
    if _poisoned(ctx, item):
        raise ValueError(f"cannot summarise {item!r}")
    return {"file": item, "summary": f"{prefix}:{item}", "index": ctx.map_index}


@summaries.step(depends_on=["summarise"])
def publish(ctx: StepContext, summarise: list[dict[str, Any] | None]) -> dict[str, Any]:
    return {"count": len(summarise), "summaries": summarise}


tolerant = Workflow("maps-tolerant")


@tolerant.step()
def numbers(ctx: StepContext) -> list[int]:
    return list(range(ctx.input["n"]))


@tolerant.map(
    over="numbers",
    max_parallel=8,
    on_item_failure=Tolerate(max_failed=3),
    retry=Retry(max_attempts=2, backoff=0.0, jitter=False),
)
def square(ctx: StepContext, item: int) -> int:
    if _poisoned(ctx, item):
        raise ValueError(f"poisoned item {item}")
    return item * item


@tolerant.step(depends_on=["square"])
def total(ctx: StepContext, square: list[int | None]) -> dict[str, Any]:
    return {"sum": sum(v for v in square if v is not None), "missing": square.count(None)}


nested = Workflow("maps-nested")


@nested.step()
def rows(ctx: StepContext) -> list[list[int]]:
    return [[1, 2], [3], []]


@nested.map(over="rows", max_parallel=2)
def widths(ctx: StepContext, item: list[int]) -> list[int]:
    return [len(item)] * max(1, len(item))


@nested.map(over="widths", max_parallel=2)
def flat(ctx: StepContext, item: list[int]) -> int:
    return sum(item)


# Items whose index is in FLAKY fail on their first policy attempt of a run (tests
# fill it; a retry of failed items then succeeds): "fix the bug, re-run the failures".
FLAKY: set[int] = set()
# Items that wait for HOLD to be set before returning (tests control it).
HOLD_FIRST_ATTEMPT: set[int] = set()
HOLDING = threading.Event()
RELEASE = threading.Event()

repairable = Workflow("maps-repairable")


@repairable.step()
def batch(ctx: StepContext) -> list[int]:
    return list(range(ctx.input["n"]))


@repairable.map(over="batch", max_parallel=3)
def process(ctx: StepContext, item: int) -> int:
    if item in FLAKY:
        raise RuntimeError(f"item {item} is broken")
    if item in HOLD_FIRST_ATTEMPT and ctx.attempt == 1:
        HOLDING.set()
        RELEASE.wait(timeout=60)
    return item + 100


@repairable.step(depends_on=["process"])
def report(ctx: StepContext, process: list[int]) -> int:
    return sum(process)


# A map that keeps its execution's max_concurrency slot while its items run.
limited = Workflow("maps-limited", max_concurrency=1)


@limited.step()
def seeds(ctx: StepContext) -> list[int]:
    return [1, 2, 3]


@limited.map(over="seeds", max_parallel=1)
def slow(ctx: StepContext, item: int) -> int:
    if ctx.input.get("hold"):
        HOLDING.set()
        RELEASE.wait(timeout=60)
    return item


# A child map: one execution of ``tenant_sync`` per tenant.
tenant_sync = Workflow("maps-tenant-sync")


@tenant_sync.step()
def sync(ctx: StepContext) -> dict[str, Any]:
    if ctx.input["tenant"] in ctx.input.get("broken", []):
        raise ValueError(f"tenant {ctx.input['tenant']} is broken")
    return {"tenant": ctx.input["tenant"], "rows": len(ctx.input["tenant"])}


per_tenant = Workflow("maps-per-tenant")


@per_tenant.step()
def tenants(ctx: StepContext) -> list[str]:
    return list(ctx.input["tenants"])


per_tenant.child(
    "synced",
    workflow=tenant_sync,
    over="tenants",
    max_parallel=2,
    input=lambda ctx, item: {"tenant": item, "broken": ctx.input.get("broken", [])},
)


@per_tenant.step(depends_on=["synced"])
def rows_total(ctx: StepContext, synced: list[dict[str, Any]]) -> int:
    return sum(s["sync"]["rows"] for s in synced)
