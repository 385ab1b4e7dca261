"""Five example workflows: copy this module, rename the workflows, replace the step bodies.

Run them with ``CONVEYOR_WORKFLOW_MODULES=conveyor.examples.workflows`` (``make run`` does):

- ``daily_report``: a linear pipeline, fetch -> summarize -> render.
- ``gallery_thumbnails``: fan-out to 20 parallel steps, fan-in to one.
- ``supplier_sync``: a step that fails twice, then recovers through its Retry policy.
- ``charge_order``: a step that fails for good; the step after it is skipped.
- ``invoice_approval``: waits for a person's approval (an event or a signal, checked
  against a schema), then a durable grace period (a sleep), then pays; no worker is
  held while it waits.

A step takes its context first (``ctx.input`` is the validated input model,
``ctx.attempt`` counts from 1), then one argument per upstream step, named after
it, holding that step's return value. Return values are stored as JSON.
"""

from __future__ import annotations

import hashlib
import random
import time
from datetime import timedelta

from pydantic import BaseModel, Field

from conveyor import Retry, StepContext, Workflow
from core.workflows import StepFunction

# A pause in each step, so that the demo's progress bars have something to show.
WORK_SECONDS = 0.05

# --- 1. linear: fetch -> summarize -> render ------------------------------------------


class ReportInput(BaseModel):
    """Which sales to report on."""

    region: str = Field(min_length=1, max_length=50)
    days: int = Field(default=7, ge=1, le=366)


class Order(BaseModel):
    """One sale, as the (pretend) orders service returns it."""

    order_id: str
    amount_cents: int


class Summary(BaseModel):
    """Totals over a list of orders."""

    orders: int
    revenue_cents: int
    largest_cents: int


daily_report = Workflow(
    "daily_report",
    input_model=ReportInput,
    deadline=timedelta(minutes=10),
    description="Fetch a region's orders, total them and render a one-line report.",
)


@daily_report.step()
def fetch_orders(ctx: StepContext) -> list[Order]:
    """Pretend to call an orders API: the same input always gives the same orders."""
    params: ReportInput = ctx.input
    time.sleep(WORK_SECONDS)
    rng = random.Random(f"{params.region}:{params.days}")
    return [
        Order(order_id=f"{params.region}-{n:04d}", amount_cents=rng.randint(500, 50_000))
        for n in range(params.days * 12)
    ]


@daily_report.step(depends_on=["fetch_orders"])
def summarize(ctx: StepContext, fetch_orders: list[dict[str, int | str]]) -> Summary:
    """Total the orders (upstream outputs arrive as JSON data, not models)."""
    orders = [Order.model_validate(row) for row in fetch_orders]
    time.sleep(WORK_SECONDS)
    amounts = [order.amount_cents for order in orders]
    return Summary(orders=len(amounts), revenue_cents=sum(amounts), largest_cents=max(amounts))


@daily_report.step(depends_on=["summarize"])
def render_report(ctx: StepContext, summarize: dict[str, int]) -> str:
    """The line a person reads."""
    params: ReportInput = ctx.input
    summary = Summary.model_validate(summarize)
    return (
        f"{params.region}, last {params.days} days: {summary.orders} orders, "
        f"${summary.revenue_cents / 100:,.2f} revenue, "
        f"largest ${summary.largest_cents / 100:,.2f}"
    )


# --- 2. fan-out / fan-in: one listing, 20 parallel resizes, one gallery ---------------

THUMBNAILS = 20


class GalleryInput(BaseModel):
    """Which album to make thumbnails for."""

    album: str = Field(min_length=1, max_length=100)
    size: int = Field(default=256, ge=16, le=2048)


gallery_thumbnails = Workflow(
    "gallery_thumbnails",
    input_model=GalleryInput,
    deadline=timedelta(minutes=10),
    description=f"List an album's images, resize {THUMBNAILS} in parallel, publish a gallery.",
)


@gallery_thumbnails.step()
def list_images(ctx: StepContext) -> list[str]:
    """The album's image names (one per parallel resize step)."""
    params: GalleryInput = ctx.input
    return [f"{params.album}/img_{n:02d}.jpg" for n in range(THUMBNAILS)]


def resize_step(index: int) -> StepFunction:
    """The step function resizing image ``index``: one per branch, declared below."""

    def resize(ctx: StepContext, list_images: list[str]) -> dict[str, str]:
        params: GalleryInput = ctx.input
        source = list_images[index]
        time.sleep(WORK_SECONDS)
        digest = hashlib.sha256(f"{source}@{params.size}".encode()).hexdigest()[:12]
        return {"source": source, "thumbnail": f"thumbs/{params.size}/{digest}.jpg"}

    return resize


# Steps are declared in a loop: a workflow's DAG is fixed when the module is imported.
RESIZE_STEPS = [f"resize_{n:02d}" for n in range(THUMBNAILS)]
for _index, _name in enumerate(RESIZE_STEPS):
    gallery_thumbnails.step(_name, depends_on=["list_images"])(resize_step(_index))


@gallery_thumbnails.step(depends_on=RESIZE_STEPS)
def publish_gallery(ctx: StepContext, **resized: dict[str, str]) -> dict[str, str | int]:
    """Join all branches: it runs once, after the last resize succeeds."""
    params: GalleryInput = ctx.input
    thumbnails = [resized[name]["thumbnail"] for name in sorted(resized)]
    return {"album": params.album, "thumbnails": len(thumbnails), "first": thumbnails[0]}


# --- 3. transient failure, recovered by the Retry policy ------------------------------


