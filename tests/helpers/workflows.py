"""Workflows the state tests create executions of: each name, one step, any input.

The state managers (and the ORM) only create executions of registered workflows; the
``database`` fixture makes this registry the process's.
"""

from __future__ import annotations

from core.registry import WorkflowRegistry
from core.workflows import StepContext, Workflow

NAMES = ("ingest", "a", "b", "report", "charge", "refund", "invoice", "w", "wf")


def _one_step(name: str) -> Workflow:
    workflow = Workflow(name)

    @workflow.step()
    def only(ctx: StepContext) -> None:
        return None

    return workflow


def state_registry() -> WorkflowRegistry:
    """A registry with a one-step workflow of each name in NAMES."""
    return WorkflowRegistry(_one_step(name) for name in NAMES)
