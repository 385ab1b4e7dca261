"""A step refused by its key while the key's holder is ending is not forgotten.

The refused admission holds the key row's lock until its waiting row commits; the
holder's end takes the same lock before it looks for waiters, so it sees that row and
admits it. Here the refusal is left uncommitted while the holder completes in another
thread: the completion waits on the lock, then admits the waiter (a lost wake-up if it
looked for waiters first: nothing would ever admit it but the reconciler's sweep).
PostgreSQL only: SQLite's writers are serial.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import text

from core import steps, waits
from core.database import get_database
from core.executions import create_executions, execution_of
from core.registry import WorkflowRegistry
from core.workflows import Concurrency, StepContext, Workflow
from tests.conftest import TestDatabase

pytestmark = pytest.mark.postgresql_only

gated = Workflow("race-gated")


@gated.step(concurrency=Concurrency(key="race-key", limit=1))
def blocked(ctx: StepContext) -> str:
    return "done"


REGISTRY = WorkflowRegistry([gated])


def definition_of(name: str, version: int) -> Workflow | None:
    return gated if name == gated.name else None


def test_a_waiter_refused_while_the_holder_ends_is_admitted_by_that_end(
    database: TestDatabase,
) -> None:
    db = get_database()
    news = [
        execution_of(REGISTRY, gated.name, {}, max_payload_bytes=db.settings.max_payload_bytes)
        for _ in range(2)
    ]
    with db.engine.begin() as conn:
        holder, waiter = (c.execution_id for c in create_executions(conn, news))
    with db.engine.begin() as conn:
        _admission, armed = waits.admit(conn, gated, [holder], definition_of)
    assert armed.queued == [(holder, "blocked")]
    with db.engine.begin() as conn:
        claim = steps.claim(conn, holder, "blocked", "racer", None, (), lambda _r: ())
    assert claim is not None

    ended: dict[str, Any] = {}

    def complete_holder() -> None:
        with db.engine.begin() as conn:
            ended["completion"] = steps.complete(
                conn, claim, "done", '"done"', gated, definition_of=definition_of
            )

    ending = threading.Thread(target=complete_holder)
    with db.engine.connect() as refusing:
        refusing_tx = refusing.begin()
        _, refused = waits.admit(refusing, gated, [waiter], definition_of)
        # Refused, its waiting row and the key's lock held, uncommitted.
        assert refused.limited == [(gated.name, "race-key", "concurrency")]
        ending.start()
        # The end waits for the key's lock, which the refusal holds until it commits
        # (with the waiters probed before the lock, it would end without waiting).
        blocked = _waits_on_a_lock(db.engine, ending)
        refusing_tx.commit()
    ending.join(timeout=10)
    assert blocked
    assert not ending.is_alive()
    woken = ended["completion"].woken
    assert woken is not None
    assert (waiter, "blocked") in woken.queued


def _waits_on_a_lock(engine: Any, ending: threading.Thread) -> bool:
    """Whether another session comes to wait on a lock while ``ending`` runs (False as
    soon as ``ending`` ends without having waited)."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + 10
    with engine.connect() as watcher:
        while ending.is_alive() and time.monotonic() < deadline:
            if watcher.execute(query).scalar_one():
                return True
            watcher.rollback()
            time.sleep(0.01)
    return False
