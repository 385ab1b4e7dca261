"""Random workflow definitions for property tests, with what each should do.

``dag_specs()`` draws a definition: up to ``max_steps`` steps in one of four shapes
(random DAG, a wide fan out and in, a wide fan out only, a chain), with mistakes
sprinkled in (a dependency named twice, on itself, on a step that does not exist, or
back to a later step, which makes a cycle), and the steps that raise (always, or only
on their first attempt with a second allowed). A ``DagSpec`` knows, without asking
conveyor, whether the definition must be refused and where (``refusal``), and how an
execution of it must end (``expected_statuses``, ``expected_output``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from core.workflows import Retry, Step, StepContext, Workflow

UNKNOWN = "ghost"
MISTAKES = ("repeated", "self", "unknown", "back_edge")
_names = itertools.count()


class Boom(Exception):
    """What a raising step raises."""


@dataclass(frozen=True)
class DagSpec:
    """A drawn definition: each step's dependencies (in declaration order), and which
    steps raise always (``raising``) or on their first attempt only (``flaky``)."""

    deps: Mapping[str, tuple[str, ...]]
    raising: frozenset[str]
    flaky: frozenset[str]

    def refusal(self) -> str | None:
        """Where conveyor must refuse it: 'declaration', 'registration', or None."""
        if any(len(set(d)) != len(d) or s in d for s, d in self.deps.items()):
            return "declaration"
        if any(d not in self.deps for ds in self.deps.values() for d in ds):
            return "registration"
        return "registration" if self._has_cycle() else None

    def _has_cycle(self) -> bool:
        # Depth-first search with colours, independent of graphlib (which conveyor uses).
        colour: dict[str, int] = dict.fromkeys(self.deps, 0)

        def visit(name: str) -> bool:
            colour[name] = 1
            for parent in self.deps[name]:
                if colour[parent] == 1 or (colour[parent] == 0 and visit(parent)):
                    return True
            colour[name] = 2
            return False

        return any(colour[name] == 0 and visit(name) for name in self.deps)

    def ancestors(self, name: str) -> set[str]:
        """Every step ``name`` depends on, directly or not."""
        found: set[str] = set()
        todo = list(self.deps[name])
        while todo:
            parent = todo.pop()
            if parent not in found:
                found.add(parent)
                todo.extend(self.deps[parent])
        return found

    def expected_statuses(self) -> dict[str, str]:
        """Each step's final status: skipped below a raising step, failed if it raises,
        else succeeded (a flaky step succeeds on its second attempt)."""
        return {
            name: "skipped"
            if self.ancestors(name) & self.raising
            else "failed"
            if name in self.raising
            else "succeeded"
            for name in self.deps
        }

    def expected_execution_status(self) -> str:
        """failed if any step fails, else succeeded."""
        return "failed" if "failed" in self.expected_statuses().values() else "succeeded"

    def expected_output(self) -> dict[str, int]:
        """The execution's output when it succeeds: each sink's value, a step's value
        being 1 + the sum of its upstream steps' values."""
        values: dict[str, int] = {}

        def value(name: str) -> int:
            if name not in values:
                values[name] = 1 + sum(value(parent) for parent in self.deps[name])
            return values[name]

        sinks = [s for s in self.deps if not any(s in d for d in self.deps.values())]
        return {sink: value(sink) for sink in sinks}

    def build(self, prefix: str = "drawn") -> Workflow:
        """A workflow of this definition under a name no other call gives; raises
        DefinitionError where conveyor refuses a step as it is declared."""
        workflow = Workflow(f"{prefix}_{next(_names)}")
        for name, deps in self.deps.items():
            retry = Retry(max_attempts=2, backoff=0, jitter=False) if name in self.flaky else None
            workflow.add_step(
                Step(name=name, fn=self._fn(name), depends_on=deps, retry=retry or Retry())
            )
        return workflow

    def _fn(self, name: str) -> Any:
        raising, flaky = name in self.raising, name in self.flaky

        def run(ctx: StepContext, **upstream: int) -> int:
            if raising:
                raise Boom(f"step {name} raises")
            if flaky and ctx.attempt == 1:
                raise Boom(f"step {name} raises on its first attempt")
            return 1 + sum(upstream.values())

        return run


@st.composite
def dag_specs(draw: st.DrawFn, max_steps: int = 20, mistakes: bool = True) -> DagSpec:
    """A random definition (see the module's docstring)."""
    count = draw(st.integers(1, max_steps))
    names = [f"s{i}" for i in range(count)]
    shape = draw(st.sampled_from(["random", "fan", "spread", "chain"]))
    deps: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        if shape == "chain":
            deps[name] = names[i - 1 : i]
        elif shape == "spread":
            # s0 -> every other step: as many sinks, finishing together, as steps.
            deps[name] = [] if i == 0 else [names[0]]
        elif shape == "fan":
            # s0 -> every middle step -> the last: a diamond as wide as the workflow.
            deps[name] = (
                [] if i == 0 else [names[0]] if i < count - 1 else names[1:-1] or [names[0]]
            )
        else:
            earlier = names[:i]
            deps[name] = (
                draw(st.lists(st.sampled_from(earlier), max_size=min(i, 5), unique=True))
                if earlier
                else []
            )
    if mistakes:
        for mistake in draw(st.lists(st.sampled_from(MISTAKES), max_size=2)):
            at = draw(st.sampled_from(names))
            if mistake == "repeated" and deps[at]:
                deps[at].append(draw(st.sampled_from(deps[at])))
            elif mistake == "self":
                deps[at].append(at)
            elif mistake == "unknown":
                deps[at].append(UNKNOWN)
            elif mistake == "back_edge" and names.index(at) < count - 1:
                later = draw(st.sampled_from(names[names.index(at) + 1 :]))
                if later not in deps[at]:
                    deps[at].append(later)
    raising = draw(st.sets(st.sampled_from(names), max_size=3))
    flaky = draw(st.sets(st.sampled_from(names), max_size=3)) - raising
    return DagSpec(
        deps={name: tuple(d) for name, d in deps.items()},
        raising=frozenset(raising),
        flaky=frozenset(flaky),
    )
