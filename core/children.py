"""Child workflows: a wait node that starts an execution of another workflow and waits
for its end (``wf.child``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from core.outcomes import WaitOutcome

if TYPE_CHECKING:
    from collections.abc import Mapping

    from core.waits import DefinitionOf, _End, _Execution
    from core.workflows import ChildWait, Step


def start_child(
    conn: Connection,
    execution: _Execution,
    step: Step,
    attempt: int,
    wait: ChildWait,
    known_outputs: Mapping[str, Any],
    outcome: WaitOutcome,
) -> _End | None:
    raise NotImplementedError("child workflows")


def wake_parents(conn: Connection, outcome: WaitOutcome, definition_of: DefinitionOf) -> None:
    """Executions in ``outcome.finished`` that are children wake their parent step."""
    return None
