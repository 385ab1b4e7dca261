"""A user's tests, written only against conveyor's documented pytest plugin
(`conveyor_test`); tests/e2e/test_testing_plugin.py runs them with pytest in a
subprocess, as a user's CI would."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest

from conveyor import Retry, StepContext, Workflow

onboarding = Workflow("onboarding")


@onboarding.step()
def welcome(ctx: StepContext) -> str:
    return f"welcome {ctx.input['user']}"


# Three days before the reminder, then seven days for a person's approval.
onboarding.sleep("three_days", depends_on=["welcome"], duration=timedelta(days=3))
onboarding.wait(
    "approval",
    event="approved",
    depends_on=["three_days"],
    key=lambda ctx, **_: ctx.input["user"],
    timeout=timedelta(days=7),
    on_timeout={"approved": False},
)

CALLS: list[str] = []


@onboarding.step(depends_on=["approval"], retry=Retry(max_attempts=3, backoff=3600.0, jitter=False))
def activate(ctx: StepContext, approval: dict[str, Any]) -> str:
    CALLS.append(ctx.input["user"])
    if len(CALLS) == 1:
        raise ConnectionError("the directory is down")  # retried in an hour
    return "active" if approval["approved"] else "expired"


@pytest.fixture(autouse=True)
def _fresh() -> None:
    CALLS.clear()


def test_a_three_day_sleep_a_seven_day_timeout_and_an_hour_of_backoff(conveyor_test: Any) -> None:
    began = time.monotonic()
    run = conveyor_test.run(onboarding, {"user": "ada"})
    took = time.monotonic() - began
    assert run.status == "succeeded", [(s.name, s.status, s.history) for s in run.steps.values()]
    assert run.steps["approval"].output == {"approved": False}  # 7 days, no approval
    assert run.steps["activate"].attempts == 2
    assert run.output == {"activate": "expired"}
    print(f"\nWALL {took:.2f}s")


def test_an_approval_sent_while_it_waits(conveyor_test: Any) -> None:
    run = conveyor_test.run(onboarding, {"user": "bob"}, advance_timers=False)
    assert run.status == "running"
    assert run.steps["three_days"].status == "waiting"
    conveyor_test.advance(timedelta(days=3))
    run = conveyor_test.result(run.execution_id)
    assert run.steps["three_days"].status == "succeeded"
    assert run.steps["approval"].status == "waiting"
    conveyor_test.send_event("approved", {"approved": True}, key="bob")
    run = conveyor_test.wait(run.execution_id)
    assert run.status == "succeeded"
    assert run.output == {"activate": "active"}


def test_a_step_overridden(conveyor_test: Any) -> None:
    conveyor_test.register(onboarding)
    conveyor_test.override_step("activate", lambda ctx, approval: "faked")
    run = conveyor_test.run("onboarding", {"user": "cy"})
    assert run.output == {"activate": "faked"}
    assert CALLS == []
    history = [(t.source, t.target) for t in run.steps["activate"].history]
    assert ("running", "succeeded") in history
