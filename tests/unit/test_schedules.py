"""Schedule definitions and their ticks: cron in a time zone (DST included), intervals, keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from core.errors import DefinitionError, InputValidationError
from core.registry import WorkflowRegistry
from core.schedule_state import ScheduleState, due_ticks
from core.schedules import Declared, Schedule, declared, tick_key
from core.workflows import StepContext, Workflow

PARIS = "Europe/Paris"


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


class Report(BaseModel):
    scope: str


def workflow(name: str = "report", **options: object) -> Workflow:
    flow = Workflow(name, input_model=Report, **options)  # type: ignore[arg-type]

    @flow.step()
    def only(ctx: StepContext) -> int:
        return 1

    return flow


# --- every -------------------------------------------------------------------------


def test_every_ticks_at_multiples_of_the_interval_since_the_epoch() -> None:
    five = Schedule(every=timedelta(minutes=5))
    assert five.latest_at(utc(2026, 11, 25, 10, 7, 30)) == utc(2026, 11, 25, 10, 5)
    assert five.next_after(utc(2026, 11, 25, 10, 7, 30)) == utc(2026, 11, 25, 10, 10)


def test_a_moment_on_a_tick_is_that_tick_and_the_next_is_one_interval_later() -> None:
    five = Schedule(every=timedelta(minutes=5))
    on_tick = utc(2026, 11, 25, 10, 5)
    assert five.latest_at(on_tick) == on_tick
    assert five.next_after(on_tick) == utc(2026, 11, 25, 10, 10)
    assert five.latest_at(on_tick - timedelta(microseconds=1)) == utc(2026, 11, 25, 10, 0)


def test_every_ignores_dst_it_counts_real_time() -> None:
    hourly = Schedule(every=timedelta(hours=1))
    # Paris falls back on 2026-10-25 at 01:00 UTC; an interval does not notice.
    before = utc(2026, 10, 25, 0, 30)
    assert hourly.next_after(before) == utc(2026, 10, 25, 1)
    assert hourly.next_after(utc(2026, 10, 25, 1)) == utc(2026, 10, 25, 2)


# --- cron --------------------------------------------------------------------------


def test_cron_in_utc() -> None:
    nightly = Schedule(cron="0 3 * * *")
    assert nightly.next_after(utc(2026, 11, 25, 3)) == utc(2026, 11, 26, 3)
    assert nightly.latest_at(utc(2026, 11, 25, 3)) == utc(2026, 11, 25, 3)
    assert nightly.latest_at(utc(2026, 11, 25, 2, 59, 59)) == utc(2026, 11, 24, 3)


def test_cron_reads_its_fields_in_its_time_zone() -> None:
    nightly = Schedule(cron="0 3 * * *", timezone=PARIS)
    # 03:00 in Paris is 02:00 UTC in winter (CET) and 01:00 UTC in summer (CEST).
    assert nightly.next_after(utc(2026, 11, 25, 12)) == utc(2026, 11, 26, 2)
    assert nightly.next_after(utc(2026, 7, 1, 12)) == utc(2026, 7, 2, 1)


def test_cron_across_the_spring_change_in_paris_runs_the_skipped_time_when_the_clock_jumps() -> (
    None
):
    # On 2026-03-29 Paris jumps from 02:00 CET to 03:00 CEST: 02:30 does not exist.
    half_past_two = Schedule(cron="30 2 * * *", timezone=PARIS)
    ticks = [utc(2026, 3, 27, 12)]
    for _ in range(3):
        after = half_past_two.next_after(ticks[-1])
        assert after is not None
        ticks.append(after)
    assert ticks[1:] == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # the skipped 02:30 runs at 03:00 CEST, when the clock jumps
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]
    # A day on the spring change is 23 hours: "0 3" ticks 23 hours apart across it.
    three = Schedule(cron="0 3 * * *", timezone=PARIS)
    first = three.next_after(utc(2026, 3, 28, 12))
    assert first == utc(2026, 3, 29, 1)
    assert three.latest_at(first - timedelta(seconds=1)) == utc(2026, 3, 28, 2)


def test_cron_across_the_autumn_change_in_paris_runs_a_repeated_time_once() -> None:
    # On 2026-10-25 Paris goes back from 03:00 CEST to 02:00 CET: 02:30 happens twice,
    # at 00:30 and 01:30 UTC. It runs at the first only.
    half_past_two = Schedule(cron="30 2 * * *", timezone=PARIS)
    assert half_past_two.next_after(utc(2026, 10, 24, 12)) == utc(2026, 10, 25, 0, 30)
    assert half_past_two.next_after(utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 26, 1, 30)
    # From inside the repeated hour (02:15 CET, the second time round) the next tick
    # is the next day's, not the 02:30 of the first pass, which is in the past.
    assert half_past_two.next_after(utc(2026, 10, 25, 1, 15)) == utc(2026, 10, 26, 1, 30)
    assert half_past_two.latest_at(utc(2026, 10, 25, 1, 45)) == utc(2026, 10, 25, 0, 30)
    # A schedule finer than hourly keeps real time through the change.
    every_half_hour = Schedule(cron="*/30 * * * *", timezone=PARIS)
    start = utc(2026, 10, 25, 0, 15)
    ticks = []
    for _ in range(4):
        after = every_half_hour.next_after(ticks[-1] if ticks else start)
        assert after is not None
        ticks.append(after)
    assert ticks == [
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 25, 1, 0),
        utc(2026, 10, 25, 1, 30),
        utc(2026, 10, 25, 2, 0),
    ]


def test_cron_with_seconds_first() -> None:
    quarter = Schedule(cron="*/15 * * * * *")
    assert quarter.next_after(utc(2026, 1, 1, 0, 0, 1)) == utc(2026, 1, 1, 0, 0, 15)
    assert quarter.latest_at(utc(2026, 1, 1, 0, 0, 14, 999_999)) == utc(2026, 1, 1)


def test_ticks_refuse_naive_datetimes() -> None:
    with pytest.raises(InputValidationError, match="naive"):
        Schedule(cron="* * * * *").next_after(datetime(2026, 1, 1))  # noqa: DTZ001


# --- keys and names ------------------------------------------------------------------


def test_the_idempotency_key_names_the_workflow_the_schedule_and_the_utc_tick() -> None:
    nightly = Schedule(cron="0 3 * * *", timezone=PARIS)
    tick = datetime(2026, 11, 26, 3, tzinfo=nightly.zone)
    assert tick_key("report", nightly, tick) == "schedule:report:0 3 * * *:2026-11-26T02:00:00Z"
    named = Schedule(every=timedelta(minutes=5), name="recent")
    assert (
        tick_key("report", named, utc(2026, 1, 1)) == "schedule:report:recent:2026-01-01T00:00:00Z"
    )


def test_default_names_and_specs() -> None:
    assert Schedule(cron="0  3 * * *").label == "0 3 * * *"
    assert Schedule(every=timedelta(minutes=5)).label == "every 5m"
    assert Schedule(every=timedelta(hours=1, minutes=30)).label == "every 1h30m"
    assert Schedule(cron="0 3 * * *", timezone=PARIS).spec == "cron 0 3 * * * Europe/Paris"
    assert Schedule(every=timedelta(minutes=5)).spec == "every 300s"


# --- definition errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of cron= or every="),
        ({"cron": "0 3 * * *", "every": timedelta(hours=1)}, "exactly one of cron= or every="),
        ({"cron": "61 * * * *"}, "Bad minute"),
        ({"cron": "0 3 * *"}, "Wrong number of fields"),
        ({"cron": "0 0 30 2 *"}, "cron='0 0 30 2 \\*'"),
        ({"cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"every": timedelta(0)}, "whole seconds, at least one"),
        ({"every": timedelta(seconds=1.5)}, "whole seconds, at least one"),
        ({"every": timedelta(hours=1), "timezone": PARIS}, "timezone applies to cron"),
        ({"every": timedelta(hours=1), "name": "a:b"}, "without a colon"),
        ({"every": timedelta(hours=1), "name": ""}, "must be non-empty"),
        ({"every": timedelta(hours=1), "name": "x" * 101}, "longer than 100"),
    ],
)
def test_a_bad_schedule_is_refused_naming_the_problem(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(DefinitionError, match=message):
        Schedule(**options)  # type: ignore[arg-type]


def test_a_schedule_input_that_does_not_fit_the_model_is_refused_at_definition() -> None:
    with pytest.raises(DefinitionError, match=r"schedule 'nightly': .*scope: Field required"):
        workflow(schedules=[Schedule(cron="0 3 * * *", input={}, name="nightly")])


def test_two_schedules_of_one_name_are_refused() -> None:
    with pytest.raises(DefinitionError, match="two schedules have this name; give each a name="):
        workflow(
            schedules=[
                Schedule(cron="0 3 * * *", input={"scope": "a"}),
                Schedule(cron="0 3 * * *", input={"scope": "b"}, timezone=PARIS),
            ]
        )


def test_names_too_long_for_an_idempotency_key_are_refused() -> None:
    with pytest.raises(DefinitionError, match="too long for an idempotency key"):
        workflow(
            "w" * 200,
            schedules=[Schedule(every=timedelta(hours=1), input={"scope": "a"}, name="n" * 40)],
        )


def test_the_issue_example_defines_and_registers() -> None:
    flow = workflow(
        schedules=[
            Schedule(cron="0 3 * * *", input={"scope": "all"}, timezone=PARIS),
            Schedule(every=timedelta(minutes=5), input={"scope": "recent"}),
        ]
    )
    registry = WorkflowRegistry([flow])
    assert [d.key for d in declared(registry)] == [
        ("report", "0 3 * * *"),
        ("report", "every 5m"),
    ]


def test_only_the_newest_version_of_a_workflow_is_scheduled() -> None:
    old = workflow(schedules=[Schedule(cron="0 3 * * *", input={"scope": "old"})])
    new = workflow(version=2, schedules=[Schedule(cron="0 4 * * *", input={"scope": "new"})])
    assert [d.schedule.input for d in declared([old, new])] == [{"scope": "new"}]


# --- what is due ---------------------------------------------------------------------


def state(d: Declared, next_tick_at: datetime, paused: bool = False) -> ScheduleState:
    return ScheduleState(
        d.workflow,
        d.schedule.label,
        d.schedule.spec,
        paused,
        next_tick_at,
        None,
        None,
        utc(2026, 1, 1),
    )


def test_after_missed_ticks_only_the_latest_is_due() -> None:
    d = Declared("report", Schedule(every=timedelta(minutes=5), input={"scope": "a"}))
    rows = {d.key: state(d, utc(2026, 1, 1, 0, 5))}
    [due] = due_ticks([d], rows, utc(2026, 1, 1, 7, 3))
    assert due.tick == utc(2026, 1, 1, 7, 0)
    assert due.idempotency_key == "schedule:report:every 5m:2026-01-01T07:00:00Z"


def test_nothing_is_due_before_the_next_tick_or_while_paused() -> None:
    d = Declared("report", Schedule(every=timedelta(minutes=5), input={"scope": "a"}))
    assert due_ticks([d], {d.key: state(d, utc(2026, 1, 1, 0, 5))}, utc(2026, 1, 1, 0, 4)) == []
    paused = {d.key: state(d, utc(2026, 1, 1, 0, 5), paused=True)}
    assert due_ticks([d], paused, utc(2026, 1, 1, 1)) == []
    assert due_ticks([d], {}, utc(2026, 1, 1, 1)) == []
