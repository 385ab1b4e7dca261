"""A completion continues and holds only the released steps its worker may run (``here``:
those of a queue it consumes); the others stay queued for their own queue's workers."""

from __future__ import annotations

import pytest

from core import steps
from core.enhanced_execution_state_manager import GivenDag, SyncEnhancedExecutionStateManager
from core.executions import StepSpec
from tests.conftest import TestDatabase
from tests.helpers.state import insert_execution, step_row

# root -> a1, a2 (a queue this worker consumes), b1, b2 (one it does not).
FAN = ("a1", "a2", "b1", "b2")
DAG = GivenDag("root", FAN, FAN, dict.fromkeys(FAN, ("root",)))


def _completed(here: list[str] | None, hold: float | None) -> steps.Completion:
    manager = SyncEnhancedExecutionStateManager()
    specs = [StepSpec("root"), *(StepSpec(name, unmet_deps=1) for name in FAN)]
    execution_id = insert_execution("w", {}, steps=specs)
    manager.transition_execution(execution_id, "running")
    manager.transition_steps(execution_id, ["root"], "queued")
    claim = manager.run(steps.claim, execution_id, "root", "w1", None, (), lambda _route: ())
    assert claim is not None
    return manager.run(steps.complete, claim, 1, "1", DAG, "w1", hold=hold, here=here)


@pytest.mark.parametrize("hold", [None, 30.0])
def test_only_a_step_of_a_consumed_queue_is_continued_or_held(
    database: TestDatabase, hold: float | None
) -> None:
    completion = _completed(["a1", "a2"], hold)
    assert completion.continued is not None
    assert completion.continued.step_name == "a1"
    assert step_row(completion.transition.execution_id, "a1")["worker"] == "w1"
    if hold is None:
        assert sorted(completion.queued) == ["a2", "b1", "b2"]
        assert completion.held == ()
    else:
        assert sorted(completion.queued) == ["b1", "b2"]
        assert completion.held == ("a2",)
    for name in ("b1", "b2"):  # due now: their messages go to their queue
        row = step_row(completion.transition.execution_id, name)
        assert (row["status"], row["next_attempt_at"], row["worker"]) == ("queued", None, None)


def test_nothing_continues_when_no_released_step_is_of_a_consumed_queue(
    database: TestDatabase,
) -> None:
    completion = _completed([], 30.0)
    assert completion.continued is None
    assert completion.held == ()
    assert sorted(completion.queued) == list(FAN)


def test_without_a_restriction_the_first_released_step_continues(
    database: TestDatabase,
) -> None:
    completion = _completed(None, None)
    assert completion.continued is not None
    assert completion.continued.step_name == "a1"
    assert sorted(completion.queued) == ["a2", "b1", "b2"]
