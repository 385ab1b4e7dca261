"""A Celery task ends as the step it ran did: FAILURE for a failed step, RETRY for one to be
retried (continued steps included), and its message is acknowledged either way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.signals import task_failure, task_retry, task_success

from tests.e2e.conftest import wait_for
from tests.helpers.state import events
from worker.app import ConveyorCelery
from worker.producer import enqueue


@pytest.fixture
def ended() -> Iterator[list[tuple[str, str, str]]]:
    """(state, execution id, what Celery was told) of each task that ended, as it ends."""
    seen: list[tuple[str, str, str]] = []

    def failed(exception: BaseException, kwargs: dict[str, Any], **_: Any) -> None:
        seen.append(("FAILURE", kwargs.get("execution_id", ""), repr(exception)))

    def retried(request: Any, reason: Any, **_: Any) -> None:
        seen.append(("RETRY", request.kwargs.get("execution_id", ""), repr(reason.exc)))

    def succeeded(sender: Any, **_: Any) -> None:
        seen.append(("SUCCESS", sender.request.kwargs.get("execution_id", ""), ""))

    task_failure.connect(failed, weak=False)
    task_retry.connect(retried, weak=False)
    task_success.connect(succeeded, weak=False)
    try:
        yield seen
    finally:
        task_failure.disconnect(failed)
        task_retry.disconnect(retried)
        task_success.disconnect(succeeded)


def _ended_for(
    seen: list[tuple[str, str, str]], execution_id: str, count: int
) -> list[tuple[str, str]]:
    """The states of the execution's tasks once ``count`` ended (signals come just after
    the outcome is committed)."""
    deadline = time.monotonic() + 30
    while True:
        mine = [(state, told) for state, e, told in list(seen) if e == execution_id]
        if len(mine) >= count or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


def test_a_continued_step_that_fails_fails_the_task_that_ran_it(
    worker: ConveyorCelery, ended: list[tuple[str, str, str]], redis_url: str
) -> None:
    broken = enqueue("broken", None, app=worker)
    assert wait_for(broken).status == "failed"
    # Step fine ran in the start message's task, and explode was continued there.
    [(state, told)] = _ended_for(ended, broken, 1)
    assert state == "FAILURE"
    assert f"step explode of execution {broken}" in told
    assert "ValueError: the data is bad" in told
    # Recorded once, and the message acknowledged (just after the signal): nothing is
    # left for the broker to redeliver.
    failures = sorted((step or "", to) for step, _, to in events(broken) if to == "failed")
    assert failures == [("", "failed"), ("explode", "failed")]
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 10
    while client.hlen("unacked"):
        assert time.monotonic() < deadline, "the failed task's message was never acknowledged"
        time.sleep(0.05)
    client.close()


def test_a_step_to_be_retried_shows_its_task_as_retried(
    worker: ConveyorCelery, ended: list[tuple[str, str, str]]
) -> None:
    flaky = enqueue("flaky", None, app=worker)
    assert wait_for(flaky).status == "succeeded"
    states = _ended_for(ended, flaky, 3)
    assert [state for state, _ in states] == ["RETRY", "RETRY", "SUCCESS"]
    assert "will retry, attempt 2/3" in states[0][1]
    assert "will retry, attempt 3/3" in states[1][1]
