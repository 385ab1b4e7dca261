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

import inspect
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from graphlib import CycleError, TopologicalSorter
from typing import Any, Protocol, get_type_hints

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.errors import PydanticSchemaGenerationError

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


@dataclass(frozen=True)
class Retry:
    """How a failing step is retried: attempts, exponential backoff with jitter, filters."""

    max_attempts: int = 1
    backoff: float = 1.0
    backoff_max: float = 300.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise DefinitionError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff < 0 or self.backoff_max < 0:
            raise DefinitionError("backoff and backoff_max must not be negative")

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether ``attempt`` failing with ``error`` earns another attempt."""
        return attempt < self.max_attempts and isinstance(error, self.retry_on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after ``attempt`` failed: doubling, capped, with full jitter."""
        ceiling = min(self.backoff_max, self.backoff * 2 ** max(0, attempt - 1))
        return random.uniform(0, ceiling) if self.jitter else ceiling


StepFunction = Callable[..., Any]


@dataclass(frozen=True)
class Step:
    """One node of a workflow's DAG."""

    name: str
    fn: StepFunction
    depends_on: tuple[str, ...] = ()
    retry: Retry = field(default_factory=Retry)
    soft_timeout: float | None = None
    timeout: float | None = None
    output: TypeAdapter[Any] | None = None

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
    and, optionally, schedules (``Schedule``) on which beat runs it."""

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
    ) -> None:
        if not name or not isinstance(name, str) or len(name) > 200:
            raise DefinitionError(f"workflow name must be 1-200 characters, got {name!r}")
        if version < 1:
            raise DefinitionError(f"workflow {name!r}: version must be at least 1")
        if max_concurrency is not None and max_concurrency < 1:
            raise DefinitionError(f"workflow {name!r}: max_concurrency must be at least 1")
        self.name = name
        self.version = version
        self.input_model = input_model
        self.deadline = deadline
        self.max_concurrency = max_concurrency
        self.description = description
        self.steps: dict[str, Step] = {}
        self._children_map: dict[str, list[str]] | None = None
        self._sinks: list[str] | None = None
        # When beat runs it by itself (core.schedules); inputs checked here, at definition.
        self.schedules: tuple[Schedule, ...] = check_schedules(self, schedules)

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
    ) -> Callable[[StepFunction], StepFunction]:
        """Declare the decorated function a step of this workflow."""

        def register(fn: StepFunction) -> StepFunction:
            step_name = name or fn.__name__
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
                )
            )
            return fn

        return register

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
        _check_signature(where, step)
        self.steps[step.name] = _with_output_adapter(where, step)
        self._children_map = None
        self._sinks = None

    def validate(self) -> None:
        """Check the whole DAG: at least one step, known dependencies, no cycles."""
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


def _check_signature(where: str, step: Step) -> None:
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
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest):
        return
    names = {p.name for p in rest}
    missing = [d for d in step.depends_on if d not in names]
    extra = [p.name for p in rest if p.name not in step.depends_on and p.default is p.empty]
    if missing:
        raise DefinitionError(
            f"{where}: the function needs a parameter for each upstream output "
            f"(missing: {', '.join(missing)})"
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
    return Step(
        name=step.name,
        fn=step.fn,
        depends_on=step.depends_on,
        retry=step.retry,
        soft_timeout=step.soft_timeout,
        timeout=step.timeout,
        output=adapter,
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