class SyncInput(BaseModel):
    """Which supplier's stock levels to pull."""

    supplier: str = Field(min_length=1, max_length=100)
    skus: list[str] = Field(min_length=1, max_length=100)


class SupplierUnavailable(Exception):
    """The supplier's API is briefly down (503): worth another attempt."""


supplier_sync = Workflow(
    "supplier_sync",
    input_model=SyncInput,
    deadline=timedelta(minutes=10),
    description="Pull stock levels from a flaky supplier API, then update the catalogue.",
)

# Attempt 1 after the failure waits 0.2 s, attempt 2 waits 0.4 s; no jitter, so the
# demo's timing is the same on every run. Only SupplierUnavailable is retried.
SUPPLIER_RETRY = Retry(
    max_attempts=5, backoff=0.2, backoff_max=2.0, jitter=False, retry_on=(SupplierUnavailable,)
)
SUPPLIER_RECOVERS_ON_ATTEMPT = 3


@supplier_sync.step(retry=SUPPLIER_RETRY)
def pull_stock_levels(ctx: StepContext) -> dict[str, int]:
    """Fails on its first two attempts (deterministically), succeeds on the third."""
    params: SyncInput = ctx.input
    if ctx.attempt < SUPPLIER_RECOVERS_ON_ATTEMPT:
        raise SupplierUnavailable(f"{params.supplier} answered 503 (attempt {ctx.attempt})")
    return {sku: len(sku) * 7 for sku in params.skus}


@supplier_sync.step(depends_on=["pull_stock_levels"])
def update_catalogue(ctx: StepContext, pull_stock_levels: dict[str, int]) -> dict[str, int]:
    """Write the levels (here: report how many SKUs changed and the units in stock)."""
    time.sleep(WORK_SECONDS)
    return {"skus_updated": len(pull_stock_levels), "units": sum(pull_stock_levels.values())}


# --- 4. permanent failure: the execution fails, downstream is skipped -----------------


class ChargeInput(BaseModel):
    """An order to charge."""

    order_id: str = Field(min_length=1, max_length=100)
    amount_cents: int = Field(gt=0)
    card: str = Field(min_length=4, max_length=32)


class PaymentDeclined(Exception):
    """The card was declined: retrying will not change the answer."""


# The test card number that every (pretend) payment provider declines.
DECLINED_CARD = "4000-0000-0000-0002"

charge_order = Workflow(
    "charge_order",
    input_model=ChargeInput,
    deadline=timedelta(minutes=10),
    description="Reserve stock, charge the card, send a receipt.",
)


@charge_order.step()
def reserve_stock(ctx: StepContext) -> str:
    """Hold the order's items (keyed for idempotency: a re-run holds them once)."""
    time.sleep(WORK_SECONDS)
    return f"reservation-{ctx.idempotency_key}"


# Network timeouts are retried; a decline is not in retry_on, so it fails at once.
@charge_order.step(
    depends_on=["reserve_stock"], retry=Retry(max_attempts=3, retry_on=(TimeoutError,))
)
def charge_card(ctx: StepContext, reserve_stock: str) -> str:
    """Charge the card; the declined test card always fails."""
    params: ChargeInput = ctx.input
    if params.card == DECLINED_CARD:
        raise PaymentDeclined(f"card ending {params.card[-4:]} declined for {params.order_id}")
    return f"charge-{params.order_id}"


@charge_order.step(depends_on=["charge_card"])
def send_receipt(ctx: StepContext, charge_card: str) -> str:
    """Never runs in the demo: its upstream failed, so it is skipped."""
    params: ChargeInput = ctx.input
    return f"receipt for {params.order_id} ({charge_card})"


# --- 5. waiting: request -> approval (event or signal) -> grace period (sleep) -> pay --


class InvoiceInput(BaseModel):
    """The invoice to approve and pay."""

    invoice_id: str = Field(min_length=1, max_length=100)
    amount_cents: int = Field(ge=1)


class Approval(BaseModel):
    """A person's answer, sent as the event ``invoice.approved`` (key: the invoice id) or
    as a signal to the ``approval`` step; the dashboard builds its form from this."""

    approved: bool
    approver: str = Field(min_length=1, max_length=320)
    note: str = Field(default="", max_length=500)


invoice_approval = Workflow(
    "invoice_approval",
    input_model=InvoiceInput,
    description="Ask for approval, wait for it (up to 7 days), wait a grace period, pay.",
)


@invoice_approval.step()
def request_approval(ctx: StepContext) -> dict[str, str]:
    """Tell the approvers (pretend): they answer through the dashboard, the API or CLI."""
    params: InvoiceInput = ctx.input
    time.sleep(WORK_SECONDS)
    return {"invoice_id": params.invoice_id}


# A row in waiting, not a held worker: an approval that arrives first is kept for it.
invoice_approval.wait(
    "approval",
    depends_on=["request_approval"],
    event="invoice.approved",
    key=lambda ctx, request_approval: request_approval["invoice_id"],
    schema=Approval,
    timeout=timedelta(days=7),
)
# Durable: a restart of every worker mid-sleep does not restart the duration.
invoice_approval.sleep("grace_period", depends_on=["approval"], duration=timedelta(seconds=1))


@invoice_approval.step(depends_on=["approval", "grace_period"])
def pay_invoice(ctx: StepContext, approval: dict[str, object], grace_period: str) -> str:
    """Pay an approved invoice; a refusal is recorded as such."""
    params: InvoiceInput = ctx.input
    if not approval["approved"]:
        return f"{params.invoice_id} refused by {approval['approver']}"
    approver = approval["approver"]
    return f"{params.invoice_id} paid ({params.amount_cents} cents), approved by {approver}"
