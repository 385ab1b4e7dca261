"""Schedules: when a workflow runs by itself, and the state that makes each tick run once.

    nightly = Workflow(
        "nightly_report",
        input_model=Report,
        schedules=[
            Schedule(cron="0 3 * * *", input={"scope": "all"}, timezone="Europe/Paris"),
            Schedule(every=timedelta(minutes=5), input={"scope": "recent"}, name="recent"),
        ],
    )

A tick is one instant a schedule fires at. Cron ticks come from ``cronsim`` in the
schedule's time zone (Debian cron's rules across DST changes: a time skipped by the
spring change runs when the clock jumps, a repeated hour runs once); ``every`` ticks
are multiples of the interval counted from 1970-01-01 UTC, so every process computes
the same ticks. Each tick is enqueued with the idempotency key ``tick_key()`` names.

One ``workflow_schedules`` row per (workflow, schedule name) holds whether it is
paused, the last tick fired and the next one due. A firing pass reads the rows
(``sync_rows``), enqueues each due tick with its key, *then* advances the row with a
compare-and-set (``advance``): whatever a crash interrupts, the next pass finds the
same tick due and the key makes its enqueue a no-op; concurrent passes collide on the
key and only one of them advances the row. Misfires: a pass finds one tick due however
many passed since the row's ``next_tick_at`` (the latest at or before now).

The units of work take a Connection and own no transaction; ``in_transaction`` runs
one with the retry policy of the rest of conveyor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from sqlalchemy import Connection, Engine, Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from tenacity import Retrying

from core.errors import DefinitionError, InputValidationError, NotFound, translate_errors
from core.models import WorkflowSchedule
from core.sql import utcnow
from core.transactions import RetryPolicy
from core.types import UTCDateTime

if TYPE_CHECKING:
    from core.registry import WorkflowRegistry
    from core.workflows import Workflow

T = TypeVar("T")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KEY_PREFIX = "schedule"
MAX_KEY_LENGTH = 255  # workflow_executions.idempotency_key
MAX_NAME_LENGTH = 100
# Found by the tick computation at definition time: a cron that never matches.
NEVER = "it never fires"

_table = cast(Table, WorkflowSchedule.__table__)
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def _duration(seconds: int) -> str:
    """Whole seconds as '1d', '5m', '1h30m', '90s' stays '1m30s'."""
    parts: list[str] = []
    for unit, size in _UNITS:
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


@dataclass(frozen=True)
class Schedule:
    """When a workflow runs by itself: a ``cron`` expression or an ``every`` interval.

    ``cron`` has five fields (minute hour day-of-month month day-of-week), or six with
    seconds first, and is read in ``timezone`` (an IANA name, default UTC). ``every``
    ticks at whole multiples of the interval since 1970-01-01 UTC. ``input`` is checked
    against the workflow's input model when the workflow is defined. ``name`` tells the
    schedules of one workflow apart (in the CLI, the database and the idempotency key);
    by default it is the cron expression, or ``every 5m``; name schedules whose spec may
    change, so that a changed spec keeps its row (and its pause).
    """

    cron: str | None = None
    every: timedelta | None = None
    input: Any = None
    timezone: str = "UTC"
    name: str | None = None
    zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise DefinitionError("a Schedule takes exactly one of cron= or every=")
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise DefinitionError(
                f"schedule {self.label!r}: unknown time zone {self.timezone!r}"
            ) from None
        object.__setattr__(self, "zone", zone)
        if self.every is not None:
            if self.every < timedelta(seconds=1) or self.every % timedelta(seconds=1):
                raise DefinitionError(
                    f"schedule every={self.every!r}: the interval must be whole seconds, "
                    "at least one"
                )
            if self.timezone != "UTC":
                raise DefinitionError(
                    f"schedule {self.label!r}: timezone applies to cron schedules only "
                    "(every= counts from 1970-01-01 UTC)"
                )
        else:
            self._check_cron()
        if not self.label or self.label != self.label.strip() or ":" in self.label:
            raise DefinitionError(
                f"schedule name {self.label!r}: must be non-empty, without a colon or "
                "surrounding spaces"
            )
        if len(self.label) > MAX_NAME_LENGTH:
            raise DefinitionError(
                f"schedule name {self.label!r} is longer than {MAX_NAME_LENGTH} characters"
            )

    def _check_cron(self) -> None:
        assert self.cron is not None
        try:
            CronSim(self.cron, datetime.now(self.zone))
        except CronSimError as error:
            raise DefinitionError(f"schedule cron={self.cron!r}: {error}") from None
        if self.next_after(datetime.now(UTC)) is None:
            raise DefinitionError(f"schedule cron={self.cron!r}: {NEVER}")

    @property
    def label(self) -> str:
        """The schedule's name: given, or the cron expression, or ``every 5m``."""
        if self.name is not None:
            return self.name
        if self.cron is not None:
            return " ".join(self.cron.split())
        assert self.every is not None
        return f"every {_duration(int(self.every.total_seconds()))}"

    @property
    def spec(self) -> str:
        """When it fires, as stored on its row: a changed spec moves the next tick."""
        if self.cron is not None:
            return f"cron {' '.join(self.cron.split())} {self.timezone}"
        assert self.every is not None
        return f"every {int(self.every.total_seconds())}s"

    @property
    def when(self) -> str:
        """For people: the cron expression, or ``every 5m``."""
        if self.cron is not None:
            return " ".join(self.cron.split())
        assert self.every is not None
        return f"every {_duration(int(self.every.total_seconds()))}"

    def next_after(self, moment: datetime) -> datetime | None:
        """The first tick strictly after ``moment``, in UTC (None: no tick in 50 years)."""
        moment = _aware(moment)
        if self.every is not None:
            return self._floor(moment) + self.every
        assert self.cron is not None
        # A start inside a repeated (fall-back) hour can give a tick of its first
        # pass, before ``moment``: that tick already happened, so look further.
        for tick in CronSim(self.cron, moment.astimezone(self.zone)):
            if tick.astimezone(UTC) > moment:
                return tick.astimezone(UTC)
        return None

    def latest_at(self, moment: datetime) -> datetime | None:
        """The last tick at or before ``moment``, in UTC (None: none in 50 years)."""
        moment = _aware(moment)
        if self.every is not None:
            return self._floor(moment)
        assert self.cron is not None
        # cronsim's reverse iteration starts strictly before its start: start one
        # second after ``moment`` (floored to the second) to include ``moment`` itself.
        start = moment.replace(microsecond=0) + timedelta(seconds=1)
        for tick in CronSim(self.cron, start.astimezone(self.zone), reverse=True):
            if tick.astimezone(UTC) <= moment:
                return tick.astimezone(UTC)
        return None

    def _floor(self, moment: datetime) -> datetime:
        assert self.every is not None
        return EPOCH + ((moment - EPOCH) // self.every) * self.every


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise InputValidationError(f"naive datetime {moment.isoformat()}: give a time zone")
    return moment.astimezone(UTC)


def tick_key(workflow: str, schedule: Schedule, tick: datetime) -> str:
    """The idempotency key of one tick: ``schedule:<workflow>:<name>:<tick UTC ISO>``."""
    stamp = _aware(tick).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{KEY_PREFIX}:{workflow}:{schedule.label}:{stamp}"


def check_schedules(workflow: Workflow, schedules: Iterable[Schedule]) -> tuple[Schedule, ...]:
    """The workflow's schedules, refused with DefinitionError if names repeat, a key
    would be too long, or an input does not fit the workflow's input model."""
    checked: dict[str, Schedule] = {}
    for schedule in schedules:
        if not isinstance(schedule, Schedule):
            raise DefinitionError(
                f"workflow {workflow.name!r}: schedules takes Schedule objects, "
                f"got {type(schedule).__name__}"
            )
        where = f"workflow {workflow.name!r}, schedule {schedule.label!r}"
        if schedule.label in checked:
            raise DefinitionError(f"{where}: two schedules have this name; give each a name=")
        if len(tick_key(workflow.name, schedule, EPOCH)) > MAX_KEY_LENGTH:
            raise DefinitionError(
                f"{where}: workflow and schedule names are too long for an idempotency key "
                f"({MAX_KEY_LENGTH} characters)"
            )
        try:
            workflow.validate_input(schedule.input)
        except InputValidationError as error:
            raise DefinitionError(f"{where}: {error}") from None
        checked[schedule.label] = schedule
    return tuple(checked.values())


@dataclass(frozen=True)
class Declared:
    """A schedule as it is deployed: its workflow's name and its definition."""

    workflow: str
    schedule: Schedule

    @property
    def key(self) -> tuple[str, str]:
        """Its row's primary key."""
        return (self.workflow, self.schedule.label)


def declared(workflows: Iterable[Workflow]) -> list[Declared]:
    """The schedules of the newest version of each workflow (older versions never fire)."""
    newest: dict[str, Workflow] = {}
    for workflow in workflows:
        if workflow.name not in newest or workflow.version > newest[workflow.name].version:
            newest[workflow.name] = workflow
    return [
        Declared(name, schedule)
        for name, workflow in sorted(newest.items())
        for schedule in workflow.schedules
    ]


class ScheduleNotFound(NotFound):
    """The workflow declares no schedule of this name."""

    def __init__(self, workflow: str, name: str, known: Sequence[str]) -> None:
        hint = f"; its schedules: {', '.join(known)}" if known else "; it has none"
        super().__init__(f"workflow {workflow!r} has no schedule named {name!r}{hint}")
        self.workflow = workflow
        self.name = name


def find(registry: WorkflowRegistry, workflow: str, name: str) -> Declared:
    """The schedule ``name`` of the newest ``workflow`` (WorkflowNotFound, ScheduleNotFound)."""
    definition = registry.get(workflow)
    for schedule in definition.schedules:
        if schedule.label == name:
            return Declared(definition.name, schedule)
    raise ScheduleNotFound(workflow, name, [s.label for s in definition.schedules])


@dataclass(frozen=True)
class ScheduleState:
    """A schedule's row: paused, the last tick fired (and its execution), the next due."""

    workflow: str
    name: str
    spec: str
    paused: bool
    next_tick_at: datetime | None
    last_tick_at: datetime | None
    last_execution_id: str | None
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> ScheduleState:
        """From a selected or returned row of workflow_schedules."""
        return cls(
            row.workflow,
            row.name,
            row.spec,
            row.paused,
            row.next_tick_at,
            row.last_tick_at,
            row.last_execution_id,
            row.updated_at,
        )


@dataclass(frozen=True)
class DueTick:
    """A tick to enqueue now, and the spec it was computed under."""

    declared: Declared
    tick: datetime
    spec: str

    @property
    def idempotency_key(self) -> str:
        """The key its execution is enqueued with."""
        return tick_key(self.declared.workflow, self.declared.schedule, self.tick)


# --- statements (built once; bind parameters are prefixed ``b_``, as SQLAlchemy
# reserves column names in an UPDATE's SET) -------------------------------------------

_COLUMNS = (
    _table.c.workflow,
    _table.c.name,
    _table.c.spec,
    _table.c.paused,
    _table.c.next_tick_at,
    _table.c.last_tick_at,
    _table.c.last_execution_id,
    _table.c.updated_at,
)
SELECT_NOW = select(utcnow())
SELECT_ROWS = select(*_COLUMNS).where(
    _table.c.workflow.in_(bindparam("b_workflows", expanding=True))
)
INSERT_ROWS = {
    "postgresql": postgresql.insert(_table).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(_table).on_conflict_do_nothing(),
}
_TICK = bindparam("b_tick", type_=UTCDateTime())
_NEXT = bindparam("b_next", type_=UTCDateTime())
_ROW = (_table.c.workflow == bindparam("b_workflow")) & (_table.c.name == bindparam("b_name"))
# A deploy changed when the schedule fires: its next tick is computed anew. The CAS on
# the old spec lets one of several concurrent passes do it.
RESPEC = (
    update(_table)
    .where(_ROW, _table.c.spec == bindparam("b_old_spec"))
    .values(
        spec=bindparam("b_spec"),
        next_tick_at=_NEXT,
        updated_at=utcnow(),
    )
    .returning(*_COLUMNS)
)
# The tick was enqueued: move the row past it, unless a pass already moved it as far.
ADVANCE = (
    update(_table)
    .where(
        _ROW,
        _table.c.spec == bindparam("b_spec"),
        _table.c.next_tick_at <= _TICK,
    )
    .values(
        last_tick_at=_TICK,
        next_tick_at=_NEXT,
        last_execution_id=bindparam("b_execution_id"),
        updated_at=utcnow(),
    )
)
PAUSE = (
    update(_table)
    .where(_ROW, _table.c.paused.is_(False))
    .values(paused=True, updated_at=utcnow())
    .returning(*_COLUMNS)
)
# Resuming starts again at the first tick after now: the ticks missed while paused
# are not a backlog.
RESUME = (
    update(_table)
    .where(_ROW, _table.c.paused.is_(True))
    .values(paused=False, next_tick_at=_NEXT, updated_at=utcnow())
    .returning(*_COLUMNS)
)


# --- units of work: each takes a Connection and owns no transaction ------------------


def database_now(connection: Connection) -> datetime:
    """The database's clock: one clock for every beat and worker, whatever their skew."""
    now: datetime = connection.execute(SELECT_NOW).scalar_one()
    return now


def sync_rows(
    connection: Connection, schedules: Sequence[Declared], now: datetime
) -> dict[tuple[str, str], ScheduleState]:
    """The rows of ``schedules``, creating the missing ones and re-timing changed specs.

    A new row's first tick is the first after ``now``: a schedule never fires for the
    time before it was deployed. Concurrent callers may all try the insert; the
    primary key keeps one row.
    """
    if not schedules:
        return {}
    workflows = sorted({d.workflow for d in schedules})
    rows = _select(connection, workflows)
    missing = [d for d in schedules if d.key not in rows]
    if missing:
        dialect = connection.dialect.name
        connection.execute(
            INSERT_ROWS[dialect],
            [
                {
                    "workflow": d.workflow,
                    "name": d.schedule.label,
                    "spec": d.schedule.spec,
                    "paused": False,
                    "next_tick_at": d.schedule.next_after(now),
                }
                for d in missing
            ],
        )
        rows = _select(connection, workflows)
    for d in schedules:
        row = rows[d.key]
        if row.spec != d.schedule.spec:
            changed = connection.execute(
                RESPEC,
                {
                    "b_workflow": d.workflow,
                    "b_name": d.schedule.label,
                    "b_old_spec": row.spec,
                    "b_spec": d.schedule.spec,
                    "b_next": d.schedule.next_after(now),
                },
            ).one_or_none()
            rows[d.key] = ScheduleState.of(changed) if changed else _select_one(connection, d)
    return {d.key: rows[d.key] for d in schedules}


def _select(connection: Connection, workflows: list[str]) -> dict[tuple[str, str], ScheduleState]:
    found = connection.execute(SELECT_ROWS, {"b_workflows": workflows})
    return {(row.workflow, row.name): ScheduleState.of(row) for row in found}


def _select_one(connection: Connection, d: Declared) -> ScheduleState:
    return _select(connection, [d.workflow])[d.key]


def due_ticks(
    schedules: Sequence[Declared], rows: dict[tuple[str, str], ScheduleState], now: datetime
) -> list[DueTick]:
    """The tick each unpaused schedule should enqueue now: the latest at or before
    ``now`` once its row's next tick has come (one tick, however many were missed)."""
    due: list[DueTick] = []
    for d in schedules:
        row = rows.get(d.key)
        if row is None or row.paused or row.spec != d.schedule.spec:
            continue
        if row.next_tick_at is None or row.next_tick_at > now:
            continue
        tick = d.schedule.latest_at(now)
        if tick is not None and tick >= row.next_tick_at:
            due.append(DueTick(d, tick, row.spec))
    return due


def advance(connection: Connection, due: DueTick, execution_id: str | None) -> bool:
    """Record ``due`` as fired by ``execution_id`` and move the row to the next tick.

    False means the row had already been moved this far (a concurrent pass fired the
    same tick, whose enqueue returned the same execution), or its spec changed since.
    """
    result = connection.execute(
        ADVANCE,
        {
            "b_workflow": due.declared.workflow,
            "b_name": due.declared.schedule.label,
            "b_spec": due.spec,
            "b_tick": due.tick,
            "b_next": due.declared.schedule.next_after(due.tick),
            "b_execution_id": execution_id,
        },
    )
    return result.rowcount == 1


def set_paused(
    connection: Connection, schedule: Declared, paused: bool, now: datetime
) -> ScheduleState | None:
    """Pause, or resume at the first tick after ``now``; None if it already was so.

    Creates the row first, so a schedule can be paused before its first tick.
    """
    sync_rows(connection, [schedule], now)
    statement = PAUSE if paused else RESUME
    changed = connection.execute(
        statement,
        {
            "b_workflow": schedule.workflow,
            "b_name": schedule.schedule.label,
            "b_next": schedule.schedule.next_after(now),
        },
    ).one_or_none()
    return ScheduleState.of(changed) if changed else None


def read_rows(
    connection: Connection, schedules: Sequence[Declared]
) -> dict[tuple[str, str], ScheduleState]:
    """The existing rows of ``schedules`` (none are created)."""
    if not schedules:
        return {}
    return _select(connection, sorted({d.workflow for d in schedules}))


def in_transaction(engine: Engine, policy: RetryPolicy, work: Callable[[Connection], T]) -> T:
    """Run ``work`` in one transaction, re-run whole on transient database errors."""
    for attempt in Retrying(**policy.options()):
        with attempt, translate_errors(), engine.begin() as connection:
            return work(connection)
    raise AssertionError("tenacity ends with a result or an error")  # pragma: no cover
