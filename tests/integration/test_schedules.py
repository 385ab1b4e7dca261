"""Firing schedules against a real database: each tick enqueued once, whatever overlaps.

Passes are ``worker.schedules.fire_schedules`` with the clock given (``now``), on an app
with Kombu's in-memory broker: publishing works and goes nowhere, nothing runs steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import Connection, select
from typer.testing import CliRunner, Result

from conveyor.cli.main import CliState
from conveyor.cli.main import app as cli
from core import accounts, schedule_state, schedules
from core.config import Settings
from core.database import get_db_session
from core.errors import ReservedIdempotencyKey
from core.execution_state_manager import ExecutionStateManager, SyncExecutionStateManager
from core.executions import NewExecution, create_execution
from core.models import WorkflowExecution, WorkflowSchedule
from core.outcomes import CreatedExecution
from core.registry import WorkflowRegistry
from core.schedule_state import ScheduleState
from core.schedules import Schedule
from core.workflows import StepContext, Workflow
from tests.conftest import TestDatabase
from worker import schedules as worker_schedules
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue, enqueue_many
from worker.schedules import Fired, fire_schedules

T0 = datetime(2026, 11, 25, 10, 0, 30, tzinfo=UTC)
FIVE = timedelta(minutes=5)


class Scope(BaseModel):
    scope: str


report = Workflow(
    "report",
    input_model=Scope,
    schedules=[
        Schedule(every=FIVE, input={"scope": "recent"}, name="recent"),
        Schedule(cron="0 3 * * *", input={"scope": "all"}, timezone="Europe/Paris"),
    ],
)


@report.step()
def build(ctx: StepContext) -> str:
    return str(ctx.input.scope)


@pytest.fixture
def app(database: TestDatabase) -> ConveyorCelery:
    """An app on the test database and the in-memory broker, with ``report`` registered."""
    settings = Settings(
        database_url=database.url,
        broker_url="memory://localhost/",
        db_retry_initial_wait=0.01,
        db_retry_max_wait=0.2,
    )
    return create_app(settings, WorkflowRegistry([report]))


def executions() -> list[tuple[str | None, Any]]:
    """(idempotency key, input) of every execution, by key."""
    with get_db_session() as db:
        rows = db.execute(
            select(WorkflowExecution.idempotency_key, WorkflowExecution.input_data).order_by(
                WorkflowExecution.idempotency_key
            )
        ).all()
    return [(row.idempotency_key, row.input_data) for row in rows]


def row(name: str = "recent") -> WorkflowSchedule:
    """The schedule's row, read in a fresh session."""
    with get_db_session() as db:
        found = db.get(WorkflowSchedule, ("report", name))
        assert found is not None
        return found


def key(tick: datetime, name: str = "recent") -> str:
    return f"schedule:report:{name}:{tick.strftime('%Y-%m-%dT%H:%M:%SZ')}"


def in_transaction(work: Callable[[Connection], Any]) -> Any:
    return SyncExecutionStateManager().run(work)


def pause(name: str, paused: bool, now: datetime) -> ScheduleState | None:
    found = schedules.find(WorkflowRegistry([report]), "report", name)
    return in_transaction(lambda c: schedule_state.set_paused(c, found, paused, now))  # type: ignore[no-any-return]


def recent(fired: list[Fired]) -> list[Fired]:
    return [f for f in fired if f.schedule == "recent"]


def test_a_new_schedule_starts_at_its_next_tick_and_each_tick_runs_once(
    app: ConveyorCelery,
) -> None:
    assert fire_schedules(app, now=T0) == []
    assert executions() == []
    assert row().next_tick_at == datetime(2026, 11, 25, 10, 5, tzinfo=UTC)
    # 03:00 in Paris is 02:00 UTC in November.
    assert row("0 3 * * *").next_tick_at == datetime(2026, 11, 26, 2, tzinfo=UTC)

    assert fire_schedules(app, now=T0 + timedelta(minutes=4)) == []
    tick = datetime(2026, 11, 25, 10, 5, tzinfo=UTC)
    [fired] = fire_schedules(app, now=tick + timedelta(seconds=2))
    assert (fired.schedule, fired.tick, fired.advanced) == ("recent", tick, True)
    assert executions() == [(key(tick), {"scope": "recent"})]
    assert fire_schedules(app, now=tick + timedelta(seconds=3)) == []
    state = row()
    assert (state.last_tick_at, state.next_tick_at) == (tick, tick + FIVE)
    assert state.last_execution_id == fired.execution_id

    [again] = fire_schedules(app, now=tick + FIVE)
    assert again.tick == tick + FIVE
    assert [k for k, _ in executions()] == [key(tick), key(tick + FIVE)]


