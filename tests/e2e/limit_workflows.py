"""Workflows behind limits for the tests of what shows them (API, CLI, dashboard,
metrics): ``limits-gated`` holds key ``gpu-pool``'s only slot until ``GATE`` is set, so
a second execution's step waits for it; ``limits-metered`` calls under the rate of key
``metered-api`` (100 a second), which a test pauses and resumes; ``limits-hourly`` may
start once an hour under key ``hourly-api``; ``limits-batch`` executions start under
their workflow's own key ``batch-pool``."""

from __future__ import annotations

import threading
from datetime import timedelta

from core.workflows import Concurrency, RateLimit, StepContext, Workflow

GPU_KEY = "gpu-pool"
METERED_KEY = "metered-api"
HOURLY_KEY = "hourly-api"
BATCH_KEY = "batch-pool"
# Set by the test (and by its teardown) to let the step holding the slot end.
GATE = threading.Event()
GATE_SECONDS = 30.0

gated = Workflow("limits-gated")


@gated.step(concurrency=Concurrency(key=GPU_KEY, limit=1))
def render(ctx: StepContext) -> str:
    GATE.wait(GATE_SECONDS)
    return "rendered"


metered = Workflow("limits-metered")


@metered.step(rate_limit=RateLimit(key=METERED_KEY, limit=100, per=timedelta(seconds=1)))
def call(ctx: StepContext) -> str:
    return "called"


hourly = Workflow("limits-hourly")


@hourly.step(rate_limit=RateLimit(key=HOURLY_KEY, limit=1, per=timedelta(hours=1)))
def report(ctx: StepContext) -> str:
    return "reported"


batch = Workflow("limits-batch", concurrency=Concurrency(key=BATCH_KEY, limit=5))


@batch.step()
def load(ctx: StepContext) -> str:
    return "loaded"
