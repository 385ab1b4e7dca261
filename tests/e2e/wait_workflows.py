"""Workflows with waits that the API, CLI and dashboard tests run (registered by
``e2e_registry()`` beside tests/e2e/workflows.py)."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel

from core.workflows import StepContext, Workflow


class Approval(BaseModel):
    """The payload of ``invoice.approved``."""

    approved: bool
    note: str = ""


invoice_approval = Workflow("invoice-approval")


@invoice_approval.step()
def request(ctx: StepContext) -> dict[str, str]:
    return {"invoice_id": str(ctx.input["invoice_id"])}


invoice_approval.wait(
    "approval",
    depends_on=["request"],
    event="invoice.approved",
    key=lambda ctx, request: request["invoice_id"],
    schema=Approval,
    timeout=timedelta(days=7),
)


@invoice_approval.step(depends_on=["approval"])
def pay(ctx: StepContext, approval: dict[str, object]) -> dict[str, object]:
    return {"paid": bool(approval["approved"]), "note": approval.get("note", "")}


nap = Workflow("nap")
# Long enough that only an early wake (or a test moving wake_at) ends it.
nap.sleep("nap", duration=timedelta(hours=1))


@nap.step(depends_on=["nap"])
def wake_up(ctx: StepContext, nap: str) -> str:
    return f"slept until {nap}"
