"""Small deterministic cases reduced from the state machine (test_state_machine.py)."""

from __future__ import annotations

import json

from core import executions, steps
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.outcomes import Claim
from tests.conftest import TestDatabase
from tests.faults.test_state_machine import FAN


def _run_to_completion(manager: SyncEnhancedExecutionStateManager, claim: Claim) -> None:
    output = {"step": claim.step_name}
    done = manager.run(steps.complete, claim, output, json.dumps(output), FAN, None)
    assert done.transition.applied, done


def test_last_branch_of_a_failed_fan_out_finishes_the_execution(database: TestDatabase) -> None:
    """a -> b1, b2, b3 -> d: b1 fails for good (d is skipped) while b2 and b3 run. The
    completion of the last of them leaves no step open: it must finish the execution
    in its own transaction (one step boundary, one transaction), not leave it running
    until a reconciler pass notices."""
    manager = SyncEnhancedExecutionStateManager()
    new = executions.new_execution(
        FAN.workflow_id, {}, max_payload_bytes=1_000, steps=FAN.specs(max_attempts=1)
    )
    [created] = manager.run(executions.create_executions, [new])
    execution_id = created.execution_id
    manager.run(executions.admit, FAN.workflow_id, [execution_id], None)
    claim = manager.run(steps.claim, execution_id, "a", "w1", None, None, lambda _r: ())
    _run_to_completion(manager, claim)
    claims = {
        name: manager.run(steps.claim, execution_id, name, "w1", None, None, lambda _r: ("a",))
        for name in ("b1", "b2", "b3")
    }
    failure = manager.run(
        steps.fail_step, execution_id, "b1", 1, {"type": "Boom"}, FAN.descendants("b1"), FAN.sinks
    )
    assert failure.skipped == ["d"]
    assert failure.execution is None  # b2 and b3 are still running
    _run_to_completion(manager, claims["b2"])
    _run_to_completion(manager, claims["b3"])

    step_statuses = {s.step_name: s.status for s in manager.get_steps(execution_id)}
    assert step_statuses == {
        "a": "succeeded",
        "b1": "failed",
        "b2": "succeeded",
        "b3": "succeeded",
        "d": "skipped",
    }
    assert manager.get_execution(execution_id).status == "failed"
