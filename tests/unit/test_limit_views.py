"""What a step held by a limit's key is said to wait for (core.limits.why_held and the
CLI's wording), from its row and its key's pause."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.cli.limits import rate
from conveyor.cli.render import waits_for
from core.limits import why_held
from core.models import StepExecution

NOW = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


def _held(key: str | None, wake_at: datetime | None) -> StepExecution:
    step = StepExecution(execution_id="e", step_name="call", status="pending", wait_kind="key")
    step.status = "waiting"  # as core.limits holds it (a new row starts pending)
    step.wait_key, step.wake_at = key, wake_at
    return step


@pytest.mark.parametrize(
    ("wake_at", "paused_until", "why"),
    [
        (None, None, "concurrency"),  # no wake time: a free slot admits it
        (None, NOW + timedelta(hours=1), "concurrency"),  # a slot first, then the pause
        (NOW + timedelta(seconds=4), None, "rate"),
        (NOW + timedelta(hours=1), NOW + timedelta(hours=1), "paused"),
        (NOW + timedelta(seconds=4), NOW - timedelta(seconds=1), "rate"),  # pause over
    ],
)
def test_why_a_step_is_held(
    wake_at: datetime | None, paused_until: datetime | None, why: str
) -> None:
    assert why_held(wake_at, paused_until, NOW) == why


def test_status_says_which_key_holds_a_step_and_until_when() -> None:
    soon = NOW + timedelta(seconds=4)
    later = NOW + timedelta(hours=2)
    assert waits_for(_held("openai", None), now=NOW) == "key openai (no free slot)"
    assert waits_for(_held("openai", soon), now=NOW) == (
        "key openai (rate limited until 2026-12-07 10:00 UTC, in 4s)"
    )
    assert waits_for(_held("openai", later), now=NOW, pauses={"openai": later}) == (
        "key openai (paused until 2026-12-07 12:00 UTC, in 2h 00m)"
    )
    # A retry's backoff behind limits: no key holds it yet, its admission is due then.
    assert waits_for(_held(None, soon), now=NOW) == (
        "admission under its limits at 2026-12-07 10:00 UTC (in 4s)"
    )


def test_rates_read_per_second_or_per_minute() -> None:
    assert [rate(None), rate(100.0), rate(1.0), rate(50 / 60), rate(1 / 3600)] == [
        "-",
        "100/s",
        "1/s",
        "50/min",
        "0.02/min",
    ]