def test_two_passes_that_both_find_a_tick_due_enqueue_it_once(
    app: ConveyorCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    fire_schedules(app, now=T0)
    # Both passes read the row and find the tick due before either enqueues: the
    # barrier in front of enqueue holds the first until the second gets there.
    barrier = threading.Barrier(2, timeout=30)
    real_enqueue = worker_schedules.enqueue

    def enqueue_together(*args: Any, **kwargs: Any) -> str:
        barrier.wait()
        return real_enqueue(*args, **kwargs)

    monkeypatch.setattr(worker_schedules, "enqueue", enqueue_together)
    tick = datetime(2026, 11, 25, 10, 5, tzinfo=UTC)
    results: list[list[Fired]] = []
    errors: list[BaseException] = []

    def one_pass() -> None:
        try:
            results.append(fire_schedules(app, now=tick + timedelta(seconds=1)))
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=one_pass) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert executions() == [(key(tick), {"scope": "recent"})]
    fired = [f for result in results for f in result]
    assert len(fired) == 2
    assert {f.execution_id for f in fired} == {row().last_execution_id}
    # One compare-and-set moved the row; the other found it already moved.
    assert sorted(f.advanced for f in fired) == [False, True]
    assert row().next_tick_at == tick + FIVE


def test_concurrent_passes_over_many_ticks_enqueue_each_tick_once(app: ConveyorCelery) -> None:
    fire_schedules(app, now=T0)
    first = datetime(2026, 11, 25, 10, 5, tzinfo=UTC)
    ticks = [first + n * FIVE for n in range(6)]
    errors: list[BaseException] = []
    for tick in ticks:
        barrier = threading.Barrier(4, timeout=30)

        def one_pass(moment: datetime = tick, start: threading.Barrier = barrier) -> None:
            try:
                start.wait()
                fire_schedules(app, now=moment)
            except BaseException as error:  # reported below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=one_pass) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert errors == []
    assert [k for k, _ in executions()] == [key(tick) for tick in ticks]


def test_a_pass_that_dies_between_enqueue_and_advance_is_finished_by_the_next(
    app: ConveyorCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    fire_schedules(app, now=T0)
    tick = datetime(2026, 11, 25, 10, 5, tzinfo=UTC)

    class BeatKilled(BaseException):
        """The process running the pass died (a restarted beat's worker, a SIGKILL)."""

    def die(*_: Any, **__: Any) -> bool:
        raise BeatKilled

    monkeypatch.setattr(schedule_state, "advance", die)
    with pytest.raises(BeatKilled):
        fire_schedules(app, now=tick + timedelta(seconds=1))
    [(first_key, _)] = executions()
    assert first_key == key(tick)
    assert row().next_tick_at == tick  # not moved: the tick is still due
    monkeypatch.undo()

    [fired] = fire_schedules(app, now=tick + timedelta(seconds=5))
    assert fired.tick == tick
    assert fired.advanced
    assert [k for k, _ in executions()] == [key(tick)]
    assert row().next_tick_at == tick + FIVE


def test_after_a_long_downtime_only_the_latest_missed_tick_runs_once(
    app: ConveyorCelery,
) -> None:
    fire_schedules(app, now=T0)
    # Beat was down for three days: 864 five-minute ticks and three 03:00 ticks missed.
    back = T0 + timedelta(days=3, minutes=12)
    fired = fire_schedules(app, now=back)
    latest_recent = datetime(2026, 11, 28, 10, 10, tzinfo=UTC)
    latest_nightly = datetime(2026, 11, 28, 2, tzinfo=UTC)
    assert sorted((f.schedule, f.tick) for f in fired) == [
        ("0 3 * * *", latest_nightly),
        ("recent", latest_recent),
    ]
    assert [k for k, _ in executions()] == [
        key(latest_nightly, "0 3 * * *"),
        key(latest_recent),
    ]
    assert fire_schedules(app, now=back + timedelta(seconds=30)) == []
    assert row().next_tick_at == latest_recent + FIVE
    assert row("0 3 * * *").next_tick_at == latest_nightly + timedelta(days=1)


def test_a_paused_schedule_enqueues_nothing_and_resumes_at_its_next_tick(
    app: ConveyorCelery,
) -> None:
    fire_schedules(app, now=T0)
    assert pause("recent", True, T0) is not None
    assert pause("recent", True, T0) is None  # already paused
    for minutes in (5, 10, 60, 600):
        assert recent(fire_schedules(app, now=T0 + timedelta(minutes=minutes))) == []
    assert [k for k, _ in executions() if k and ":recent:" in k] == []

    resumed_at = T0 + timedelta(minutes=601)  # 20:01:30
    resumed = pause("recent", False, resumed_at)
    assert resumed is not None
    assert resumed.next_tick_at == datetime(2026, 11, 25, 20, 5, tzinfo=UTC)
    # The ticks missed while paused are no backlog: nothing runs before the next tick.
    assert recent(fire_schedules(app, now=resumed_at)) == []
    [fired] = recent(fire_schedules(app, now=datetime(2026, 11, 25, 20, 5, tzinfo=UTC)))
    assert fired.tick == datetime(2026, 11, 25, 20, 5, tzinfo=UTC)
    assert [k for k, _ in executions() if k and ":recent:" in k] == [key(fired.tick)]


def test_a_schedule_can_be_paused_before_any_pass_has_seen_it(app: ConveyorCelery) -> None:
    assert pause("recent", True, T0) is not None
    assert recent(fire_schedules(app, now=T0 + timedelta(hours=1))) == []
    assert row().paused


def test_a_changed_spec_moves_the_row_to_the_new_timing(app: ConveyorCelery) -> None:
    fire_schedules(app, now=T0)
    hourly = Workflow(
        "report",
        input_model=Scope,
        schedules=[Schedule(every=timedelta(hours=1), input={"scope": "recent"}, name="recent")],
    )
    hourly.add_step(report.steps["build"])
    app.engine.registry = WorkflowRegistry([hourly])
    # At 10:05 the old five-minute tick would be due; the new spec's first is 11:00.
    assert fire_schedules(app, now=T0 + timedelta(minutes=5)) == []
    assert row().spec == "every 3600s"
    assert row().next_tick_at == datetime(2026, 11, 25, 11, tzinfo=UTC)
    [fired] = fire_schedules(app, now=datetime(2026, 11, 25, 11, tzinfo=UTC))
    assert fired.tick == datetime(2026, 11, 25, 11, tzinfo=UTC)


def test_without_a_clock_given_a_pass_uses_the_databases(app: ConveyorCelery) -> None:
    before = datetime.now(UTC)
    fire_schedules(app)
    next_tick = row().next_tick_at
    assert next_tick is not None
    assert before - timedelta(minutes=1) < next_tick <= before + FIVE + timedelta(minutes=1)


# --- the command line ----------------------------------------------------------------


def invoke(app: ConveyorCelery, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), obj=CliState(celery_app=app), catch_exceptions=False)


