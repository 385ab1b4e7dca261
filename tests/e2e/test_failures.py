"""Failures grouped (core.failures): failed steps counted by failure, whatever their ids
and numbers; a group retried or resolved in one action, each execution once however
often the action is sent."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import select, update

from conveyor.api.app import create_app as create_api
from core.accounts import Role
from core.database import get_db_session
from core.execution_state_manager import SyncExecutionStateManager
from core.executions import create_executions, execution_of
from core.failures import failure_groups, normalised
from core.models import StepExecution, WorkflowExecution
from core.workflows import Workflow
from tests.conftest import TestDatabase
from tests.e2e.conftest import running_worker, wait_for
from tests.helpers.api import client, serve, user_with_token
from tests.helpers.state import events, step_row
from worker.app import ConveyorCelery
from worker.producer import enqueue

KINDS = {
    "network": lambda n: ConnectionError(f"connect to 10.0.{n % 250}.{n % 7}:5432 failed"),
    "data": lambda n: ValueError(f"row {n} of order 'A-{n * 7}' is missing"),
    "slow": lambda n: TimeoutError(f"gave up after {n % 60}.5s at 2026-12-0{n % 9 + 1}T10:00:00Z"),
}


class Input(BaseModel):
    kind: str
    n: int


class Loaded(BaseModel):
    rows: int


def _io() -> Workflow:
    wf = Workflow("io", input_model=Input)

    @wf.step()
    def load(ctx: Any) -> Loaded:
        raise KINDS[ctx.input.kind](ctx.input.n)

    @wf.step(depends_on=["load"])
    def count(ctx: Any, load: dict[str, int]) -> int:
        return load["rows"]

    return wf


@pytest.fixture
def io(conveyor_app: ConveyorCelery) -> ConveyorCelery:
    conveyor_app.engine.registry.register(_io())
    return conveyor_app


def _bulk_failures(app: ConveyorCelery, kinds: dict[str, int], offset: int = 10_000) -> None:
    """Executions whose load failed, written as the engine writes a failure (status,
    error record, finish time), ``kinds[k]`` of each kind: fast, for large counts."""
    registry = app.engine.registry
    news = [
        execution_of(registry, "io", {"kind": k, "n": offset + i}, max_payload_bytes=1 << 20)
        for k, count in kinds.items()
        for i in range(count)
    ]
    manager = SyncExecutionStateManager()
    created: list[str] = []
    for start in range(0, len(news), 2000):
        batch = news[start : start + 2000]
        created += [c.execution_id for c in manager.run(create_executions, batch)]
    now = datetime.now(UTC)
    rows = [
        {"eid": eid, "err": {"type": type(e).__name__, "message": str(e)}}
        for eid, new in zip(created, news, strict=True)
        for e in [KINDS[new.input_data["kind"]](new.input_data["n"])]
    ]
    with get_db_session(commit=True) as db:
        for row in rows:
            db.execute(
                update(StepExecution)
                .where(StepExecution.execution_id == row["eid"], StepExecution.step_name == "load")
                .values(status="failed", error=row["err"], finished_at=now)
            )
        db.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.execution_id.in_(created))
            .values(status="failed", finished_at=now)
        )


def _groups(owner: str | None = None) -> dict[str, Any]:
    found = SyncExecutionStateManager().run(failure_groups, owner=owner)
    return {g.error_type: g for g in found}


def test_the_message_is_normalised_so_that_one_failure_is_one_group() -> None:
    assert normalised("connect to 10.0.0.7:5432 failed") == "connect to <ip> failed"
    assert normalised("row 1234 of order 'A-17' is missing") == "row <n> of order <str> is missing"
    assert (
        normalised("gave up after 30.5s at 2026-12-05T01:02:03Z") == "gave up after <n>s at <time>"
    )
    assert normalised("no user 01a243dc-550b-7a44-94ba-d7ec855930fe") == "no user <id>"
    assert normalised("object at 0x7f3a2b9c, hash deadbeef12") == "object at <hex>, hash <hex>"
    assert normalised("step3  failed\n -5 times") == "step3 failed <n> times"


def test_failures_of_three_kinds_make_three_groups_through_the_real_engine(
    io: ConveyorCelery, database: TestDatabase
) -> None:
    per_kind = {"network": 9, "data": 6, "slow": 3}
    with running_worker(io):
        ids = [
            enqueue("io", {"kind": kind, "n": random.randint(1, 10**6)}, app=io)
            for kind, count in per_kind.items()
            for _ in range(count)
        ]
        for execution_id in ids:
            assert wait_for(execution_id).status == "failed"
    groups = _groups()
    assert {t: g.count for t, g in groups.items()} == {
        "ConnectionError": 9,
        "ValueError": 6,
        "TimeoutError": 3,
    }
    network = groups["ConnectionError"]
    assert (network.workflow, network.step) == ("io", "load")
    assert network.message == "connect to <ip> failed"
    assert network.example_execution_id in ids
    assert network.first_seen is not None
    assert network.last_seen is not None
    assert network.first_seen <= network.last_seen


@pytest.mark.postgresql_only
def test_ten_thousand_failures_make_three_groups_and_a_group_is_retried_once(
    io: ConveyorCelery,
) -> None:
    _bulk_failures(io, {"network": 5000, "data": 3000, "slow": 2000})
    groups = _groups()
    assert {t: g.count for t, g in groups.items()} == {
        "ConnectionError": 5000,
        "ValueError": 3000,
        "TimeoutError": 2000,
    }
    slow = groups["TimeoutError"].group
    as_of = datetime.now(UTC)
    retried, calls = 0, 0
    while True:
        done = io.engine.retry_group(slow, as_of=as_of, limit=700)
        retried, calls = retried + done.applied, calls + 1
        if done.remaining == 0:
            break
    assert (retried, calls) == (2000, 3)
    # Sent again: nothing more, even for executions that failed again since.
    again = _groups()
    assert "TimeoutError" not in again
    assert io.engine.retry_group(slow, as_of=as_of, limit=700).applied == 0
    assert {t: g.count for t, g in again.items()} == {"ConnectionError": 5000, "ValueError": 3000}


def test_a_group_retried_twice_retries_each_execution_once_even_when_it_failed_again(
    io: ConveyorCelery,
) -> None:
    _bulk_failures(io, {"network": 30, "data": 10})
    group = _groups()["ConnectionError"].group
    as_of = datetime.now(UTC)
    first = io.engine.retry_group(group, as_of=as_of, limit=25)
    assert (first.applied, first.remaining) == (25, 5)
    second = io.engine.retry_group(group, as_of=as_of, limit=25)
    assert (second.applied, second.remaining) == (5, 0)
    # Every retried execution fails again, later than as_of: the same call again takes none.
    with get_db_session(commit=True) as db:
        db.execute(
            update(StepExecution)
            .where(StepExecution.step_name == "load", StepExecution.status == "pending")
            .values(
                status="failed",
                error={"type": "ConnectionError", "message": "connect to 10.9.9.9:5432 failed"},
                finished_at=datetime.now(UTC) + timedelta(seconds=1),
            )
        )
    assert _groups()["ConnectionError"].count == 30
    assert io.engine.retry_group(group, as_of=as_of, limit=25).applied == 0
    retried = Counter(
        eid
        for eid in SyncExecutionStateManager().run(_all_io)
        for e in events(eid)
        if e == (None, "failed", "pending")
    )
    assert sorted(Counter(retried.values()).items()) == [(1, 30)]


def _all_io(conn: Any) -> list[str]:
    return list(
        conn.execute(
            select(WorkflowExecution.execution_id).where(WorkflowExecution.workflow_id == "io")
        ).scalars()
    )


def test_the_api_lists_groups_and_acts_on_the_callers_own_executions(
    io: ConveyorCelery,
) -> None:
    ada_id, ada_token = user_with_token("ada@example.com")
    _, bob_token = user_with_token("bob@example.com")
    _, admin_token = user_with_token("root@example.com", Role.ADMIN)
    _bulk_failures(io, {"data": 4})
    with running_worker(io):
        mine = [
            enqueue("io", {"kind": "data", "n": n}, triggered_by=ada_id, app=io) for n in (1, 2)
        ]
        for execution_id in mine:
            wait_for(execution_id)
    with (
        serve(create_api(io)) as url,
        client(url, ada_token) as ada,
        client(url, bob_token) as bob,
        client(url, admin_token) as admin,
    ):
        (everyone,) = admin.get("/failures").json()
        assert everyone["count"] == 6
        (own,) = ada.get("/failures").json()
        assert own["count"] == 2
        assert bob.get("/failures").json() == []
        group = own["group"]
        members = ada.get(f"/failures/{group}").json()
        assert sorted(m["execution_id"] for m in members["items"]) == sorted(mine)
        # bob acts on nothing of ada's; ada resolves her own, checked first.
        assert bob.post(f"/failures/{group}/retry", json={}).json()["applied"] == 0
        bad = ada.post(f"/failures/{group}/resolve", json={"output": {"rows": "many"}})
        assert bad.status_code == 422
        assert [e["field"] for e in bad.json()["errors"]] == ["output.rows"]
        done = ada.post(f"/failures/{group}/resolve", json={"output": {"rows": 3}}).json()
        assert (done["applied"], done["remaining"]) == (2, 0)
        assert admin.get("/failures").json()[0]["count"] == 4
        scraped = admin.get("/metrics").text
        assert "conveyor_failure_groups 1.0" in scraped
    with running_worker(io):
        for execution_id in mine:
            assert wait_for(execution_id).output_data == {"count": 3}
    assert step_row(mine[0], "load")["status"] == "succeeded"


def test_the_reconciler_gives_every_failed_step_its_group(io: ConveyorCelery) -> None:
    _bulk_failures(io, {"slow": 3})
    io.engine.reconcile()
    with get_db_session() as db:
        groups = set(
            db.execute(
                select(StepExecution.error_group).where(StepExecution.status == "failed")
            ).scalars()
        )
    assert len(groups) == 1
    assert None not in groups
