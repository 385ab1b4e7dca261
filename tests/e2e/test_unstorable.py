"""What a step returns or raises that the database cannot store as it is: checked once
before anything is recorded, the same on both backends."""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import DatabaseError
from tests.e2e import workflows
from tests.e2e.conftest import running_worker, wait_for
from tests.helpers.state import step_row
from worker.app import ConveyorCelery
from worker.producer import enqueue

LIMIT = 1_000
REFUSED = "the output of step 'produce' cannot be stored: output_data is not JSON-serializable: "


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nul", REFUSED + "the string at $ holds a NUL character (\\u0000), which JSONB refuses"),
        ("set", REFUSED + "$ is of type set, which JSON has no form for"),
        ("nan", REFUSED + "nan at $ (JSON has no NaN or Infinity)"),
        (
            "oversize",
            "the output of step 'produce' cannot be stored: output_data is 2002 bytes of JSON; "
            f"the limit is {LIMIT} (CONVEYOR_MAX_PAYLOAD_BYTES)",
        ),
    ],
)
def test_an_output_that_cannot_be_stored_fails_its_step_at_once(
    conveyor_app: ConveyorCelery, kind: str, message: str
) -> None:
    engine = conveyor_app.engine
    engine.settings = engine.settings.model_copy(update={"max_payload_bytes": LIMIT})
    execution_id = enqueue("unstorable", {"kind": kind, "size": 2 * LIMIT}, app=conveyor_app)
    with running_worker(conveyor_app):
        # Well under the stall timeout and one crash recovery: at once, not recovered.
        execution = wait_for(execution_id, timeout=10)
    assert execution.status == "failed"
    produced = step_row(execution_id, "produce")
    assert (produced["status"], produced["attempt"], produced["recoveries"]) == ("failed", 1, 0)
    assert produced["output_data"] is None
    assert produced["error"]["type"] == "OutputNotStorable"
    assert produced["error"]["message"] == message
    assert step_row(execution_id, "consume")["status"] == "skipped"
    # Its Retry allows 3 attempts: the same value would be refused again, so none ran.
    assert workflows.CALLS[(execution_id, "produce")] == 1


def test_an_error_message_holding_nul_is_stored_with_the_nul_escaped(
    worker: ConveyorCelery,
) -> None:
    execution_id = enqueue("nul_error", None, app=worker)
    execution = wait_for(execution_id, timeout=10)
    assert execution.status == "failed"
    row = step_row(execution_id, "complain")
    assert (row["status"], row["attempt"], row["recoveries"]) == ("failed", 1, 0)
    error: dict[str, Any] = row["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "bad byte \\x00 in the record"
    assert "ValueError: bad byte \\x00 in the record" in error["traceback"]
    assert workflows.CALLS[(execution_id, "complain")] == 1


def test_an_error_message_past_the_limit_is_stored_cut_with_a_marker(
    worker: ConveyorCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.engine.MESSAGE_LIMIT", 20)
    execution_id = enqueue("nul_error", None, app=worker)
    wait_for(execution_id, timeout=10)
    message = step_row(execution_id, "complain")["error"]["message"]
    assert message == "bad byte \\x00 in the[... 7 characters cut ...]"


def test_an_outcome_the_database_refuses_is_recorded_as_the_steps_failure(
    worker: ConveyorCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last resort: whatever the database refuses when a step's success is recorded
    (here an error raised by the recording transaction itself), the step ends failed,
    never left running for stall recovery to re-run."""
    from core import steps

    complete = steps.complete

    def refusing(conn: Any, step: Any, *args: Any, **kwargs: Any) -> Any:
        if step.step_name == "double":
            raise DatabaseError("database error: value refused")
        return complete(conn, step, *args, **kwargs)

    monkeypatch.setattr(steps, "complete", refusing)
    execution_id = enqueue("linear", {"start": 1}, app=worker)
    execution = wait_for(execution_id, timeout=10)
    assert execution.status == "failed"
    row = step_row(execution_id, "double")
    assert (row["status"], row["attempt"], row["recoveries"]) == ("failed", 1, 0)
    assert row["error"]["type"] == "OutputNotStorable"
    assert row["error"]["message"] == (
        "the output of step 'double' cannot be stored: the database refused it: "
        "database error: value refused"
    )