def test_cli_lists_pauses_and_resumes_schedules(app: ConveyorCelery) -> None:
    listed = invoke(app, "schedules")
    assert listed.exit_code == 0, listed.output
    lines = {line.split()[1]: line for line in listed.stdout.splitlines() if "report" in line}
    assert set(lines) == {"recent", "0"}
    assert "every 5m" in lines["recent"]
    assert "Europe/Paris" in lines["0"]
    assert "CET" in lines["0"]  # the next run, in the schedule's time zone
    assert lines["recent"].rstrip().endswith("no")

    paused = invoke(app, "schedules", "pause", "report", "recent")
    assert paused.exit_code == 0, paused.output
    assert "Paused the schedule 'recent' of 'report'." in paused.stdout
    assert row().paused
    again = invoke(app, "schedules", "pause", "report", "recent")
    assert "already paused" in again.stdout
    listed = invoke(app, "schedules")
    [line] = [line for line in listed.stdout.splitlines() if " recent " in line]
    assert "paused" in line
    assert line.rstrip().endswith("yes")

    resumed = invoke(app, "schedules", "resume", "report", "recent")
    assert resumed.exit_code == 0, resumed.output
    assert "Resumed the schedule 'recent' of 'report'; next run" in resumed.stdout
    assert not row().paused


def test_cli_names_an_unknown_schedule_or_workflow(app: ConveyorCelery) -> None:
    unknown = invoke(app, "schedules", "pause", "report", "nightly")
    assert unknown.exit_code == 1
    assert "workflow 'report' has no schedule named 'nightly'" in unknown.stderr
    assert "its schedules: recent, 0 3 * * *" in unknown.stderr
    missing = invoke(app, "schedules", "resume", "nope", "recent")
    assert missing.exit_code == 1
    assert "no workflow 'nope'" in missing.stderr


def test_cli_says_when_no_workflow_has_a_schedule(database: TestDatabase) -> None:
    plain = Workflow("plain")
    plain.add_step(report.steps["build"])
    app = create_app(
        Settings(database_url=database.url, broker_url="memory://localhost/"),
        WorkflowRegistry([plain]),
    )
    listed = invoke(app, "schedules")
    assert listed.exit_code == 0
    assert "No schedules" in listed.stdout


