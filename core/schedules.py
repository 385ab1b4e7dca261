"""Schedules: when a workflow runs by itself (definitions, ticks, idempotency keys).

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
the same ticks. Each tick is enqueued with the idempotency key ``tick_key()`` names,
in the producers' scope; keys beginning ``schedule:`` are reserved to ticks, and every
other producer path refuses them (``refuse_reserved_key``).

Their state in the database, and the firing pass's units of work, are in
``core.schedule_state``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from core.errors import DefinitionError, InputValidationError, NotFound, ReservedIdempotencyKey

if TYPE_CHECKING:
    from core.registry import WorkflowRegistry
    from core.workflows import Workflow

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Idempotency keys beginning with this are the schedules' own (``refuse_reserved_key``).
RESERVED_PREFIX = "schedule:"
MAX_KEY_LENGTH = 255  # workflow_executions.idempotency_key
MAX_NAME_LENGTH = 100
# Found by the tick computation at definition time: a cron that never matches.
NEVER = "it never fires"

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
    return f"{RESERVED_PREFIX}{workflow}:{schedule.label}:{stamp}"


def refuse_reserved_key(key: str | None) -> None:
    """Refuse a key that begins with ``schedule:`` (ReservedIdempotencyKey).

    Ticks' keys are predictable: anyone else holding one would make its tick look
    already fired. Every producer path checks its keys here; only the firing pass
    (``worker.schedules``) may use the prefix.
    """
    if key is not None and key.startswith(RESERVED_PREFIX):
        raise ReservedIdempotencyKey(key, RESERVED_PREFIX)


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
