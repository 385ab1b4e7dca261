"""Workflow definitions: a name, a version, an input model and a DAG of Python steps.

    etl = Workflow("etl", input_model=EtlInput, deadline=timedelta(hours=1))

    @etl.step()
    def extract(ctx: StepContext) -> list[int]:
        return fetch(ctx.input.url)

    @etl.step(depends_on=["extract"], retry=Retry(max_attempts=3))
    def load(ctx: StepContext, extract: list[int]) -> int:
        return save(extract)

A step function takes its context first, then one keyword argument per upstream
step, named after it, holding that step's output. Errors in a definition are raised
as DefinitionError naming the offender: duplicate names, a dependency on itself or
named twice, parameters that do not match the dependencies and return types that
cannot be JSON when a step is declared; unknown dependencies and cycles when the
workflow is validated (at registration).
"""

from __future__ import annotations

import difflib
import inspect
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from graphlib import CycleError, TopologicalSorter
from types import NoneType, UnionType
from typing import (
    Annotated,
    Any,
    Literal,
    Protocol,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.errors import PydanticSchemaGenerationError

from core.config import get_settings
from core.errors import DefinitionError, FieldError, InputValidationError
from core.schedules import Schedule, check_schedules

NO_ANNOTATION = inspect.Signature.empty


class StepContext(Protocol):
    """What a running step sees of its execution (implemented by the worker)."""

    execution_id: str
    step_name: str
    attempt: int
    input: Any

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of this step: use it for external side effects."""

    def heartbeat(self) -> None:
        """Tell conveyor the step is alive (done for you every few seconds)."""

    def is_cancelled(self) -> bool:
        """Whether the execution was cancelled: a long step should stop when it is."""

    @property
    def map_index(self) -> int | None:
        """The item's index in a map step's list (None outside a map step)."""

    def pause_key(self, key: str, *, until: datetime | timedelta) -> None:
        """Hold every start under limit key ``key`` until ``until`` (a 429's Retry-After)."""


@dataclass(frozen=True)
class Retry:
    """How a failing step is retried: attempts, exponential backoff with jitter, filters."""

    max_attempts: int = 1
    backoff: float = 1.0
    backoff_max: float = 300.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    # "skip": a step whose attempts are spent (or whose error is not retried) ends
    # skipped instead of failed, its error kept: an optional step.
    on_exhausted: str = "fail"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise DefinitionError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff < 0 or self.backoff_max < 0:
            raise DefinitionError("backoff and backoff_max must not be negative")
        if self.on_exhausted not in ("fail", "skip"):
            raise DefinitionError(
                f'on_exhausted must be "fail" or "skip", got {self.on_exhausted!r}'
            )

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether ``attempt`` failing with ``error`` earns another attempt."""
        return attempt < self.max_attempts and isinstance(error, self.retry_on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after ``attempt`` failed: doubling, capped, with full jitter."""
        ceiling = min(self.backoff_max, self.backoff * 2 ** max(0, attempt - 1))
        return random.uniform(0, ceiling) if self.jitter else ceiling


FOREVER = "forever"
# A retention: how long after an execution ended it is kept; "forever" keeps it, None
# takes the setting's.
Keep = timedelta | Literal["forever"] | None


@dataclass(frozen=True)
class Retention:
    """How long a workflow's finished executions are kept (core.retention): those that
    ``succeeded``, those that ``failed`` (and were cancelled or timed out), each for a
    duration after they ended, then deleted with their steps, items and history; and
    after ``payloads`` their inputs, outputs and errors are cleared, their skeleton
    (statuses, timings, history) kept. ``"forever"`` keeps; None (the default) takes
    ``CONVEYOR_RETENTION_SUCCEEDED``, ``_FAILED`` or ``_PAYLOADS``."""

    succeeded: Keep = None
    failed: Keep = None
    payloads: Keep = None

    def __post_init__(self) -> None:
        for name in ("succeeded", "failed", "payloads"):
            value = getattr(self, name)
            if value is None or value == FOREVER:
                continue
            if not isinstance(value, timedelta):
                raise DefinitionError(
                    f'Retention({name}=): a timedelta, "forever" or None, got {value!r}'
                )
            if value < timedelta(0):
                raise DefinitionError(f"Retention({name}=) must not be negative, got {value}")


KeyOf = str | Callable[[Any], Any]
ON_LIMIT = ("queue", "cancel_newest", "cancel_in_progress")


def _check_key(where: str, key: Any) -> None:
    if isinstance(key, str):
        if not 0 < len(key) <= 200:
            raise DefinitionError(f"{where}: a key must be 1-200 characters, got {key!r}")
    elif not callable(key):
        raise DefinitionError(f"{where}: key must be text or a function of the input")


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` at once per key, across every worker: on a workflow, running
    executions (an execution whose open steps all wait holds none); on a step, its
    queued and running attempts (a waiting or retrying one holds none).

    ``key`` is text (one limit shared by every workflow and step naming it: an outside
    resource, "openai") or a function of the execution's input (one limit per value:
    ``lambda input: input.tenant_id``, scoped to this workflow, or this step).
    ``on_limit``: ``"queue"`` waits, in priority then arrival order;
    ``"cancel_newest"`` cancels the execution that would exceed the limit;
    ``"cancel_in_progress"`` cancels the oldest running one to make room (both on
    workflows only: a step cannot be cancelled without its execution)."""

    key: KeyOf
    limit: int
    on_limit: str = "queue"

    def __post_init__(self) -> None:
        where = f"Concurrency(key={self.key!r})"
        _check_key(where, self.key)
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise DefinitionError(f"{where}: limit must be an int of 1 or more")
        if self.on_limit not in ON_LIMIT:
            raise DefinitionError(
                f"{where}: on_limit must be one of {', '.join(ON_LIMIT)}, got {self.on_limit!r}"
            )


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` starts per ``per`` per key, across every worker, spaced evenly
    (a start every ``per / limit``), with up to ``burst`` at once after a quiet spell.
    ``cost`` is what one start spends (an int, or a function of the input). A refused
    step waits, with no message, until the moment it may start. On a workflow it limits
    execution starts; on a step, the step's starts. ``key`` as in Concurrency."""

    key: KeyOf
    limit: int
    per: timedelta
    burst: int = 1
    cost: int | Callable[[Any], int] = 1

    def __post_init__(self) -> None:
        where = f"RateLimit(key={self.key!r})"
        _check_key(where, self.key)
        for label, value in (("limit", self.limit), ("burst", self.burst)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DefinitionError(f"{where}: {label} must be an int of 1 or more")
        if not isinstance(self.per, timedelta) or self.per <= timedelta(0):
            raise DefinitionError(f"{where}: per must be a positive timedelta")
        if not callable(self.cost) and (
            isinstance(self.cost, bool) or not isinstance(self.cost, int) or self.cost < 1
        ):
            raise DefinitionError(f"{where}: cost must be an int of 1 or more, or a function")
        if isinstance(self.cost, int) and self.cost > self.burst:
            raise DefinitionError(
                f"{where}: cost {self.cost} is above burst {self.burst}: it could never start"
            )

    @property
    def interval(self) -> float:
        """Seconds between two starts at the steady rate."""
        return self.per.total_seconds() / self.limit


Limit = Concurrency | RateLimit


def _limits(where: str, given: Any, *, step: bool) -> tuple[Limit, ...]:
    """``concurrency=`` and ``rate_limit=`` (one, or a list of them) as one tuple."""
    if given is None:
        return ()
    found = tuple(given) if isinstance(given, list | tuple) else (given,)
    for limit in found:
        if not isinstance(limit, Concurrency | RateLimit):
            raise DefinitionError(f"{where}: expected Concurrency or RateLimit, got {limit!r}")
        if step and isinstance(limit, Concurrency) and limit.on_limit != "queue":
            raise DefinitionError(
                f"{where}: on_limit={limit.on_limit!r} cancels executions: give it on the "
                "workflow; a step's limit can only queue"
            )
    return found


StepFunction = Callable[..., Any]
# The longest debounce key (the column's width).
MAX_DEBOUNCE_KEY = 255


@dataclass(frozen=True)
class Debounce:
    """Collapse enqueues with the same ``key`` into one pending execution that runs with
    the last input: it starts ``period`` after the last enqueue, and at most ``max_wait``
    after the first (None: a steady stream may postpone it for as long as it lasts).

    ``key`` is text, or a function of the validated input (the input model's instance;
    the JSON value for a workflow without a model) returning text (an int is taken as
    its decimal text)."""

    key: str | Callable[[Any], str | int]
    period: timedelta
    max_wait: timedelta | None = None

    def __post_init__(self) -> None:
        if isinstance(self.key, str):
            if not 0 < len(self.key) <= MAX_DEBOUNCE_KEY:
                raise DefinitionError(
                    f"Debounce(key=): a key must be 1-{MAX_DEBOUNCE_KEY} characters, "
                    f"got {self.key!r}"
                )
        elif not callable(self.key):
            raise DefinitionError(
                f"Debounce(key=) takes text or a function of the input, got {self.key!r}"
            )
        if not isinstance(self.period, timedelta) or self.period <= timedelta(0):
            raise DefinitionError(
                f"Debounce(period=) must be a timedelta above 0, got {self.period!r}"
            )
        if self.max_wait is not None and (
            not isinstance(self.max_wait, timedelta) or self.max_wait < self.period
        ):
            raise DefinitionError(
                f"Debounce(max_wait=) must be a timedelta of at least period ({self.period}) "
                f"or None, got {self.max_wait!r}"
            )

    def key_of(self, workflow: str, parsed_input: Any) -> str:
        """The window's key for an input (as the steps see it); InputValidationError when
        the key function fails or returns no usable key."""
        if isinstance(self.key, str):
            return self.key
        try:
            found = self.key(parsed_input)
        except Exception as exc:
            raise InputValidationError(
                f"workflow {workflow!r}: the debounce key function failed on this input: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(found, int) and not isinstance(found, bool):
            found = str(found)
        if not isinstance(found, str) or not 0 < len(found) <= MAX_DEBOUNCE_KEY:
            raise InputValidationError(
                f"workflow {workflow!r}: the debounce key function must return text of "
                f"1-{MAX_DEBOUNCE_KEY} characters (or an int), got {found!r}"
            )
        return found


# When a step whose upstream steps are all final runs (core.conditions): only if they
# all succeeded, if none failed (a skipped one passes None), or whatever they became.
TRIGGERS = ("all_success", "none_failed", "all_done")
# How many child workflows may nest below a root execution, unless
# CONVEYOR_MAX_CHILD_DEPTH says otherwise (the registry passes the setting).
MAX_CHILD_DEPTH = 8
# The most items any map may declare (``max_items``): each is a row.
MAX_MAP_ITEMS = 100_000
# The key of a workflow's max_concurrency (a function key's value: scoped to the workflow).
WHOLE_WORKFLOW_VALUE = "*"


def whole_workflow(_input: Any) -> str:
    """The key function of ``max_concurrency``: one value for every execution."""
    return WHOLE_WORKFLOW_VALUE


# The longest queue name a workflow or step may give (``queue=``).
MAX_QUEUE_NAME = 200


@dataclass(frozen=True)
class Sleep:
    """A durable sleep node: for ``duration``, or until the datetime ``until(ctx, **up)``
    returns (timezone-aware), computed once when the node is released. Its output is the
    wake time."""

    duration: timedelta | None = None
    until: StepFunction | None = None

    kind = "sleep"


@dataclass(frozen=True)
class EventWait:
    """A node that waits for event ``event`` with key ``key`` (text, or ``key(ctx, **up)``),
    or for a signal to this step; its output is the payload (checked against ``schema``
    when the event is sent). Past ``timeout`` it fails with WaitTimedOut, or, when
    ``on_timeout`` is a value other than ``"fail"``, succeeds with that value."""

    event: str
    key: str | StepFunction | None = None
    schema: type[BaseModel] | None = None
    timeout: timedelta | None = None
    on_timeout: Any = "fail"

    kind = "event"

    @property
    def fails_on_timeout(self) -> bool:
        """Whether a timeout fails the step (rather than completing it with a value)."""
        return isinstance(self.on_timeout, str) and self.on_timeout == "fail"


@dataclass(frozen=True)
class ChildWait:
    """A node that starts an execution of ``workflow`` with ``input(ctx, **up)`` and
    waits for it: its output is the child's output, its failure the child's failure."""

    workflow: Workflow
    input: StepFunction | None = None

    kind = "child"


@dataclass(frozen=True)
class Tolerate:
    """How many items of a map may fail (after their retries) before the map fails:
    ``max_failed`` items (an int), or that fraction of the items (a float below 1).
    A tolerated failure gives ``None`` at its index in the map's output."""

    max_failed: int | float = 0

    def __post_init__(self) -> None:
        value = self.max_failed
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DefinitionError(f"Tolerate(max_failed=) takes a number, got {value!r}")
        if isinstance(value, float) and not 0 <= value < 1:
            raise DefinitionError(
                f"Tolerate(max_failed={value!r}): a fraction must be at least 0 and below 1 "
                "(give an int for a number of items)"
            )
        if isinstance(value, int) and value < 0:
            raise DefinitionError(f"Tolerate(max_failed={value!r}) must not be negative")

    def limit(self, items: int) -> int:
        """How many of ``items`` may fail."""
        if isinstance(self.max_failed, float):
            return int(self.max_failed * items)
        return self.max_failed


@dataclass(frozen=True)
class MapSpec:
    """A map step: its function runs once per element of step ``over``'s output (a
    list), at most ``max_parallel`` at a time; its output is the list of the items'
    outputs in item order."""

    over: str
    max_parallel: int = 32
    max_items: int = 10_000
    on_item_failure: str | Tolerate = "fail"
    # A child map (``wf.child(..., over=)``): each item is an execution of this child
    # workflow (its input ``input(ctx, item, **unmapped)``) instead of a function call.
    child: ChildWait | None = None

    kind = "map"

    @property
    def tolerate(self) -> Tolerate:
        """``on_item_failure`` as a Tolerate (``"fail"``: none may fail)."""
        return self.on_item_failure if isinstance(self.on_item_failure, Tolerate) else Tolerate()


Wait = Sleep | EventWait | ChildWait | MapSpec
WAIT_KINDS = ("sleep", "event", "child", "map")


def _never_run(ctx: Any, **_upstream: Any) -> None:
    """A wait node's ``fn``: no worker ever runs a wait (there is no waiting -> running)."""
    raise RuntimeError(f"step {ctx.step_name} is a wait and is never run by a worker")


@dataclass(frozen=True)
class Step:
    """One node of a workflow's DAG: a task (``fn`` run by a worker) or, with ``wait``,
    a wait node (a sleep, an event wait or a child workflow) that no worker runs, or a
    map step (``MapSpec``: ``fn`` runs once per item, each under ``retry``,
    ``soft_timeout`` and ``timeout``)."""

    name: str
    fn: StepFunction
    depends_on: tuple[str, ...] = ()
    retry: Retry = field(default_factory=Retry)
    soft_timeout: float | None = None
    timeout: float | None = None
    output: TypeAdapter[Any] | None = None
    wait: Wait | None = None
    # Per-key concurrency and rate limits: a task step with any is admitted when it is
    # released (core.limits), and waits as a row (wait_kind "key") while they refuse it.
    limits: tuple[Limit, ...] = ()
    # The broker queue its messages go to (None: its workflow's, see Workflow.queue_of).
    queue: str | None = None
    # ``when(ctx, **upstream)`` decides at release whether the step runs or is skipped;
    # ``trigger`` which upstream outcomes let it run (see core.conditions).
    when: StepFunction | None = None
    trigger: str = "all_success"
    # A semantic change behind the same signature (``@wf.step(version=2)``): part of the
    # step's contract in its workflow's shape (core.shapes), so that an execution begun
    # with the old meaning is not finished by a worker with the new one.
    version: int = 1

    @property
    def gated(self) -> bool:
        """Whether its release is decided by core.conditions (a condition, or a trigger
        other than all_success), outside the fused completion."""
        return self.when is not None or self.trigger != "all_success"

    @property
    def kind(self) -> str:
        """``task``, or the wait's kind: ``sleep``, ``event``, ``child`` or ``map``."""
        return "task" if self.wait is None else self.wait.kind

    @property
    def wait_kind(self) -> str | None:
        """What the step's row records in ``wait_kind``: the wait's kind, ``key`` for a
        task step behind limits, None for a task step without."""
        if self.wait is not None:
            return self.wait.kind
        return "key" if self.limits else None

    def to_json(self, value: Any) -> Any:
        """The step's return value as JSON data (pydantic models and dates included)."""
        if self.output is not None:
            return self.output.dump_python(value, mode="json")
        return value


class Dag(Protocol):
    """What recording a step's outcome needs of its workflow's graph."""

    @property
    def sinks(self) -> list[str]:
        """Steps nothing depends on: their outputs make the execution's output."""

    def upstream(self, name: str) -> tuple[str, ...]:
        """Steps ``name`` depends on directly."""

    def downstream(self, name: str) -> list[str]:
        """Steps that depend directly on ``name``."""

    def descendants(self, name: str) -> list[str]:
        """Every step that depends on ``name``, directly or not."""


class Workflow:
    """A named, versioned DAG of steps with an input model, a deadline, a concurrency cap
    and, optionally, schedules (``Schedule``) on which beat runs it, a broker queue
    (``queue``) its steps go to unless a step names its own, limits (``Concurrency``,
    ``RateLimit``), or a ``Debounce`` that collapses enqueues close together into one
    execution."""

    def __init__(
        self,
        name: str,
        *,
        version: int = 1,
        input_model: type[BaseModel] | None = None,
        deadline: timedelta | None = None,
        max_concurrency: int | None = None,
        description: str = "",
        schedules: Iterable[Schedule] = (),
        concurrency: Concurrency | Iterable[Concurrency] | None = None,
        rate_limit: RateLimit | Iterable[RateLimit] | None = None,
        queue: str | None = None,
        debounce: Debounce | None = None,
        retention: Retention | None = None,
    ) -> None:
        if not name or not isinstance(name, str) or len(name) > 200:
            raise DefinitionError(f"workflow name must be 1-200 characters, got {name!r}")
        _check_queue(f"workflow {name!r}", queue)
        if version < 1:
            raise DefinitionError(f"workflow {name!r}: version must be at least 1")
        if max_concurrency is not None and max_concurrency < 1:
            raise DefinitionError(f"workflow {name!r}: max_concurrency must be at least 1")
        if debounce is not None and not isinstance(debounce, Debounce):
            raise DefinitionError(
                f"workflow {name!r}: debounce takes a Debounce, got {type(debounce).__name__}"
            )
        self.name = name
        self.version = version
        self.input_model = input_model
        self.deadline = deadline
        self.max_concurrency = max_concurrency
        where = f"workflow {name!r}"
        given = [*_limits(where, concurrency, step=False), *_limits(where, rate_limit, step=False)]
        if max_concurrency is not None:
            # max_concurrency is a limit like any other: one key for the whole workflow.
            given.append(Concurrency(key=whole_workflow, limit=max_concurrency))
        # Limits on the workflow's executions (core.limits admits them at the start).
        self.limits: tuple[Limit, ...] = tuple(given)
        self.description = description
        self.queue = queue
        self.steps: dict[str, Step] = {}
        self._children_map: dict[str, list[str]] | None = None
        self._sinks: list[str] | None = None
        self._wait_nodes: frozenset[str] | None = None
        self._routed: bool | None = None
        self._gated: frozenset[str] | None = None
        self._shape: Any = None  # core.shapes.Shape, computed on first use
        # When beat runs it by itself (core.schedules); inputs checked here, at definition.
        self.schedules: tuple[Schedule, ...] = check_schedules(self, schedules)
        # A schedule's tick is one execution by design (an idempotency key per tick):
        # collapsing ticks would make a schedule that fires less often, said plainly.
        if debounce is not None and self.schedules:
            raise DefinitionError(
                f"workflow {name!r}: a debounced workflow cannot have schedules "
                "(each tick is its own execution); lengthen the schedule instead"
            )
        self.debounce = debounce
        if retention is not None and not isinstance(retention, Retention):
            raise DefinitionError(
                f"workflow {name!r}: retention takes a Retention, got {type(retention).__name__}"
            )
        # How long its finished executions are kept (core.retention; None: the settings').
        self.retention = retention or Retention()

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, version={self.version}, steps={list(self.steps)})"

    def step(
        self,
        name: str | None = None,
        *,
        depends_on: Iterable[str] = (),
        retry: Retry | None = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        concurrency: Concurrency | Iterable[Concurrency] | None = None,
        rate_limit: RateLimit | Iterable[RateLimit] | None = None,
        queue: str | None = None,
        when: StepFunction | None = None,
        trigger: str = "all_success",
        version: int = 1,
    ) -> Callable[[StepFunction], StepFunction]:
        """Declare the decorated function a step of this workflow; with ``concurrency``
        or ``rate_limit`` it is admitted under those limits when it is released; with
        ``queue``, it runs only on workers consuming that broker queue
        (``celery worker -Q``); with ``when``, it runs only if ``when(ctx, **upstream)``
        is true when released, and ``trigger`` says which upstream outcomes release it
        (``core.conditions``); ``version`` marks a change of meaning behind the same
        signature (``core.shapes``: executions begun before it finish on the old code).
        """

        def register(fn: StepFunction) -> StepFunction:
            step_name = name or fn.__name__
            where = f"workflow {self.name!r}, step {step_name!r}"
            _check_queue(where, queue)
            _check_step_version(where, version)
            if isinstance(depends_on, str):
                # A string iterates as one-letter names: "up" would mean steps u and p.
                raise DefinitionError(
                    f"workflow {self.name!r}, step {step_name!r}: depends_on takes a list of "
                    f"step names, got the string {depends_on!r}"
                )
            self.add_step(
                Step(
                    name=step_name,
                    fn=fn,
                    depends_on=tuple(depends_on),
                    retry=retry or Retry(),
                    soft_timeout=soft_timeout,
                    timeout=timeout,
                    limits=(
                        *_limits(f"{where}", concurrency, step=True),
                        *_limits(f"{where}", rate_limit, step=True),
                    ),
                    queue=queue,
                    when=when,
                    trigger=trigger,
                    version=version,
                )
            )
            return fn

        return register

    def sleep(
        self,
        name: str,
        *,
        depends_on: Iterable[str] = (),
        duration: timedelta | None = None,
        until: StepFunction | None = None,
        trigger: str = "all_success",
    ) -> None:
        """Declare a durable sleep node: for ``duration``, or until ``until(ctx, **up)``
        (a timezone-aware datetime from upstream outputs). No worker is held meanwhile.
        ``trigger`` as for a step."""
        where = f"workflow {self.name!r}, sleep {name!r}"
        if (duration is None) == (until is None):
            raise DefinitionError(f"{where}: give either duration= or until=, not both or none")
        if duration is not None and (
            not isinstance(duration, timedelta) or duration < timedelta(0)
        ):
            raise DefinitionError(f"{where}: duration must be a timedelta of 0 or more")
        if until is not None and not callable(until):
            raise DefinitionError(f"{where}: until must be a function (ctx, **upstream)")
        sleep = Sleep(duration=duration, until=until)
        self._add_wait(name, depends_on, sleep, until, None, trigger)

    def wait(
        self,
        name: str,
        *,
        event: str,
        depends_on: Iterable[str] = (),
        key: str | StepFunction | None = None,
        schema: type[BaseModel] | None = None,
        timeout: timedelta | None = None,
        on_timeout: Any = "fail",
        retry: Retry | None = None,
        trigger: str = "all_success",
    ) -> None:
        """Declare a node that waits for event ``event`` (with ``key``: text, or a
        function ``(ctx, **upstream)`` returning it) or a signal to this step; its output
        is the payload, checked against ``schema`` when it is sent. ``trigger`` as for a
        step."""
        where = f"workflow {self.name!r}, wait {name!r}"
        if not isinstance(event, str) or not 0 < len(event) <= 200:
            raise DefinitionError(f"{where}: event must be a name of 1-200 characters")
        if key is not None and not (callable(key) or isinstance(key, str)):
            raise DefinitionError(f"{where}: key must be text or a function (ctx, **upstream)")
        if schema is not None and not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise DefinitionError(f"{where}: schema must be a pydantic model class")
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout <= timedelta(0)):
            raise DefinitionError(f"{where}: timeout must be a positive timedelta")
        spec = EventWait(
            event=event, key=key, schema=schema, timeout=timeout, on_timeout=on_timeout
        )
        self._add_wait(name, depends_on, spec, key if callable(key) else None, retry, trigger)

    def child(
        self,
        name: str,
        *,
        workflow: Workflow,
        depends_on: Iterable[str] = (),
        input: StepFunction | None = None,
        retry: Retry | None = None,
        over: str | None = None,
        max_parallel: int = 32,
        max_items: int = 10_000,
        on_item_failure: str | Tolerate = "fail",
        trigger: str = "all_success",
    ) -> None:
        """Declare a node that starts an execution of ``workflow`` with
        ``input(ctx, **upstream)`` and completes with its output (or fails with its error,
        then follows ``retry``: a retry starts a new child). ``trigger`` as for a step.

        With ``over``, a child map: one child execution per element of step ``over``'s
        output (its input ``input(ctx, item, **unmapped)``, or the item itself), at most
        ``max_parallel`` running at a time, each item following ``retry``; the output is
        the children's outputs in item order (see ``map``)."""
        where = f"workflow {self.name!r}, child {name!r}"
        if not isinstance(workflow, Workflow):
            raise DefinitionError(f"{where}: workflow must be a Workflow, got {workflow!r}")
        if input is not None and not callable(input):
            raise DefinitionError(f"{where}: input must be a function (ctx, **upstream)")
        if over is None:
            child = ChildWait(workflow=workflow, input=input)
            self._add_wait(name, depends_on, child, input, retry, trigger)
            return
        mapped = _map_spec(where, over, max_parallel, max_items, on_item_failure)
        unmapped = _unmapped(where, over, depends_on)
        upstream = (over, *unmapped)
        if input is not None:
            _check_signature(where, Step(name=name, fn=input, depends_on=upstream), mapped=True)
        self.add_step(
            Step(
                name=name,
                fn=_never_run,
                depends_on=upstream,
                retry=retry or Retry(),
                wait=replace(mapped, child=ChildWait(workflow=workflow, input=input)),
                trigger=trigger,
            )
        )

    def map(
        self,
        *,
        over: str,
        max_parallel: int = 32,
        max_items: int = 10_000,
        on_item_failure: str | Tolerate = "fail",
        depends_on: Iterable[str] = (),
        retry: Retry | None = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        name: str | None = None,
        queue: str | None = None,
        trigger: str = "all_success",
        version: int = 1,
    ) -> Callable[[StepFunction], StepFunction]:
        """Declare the decorated function ``(ctx, item, **unmapped)`` a map step: it runs
        once per element of step ``over``'s output (``ctx.map_index`` is its index), at
        most ``max_parallel`` at a time, each item with its own ``retry`` and time
        limits; dependents receive the items' outputs as a list in item order.

        ``on_item_failure="fail"``: the first item that fails after its retries fails
        the map and cancels the items not finished; ``Tolerate(max_failed=N or
        fraction)``: failed items give ``None`` at their index while under the limit.
        Other ``depends_on`` steps reach every item unmapped, as keyword arguments.
        With ``queue``, the items run only on workers consuming that broker queue;
        ``trigger`` as for a step; a map whose ``over`` step did not succeed is skipped
        (there is no list to map); ``version`` as for a step."""

        def register(fn: StepFunction) -> StepFunction:
            step_name = name or fn.__name__
            where = f"workflow {self.name!r}, map {step_name!r}"
            _check_queue(where, queue)
            _check_step_version(where, version)
            spec = _map_spec(where, over, max_parallel, max_items, on_item_failure)
            unmapped = _unmapped(where, over, depends_on)
            self.add_step(
                Step(
                    name=step_name,
                    fn=fn,
                    depends_on=(over, *unmapped),
                    retry=retry or Retry(),
                    soft_timeout=soft_timeout,
                    timeout=timeout,
                    wait=spec,
                    queue=queue,
                    trigger=trigger,
                    version=version,
                )
            )
            return fn

        return register

    def _add_wait(
        self,
        name: str,
        depends_on: Iterable[str],
        wait: Wait,
        function: StepFunction | None,
        retry: Retry | None,
        trigger: str = "all_success",
    ) -> None:
        if isinstance(depends_on, str):
            raise DefinitionError(
                f"workflow {self.name!r}, step {name!r}: depends_on takes a list of step "
                f"names, got the string {depends_on!r}"
            )
        self.add_step(
            Step(
                name=name,
                fn=function or _never_run,
                depends_on=tuple(depends_on),
                retry=retry or Retry(),
                wait=wait,
                trigger=trigger,
            )
        )

    @property
    def wait_nodes(self) -> frozenset[str]:
        """The names of the steps that enter ``waiting`` when released: waits (sleeps,
        event waits, children, maps) and task steps behind limits (admitted there)."""
        if self._wait_nodes is None:
            self._wait_nodes = frozenset(
                n for n, s in self.steps.items() if s.wait_kind is not None
            )
        return self._wait_nodes

    @property
    def limited(self) -> bool:
        """Whether any limit applies to this workflow's executions or steps."""
        return bool(self.limits) or any(s.limits for s in self.steps.values())

    @property
    def map_nodes(self) -> frozenset[str]:
        """The names of the map steps."""
        return frozenset(n for n, s in self.steps.items() if isinstance(s.wait, MapSpec))

    def queue_of(self, step_name: str, default: str | None = None) -> str:
        """The broker queue step ``step_name``'s messages go to: its own, else this
        workflow's, else ``default`` (by default ``CONVEYOR_DEFAULT_QUEUE``)."""
        own = self.steps[step_name].queue or self.queue
        if own is not None:
            return own
        return default if default is not None else get_settings().default_queue

    @property
    def routed(self) -> bool:
        """Whether the workflow or any of its steps names a queue: one that does not
        goes wholly to the default queue, and its workers need not look further."""
        # Asked on every step completion: computed once per shape of the DAG.
        if self._routed is None:
            steps = self.steps.values()
            self._routed = self.queue is not None or any(s.queue is not None for s in steps)
        return self._routed

    @property
    def gated(self) -> frozenset[str]:
        """The names of the steps released through core.conditions (``Step.gated``)."""
        if self._gated is None:
            self._gated = frozenset(n for n, s in self.steps.items() if s.gated)
        return self._gated

    def task_downstream(self, name: str) -> list[str]:
        """``downstream(name)`` without its wait nodes and gated steps: what a completion
        queues."""
        apart = self.wait_nodes | self.gated
        return (
            [n for n in self.downstream(name) if n not in apart] if apart else self.downstream(name)
        )

    def wait_downstream(self, name: str) -> list[str]:
        """The wait nodes directly downstream of ``name`` (gated ones apart)."""
        waits = self.wait_nodes
        if not waits:
            return []
        gated = self.gated
        return [n for n in self.downstream(name) if n in waits and n not in gated]

    def gated_downstream(self, name: str) -> list[str]:
        """The gated steps directly downstream of ``name``."""
        gated = self.gated
        return [n for n in self.downstream(name) if n in gated] if gated else []

    def child_workflows(self) -> list[Workflow]:
        """The workflows this one starts as children, directly."""
        found: list[Workflow] = []
        for step in self.steps.values():
            if isinstance(step.wait, ChildWait):
                found.append(step.wait.workflow)
            elif isinstance(step.wait, MapSpec) and step.wait.child is not None:
                found.append(step.wait.child.workflow)
        return found

    def event_schemas(self) -> dict[str, type[BaseModel] | None]:
        """Each event this workflow waits for, with its payload schema."""
        return {
            s.wait.event: s.wait.schema
            for s in self.steps.values()
            if isinstance(s.wait, EventWait)
        }

    def add_step(self, step: Step) -> None:
        """Add a step, refusing anything that would make the definition invalid."""
        where = f"workflow {self.name!r}, step {step.name!r}"
        if not step.name.isidentifier():
            raise DefinitionError(f"{where}: a step name must be a Python identifier")
        if step.name in self.steps:
            raise DefinitionError(f"{where}: a step of this name is already defined")
        for dependency in step.depends_on:
            if not isinstance(dependency, str):
                raise DefinitionError(f"{where}: depends_on holds {dependency!r}, not a step name")
        if step.name in step.depends_on:
            raise DefinitionError(f"{where}: a step cannot depend on itself")
        # A step waits for as many completions as it names upstream steps, and each
        # upstream step completes once: a repeated name would leave it pending forever.
        repeated = sorted({d for d in step.depends_on if step.depends_on.count(d) > 1})
        if repeated:
            raise DefinitionError(f"{where}: depends on {', '.join(repeated)} more than once")
        # Dependencies may be declared later in the module: unknown names and cycles are
        # found by validate(), which registration runs.
        if (
            step.timeout is not None
            and step.soft_timeout is not None
            and step.soft_timeout >= step.timeout
        ):
            raise DefinitionError(f"{where}: soft_timeout must be below timeout")
        if isinstance(step.wait, MapSpec) and step.wait.child is None:
            _check_signature(where, step, mapped=True)
        elif step.fn is not _never_run:
            _check_signature(where, step)
        _check_condition(where, step)
        if step.retry.on_exhausted != "fail" and step.wait is not None:
            # A wait or a map ends by its own rules (on_timeout, Tolerate for items).
            raise DefinitionError(
                f'{where}: on_exhausted="skip" applies to task steps only, not to this '
                f"{step.kind} step (a map tolerates failed items with "
                "on_item_failure=Tolerate(...))"
            )
        runs = step.wait is None or (isinstance(step.wait, MapSpec) and step.wait.child is None)
        self.steps[step.name] = _with_output_adapter(where, step) if runs else step
        self._children_map = None
        self._sinks = None
        self._wait_nodes = None
        self._routed = None
        self._gated = None
        self._shape = None

    def validate(self, max_child_depth: int = MAX_CHILD_DEPTH) -> None:
        """Check the whole DAG: at least one step, known dependencies, no cycles; child
        workflows that start no cycle and nest at most ``max_child_depth`` deep."""
        if not self.steps:
            raise DefinitionError(f"workflow {self.name!r} has no steps")
        for step in self.steps.values():
            unknown = [d for d in step.depends_on if d not in self.steps]
            if unknown:
                raise DefinitionError(
                    f"workflow {self.name!r}, step {step.name!r}: depends on unknown step(s) "
                    f"{', '.join(unknown)}"
                )
        try:
            tuple(self.order())
        except CycleError as cycle:
            path = " -> ".join(cycle.args[1])
            raise DefinitionError(f"workflow {self.name!r} has a cycle: {path}") from None
        self._check_children((self.name,), max_child_depth)

    def _check_children(self, path: tuple[str, ...], max_depth: int) -> None:
        """Refuse workflows that start themselves (directly or not) as children, and
        nesting deeper than ``max_depth``."""
        for child in self.child_workflows():
            chain = (*path, child.name)
            if child.name in path:
                raise DefinitionError(
                    f"workflow {path[0]!r}: child workflows form a cycle: {' -> '.join(chain)}"
                )
            if len(chain) - 1 > max_depth:
                raise DefinitionError(
                    f"workflow {path[0]!r}: child workflows nest deeper than "
                    f"{max_depth} levels: {' -> '.join(chain)}"
                )
            child._check_children(chain, max_depth)

    def order(self) -> Iterable[str]:
        """Step names in an order where every step follows its dependencies."""
        graph = {name: set(step.depends_on) for name, step in self.steps.items()}
        return TopologicalSorter(graph).static_order()

    def upstream(self, name: str) -> tuple[str, ...]:
        """Steps ``name`` depends on directly."""
        return self.steps[name].depends_on

    def upstream_map(self) -> dict[str, tuple[str, ...]]:
        """Each step's direct dependencies, by step name."""
        return {name: step.depends_on for name, step in self.steps.items()}

    def downstream(self, name: str) -> list[str]:
        """Steps that depend directly on ``name``."""
        return self._children().get(name, [])

    def _children(self) -> dict[str, list[str]]:
        # Asked on every step completion: build the map once per shape of the DAG.
        if self._children_map is None:
            children: dict[str, list[str]] = {name: [] for name in self.steps}
            for step in self.steps.values():
                for parent in step.depends_on:
                    children.setdefault(parent, []).append(step.name)
            self._children_map = children
        return self._children_map

    def descendants(self, name: str) -> list[str]:
        """Every step that depends on ``name``, directly or not."""
        found: list[str] = []
        frontier = [name]
        while frontier:
            for child in self.downstream(frontier.pop()):
                if child not in found:
                    found.append(child)
                    frontier.append(child)
        return found

    @property
    def sinks(self) -> list[str]:
        """Steps nothing depends on: their outputs make the execution's output."""
        # Asked on every completion of a sink: computed once per shape of the DAG.
        if self._sinks is None:
            children = self._children()
            self._sinks = [name for name in self.steps if not children[name]]
        return self._sinks

    def validate_input(self, data: Any) -> Any:
        """The input as JSON data, checked against ``input_model``; errors list each field."""
        if self.input_model is None:
            return data
        try:
            model = self.input_model.model_validate(data)
        except ValidationError as error:
            fields: list[FieldError] = [
                {
                    "field": ".".join(str(p) for p in e["loc"]) or "(input)",
                    "message": e["msg"],
                }
                for e in error.errors(include_url=False, include_input=False)
            ]
            problems = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
            raise InputValidationError(
                f"input for workflow {self.name!r} is not valid: {problems}", fields
            ) from None
        return model.model_dump(mode="json")

    def parse_input(self, data: Any) -> Any:
        """The stored input as the step functions see it (a model instance when typed)."""
        return self.input_model.model_validate(data) if self.input_model else data


def _map_spec(
    where: str, over: str, max_parallel: int, max_items: int, on_item_failure: str | Tolerate
) -> MapSpec:
    """A map's options checked, as a MapSpec; DefinitionError naming a bad one."""
    if not isinstance(over, str) or not over:
        raise DefinitionError(f"{where}: over must name the step whose list it maps")
    for label, value in (("max_parallel", max_parallel), ("max_items", max_items)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DefinitionError(f"{where}: {label} must be an int of 1 or more")
    if max_items > MAX_MAP_ITEMS:
        raise DefinitionError(
            f"{where}: max_items={max_items:,} is above the limit of {MAX_MAP_ITEMS:,}"
        )
    if not isinstance(on_item_failure, Tolerate) and on_item_failure != "fail":
        raise DefinitionError(
            f'{where}: on_item_failure must be "fail" or Tolerate(...), got {on_item_failure!r}'
        )
    return MapSpec(over, max_parallel, max_items, on_item_failure)


def _unmapped(where: str, over: str, depends_on: Iterable[str]) -> tuple[str, ...]:
    """A map's other upstream steps (passed to each item unmapped)."""
    if isinstance(depends_on, str):
        raise DefinitionError(
            f"{where}: depends_on takes a list of step names, got the string {depends_on!r}"
        )
    return tuple(d for d in depends_on if d != over)


def _check_signature(where: str, step: Step, *, mapped: bool = False) -> None:
    try:
        parameters = list(inspect.signature(step.fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise DefinitionError(f"{where}: cannot read the function's signature") from exc
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise DefinitionError(f"{where}: the function must take the step context first")
    rest = parameters[1:]
    if mapped:
        # A map's function takes the item second; its other upstream steps by name.
        if not rest or rest[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise DefinitionError(f"{where}: the function must take (ctx, item, ...)")
        rest = rest[1:]
        step = replace(step, depends_on=step.depends_on[1:])
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest):
        return
    names = {p.name for p in rest}
    missing = [d for d in step.depends_on if d not in names]
    extra = [p.name for p in rest if p.name not in step.depends_on and p.default is p.empty]
    if missing:
        extra_names = [p.name for p in rest if p.name not in step.depends_on]
        hints = [
            f"depends_on names {name!r}: did you mean {close[0]!r}?"
            for name in missing
            for close in [difflib.get_close_matches(name, extra_names, n=1)]
            if close
        ]
        raise DefinitionError(
            f"{where}: the function needs a parameter for each upstream output "
            f"(missing: {', '.join(missing)})" + (f"; {' '.join(hints)}" if hints else "")
        )
    if extra:
        raise DefinitionError(f"{where}: parameters {', '.join(extra)} are not upstream steps")


def _with_output_adapter(where: str, step: Step) -> Step:
    try:
        hints: Mapping[str, Any] = get_type_hints(step.fn)
    except Exception:  # unresolved forward references: checked at run time instead
        hints = {}
    annotation = hints.get("return", NO_ANNOTATION)
    if annotation is NO_ANNOTATION or annotation is None or annotation is type(None):
        return step
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        schema = adapter.json_schema(mode="serialization")
    except (PydanticSchemaGenerationError, TypeError) as exc:
        raise DefinitionError(
            f"{where}: its return type {annotation!r} cannot be stored as JSON"
        ) from exc
    # Bytes would be stored decoded as UTF-8 text: any other bytes fail when the step
    # returns, and a NUL byte is refused; sets (stored as lists), models, dataclasses and
    # dates convert to JSON as pydantic dumps them.
    if _holds_bytes(schema):
        raise DefinitionError(
            f"{where}: its return type {annotation!r} holds bytes, which JSON cannot hold; "
            "return text (for example base64) instead"
        )
    return replace(step, output=adapter)


def _check_step_version(where: str, version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DefinitionError(f"{where}: version must be an int of at least 1, got {version!r}")


def _check_queue(where: str, queue: Any) -> None:
    """DefinitionError naming ``where`` unless ``queue`` is None or a queue name."""
    if queue is None:
        return
    if not isinstance(queue, str) or not queue.strip() or len(queue) > MAX_QUEUE_NAME:
        raise DefinitionError(
            f"{where}: queue must be a non-empty name of at most {MAX_QUEUE_NAME} "
            f"characters, got {queue!r}"
        )


def _holds_bytes(schema: Any) -> bool:
    """Whether a JSON Schema (pydantic's, of a return type) has bytes anywhere in it."""
    if isinstance(schema, dict):
        if schema.get("format") == "binary":
            return True
        return any(_holds_bytes(part) for part in schema.values())
    if isinstance(schema, list):
        return any(_holds_bytes(part) for part in schema)
    return False


def _check_condition(where: str, step: Step) -> None:
    """Refuse a bad ``trigger`` or ``when``, and, under a trigger that passes ``None``
    for an upstream step that did not succeed, a parameter that cannot take it."""
    if step.trigger not in TRIGGERS:
        raise DefinitionError(
            f"{where}: trigger must be one of {', '.join(TRIGGERS)}, got {step.trigger!r}"
        )
    if step.when is not None:
        if not callable(step.when):
            raise DefinitionError(f"{where}: when must be a function (ctx, **upstream)")
        try:
            parameters = list(inspect.signature(step.when).parameters.values())
        except (TypeError, ValueError) as exc:
            raise DefinitionError(f"{where}: cannot read the signature of when") from exc
        if not parameters or parameters[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise DefinitionError(f"{where}: when must take the step context first")
        # It is passed the upstream outputs it names (all of them with **upstream).
        named = [p.name for p in parameters[1:] if p.kind is not inspect.Parameter.VAR_KEYWORD]
        strangers = [n for n in named if n not in step.depends_on]
        if strangers:
            raise DefinitionError(
                f"{where}: when's parameters {', '.join(strangers)} are not upstream steps"
            )
    if step.trigger == "all_success" or step.fn is _never_run:
        return
    parameters_of = inspect.signature(step.fn).parameters
    try:
        hints: Mapping[str, Any] = get_type_hints(step.fn, include_extras=True)
    except Exception:  # unresolved forward references: read the annotations' text
        hints = {n: p.annotation for n, p in parameters_of.items()}
    # A map's item is its ``over`` step's element: a map whose list is missing is skipped.
    upstream = step.depends_on[1:] if isinstance(step.wait, MapSpec) else step.depends_on
    for name in upstream:
        if name not in parameters_of:
            continue  # taken through **upstream: nothing to check
        if not _accepts_none(hints.get(name, NO_ANNOTATION)):
            raise DefinitionError(
                f"{where}: under trigger {step.trigger!r} parameter {name!r} receives None "
                f"when step {name} does not succeed: annotate it `T | None`"
            )


def _accepts_none(annotation: Any) -> bool:
    """Whether a parameter annotated ``annotation`` is declared to take None."""
    if annotation is NO_ANNOTATION:
        return False
    if isinstance(annotation, str):  # an annotation whose names did not resolve
        return "None" in annotation or "Optional" in annotation or annotation in ("Any", "object")
    if annotation in (Any, object, None, NoneType):
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return _accepts_none(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return any(_accepts_none(arg) for arg in get_args(annotation))
    return False