# --- ticks' keys belong to schedules ---------------------------------------------------


def plant(tick_key_: str, input_data: Any, triggered_by: str | None) -> str:
    """An execution of ``report`` holding a tick's key in the producers' scope, written
    as rows from before keys were scoped and ``schedule:`` reserved could be (directly,
    past the producers' checks). Its id."""
    new = NewExecution("report", input_data, idempotency_key=tick_key_, triggered_by=triggered_by)
    created: CreatedExecution = in_transaction(lambda c: create_execution(c, new))
    return created.execution_id


def test_a_tick_whose_key_a_users_execution_holds_still_runs_once(
    app: ConveyorCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    fire_schedules(app, now=T0)
    tick = datetime(2026, 11, 25, 10, 5, tzinfo=UTC)
    with get_db_session(commit=True) as db:
        mallory = accounts.create_user(db, "mallory@example.com").id
    # The member's execution, with the tick's own input: before this change the pass
    # took it for the tick, advanced the row and never ran the tick.
    planted = plant(key(tick), {"scope": "recent"}, mallory)

    class BeatKilled(BaseException):
        """The process running the pass died between the enqueue and the advance."""

    def die(*_: Any, **__: Any) -> bool:
        raise BeatKilled

    monkeypatch.setattr(schedule_state, "advance", die)
    with pytest.raises(BeatKilled):
        fire_schedules(app, now=tick + timedelta(seconds=1))
    monkeypatch.undo()
    [fired] = fire_schedules(app, now=tick + timedelta(seconds=2))
    assert (fired.tick, fired.advanced) == (tick, True)
    assert fired.execution_id != planted
    assert row().last_execution_id == fired.execution_id
    # Both passes enqueued under the same key derived from the holder: one execution.
    assert executions() == [
        (key(tick), {"scope": "recent"}),
        (f"{key(tick)}#{planted}", {"scope": "recent"}),
    ]
    ran = SyncExecutionStateManager().get_execution(fired.execution_id)
    assert (ran.workflow_id, ran.triggered_by, ran.idempotency_scope) == ("report", None, "")


def test_a_tick_whose_key_another_workflows_execution_holds_still_runs(
    app: ConveyorCelery,
) -> None:
    fire_schedules(app, now=T0)
    tick = datetime(2026, 11, 25, 10, 5, tzinfo=UTC)
    other = NewExecution("ingest", {"scope": "recent"}, idempotency_key=key(tick))
    planted: CreatedExecution = in_transaction(lambda c: create_execution(c, other))
    [fired] = fire_schedules(app, now=tick + timedelta(seconds=1))
    assert fired.execution_id != planted.execution_id
    assert SyncExecutionStateManager().get_execution(fired.execution_id).workflow_id == "report"


def test_a_tick_fired_before_with_an_earlier_deploys_input_counts_as_fired(
    app: ConveyorCelery,
) -> None:
    fire_schedules(app, now=T0)
    tick = datetime(2026, 11, 25, 10, 5, tzinfo=UTC)
    earlier = plant(key(tick), {"scope": "older"}, None)
    [fired] = fire_schedules(app, now=tick + timedelta(seconds=1))
    assert (fired.execution_id, fired.advanced) == (earlier, True)
    assert row().last_execution_id == earlier
    assert executions() == [(key(tick), {"scope": "older"})]


@pytest.mark.asyncio
async def test_every_producer_but_the_schedules_refuses_a_schedule_key(
    app: ConveyorCelery,
) -> None:
    tick_key_ = key(datetime(2026, 11, 25, 10, 5, tzinfo=UTC))
    reserved = r"begins with 'schedule:', a prefix reserved to the keys of schedules' ticks"
    with pytest.raises(ReservedIdempotencyKey, match=reserved) as refused:
        enqueue("report", {"scope": "recent"}, idempotency_key=tick_key_, app=app)
    assert refused.value.errors == [{"field": "idempotency_key", "message": str(refused.value)}]
    with pytest.raises(ReservedIdempotencyKey, match=reserved):
        enqueue_many("report", [{"scope": "a"}], idempotency_keys=["schedule:x"], app=app)
    with pytest.raises(ReservedIdempotencyKey, match=reserved):
        SyncExecutionStateManager().create_execution("report", {}, idempotency_key=tick_key_)
    with pytest.raises(ReservedIdempotencyKey, match=reserved):
        await ExecutionStateManager().create_execution("report", {}, idempotency_key=tick_key_)
    with pytest.raises(ReservedIdempotencyKey, match=reserved), get_db_session(commit=True) as db:
        db.add(WorkflowExecution(workflow_id="report", input_data={}, idempotency_key=tick_key_))
    assert executions() == []
