"""Random conditional workflows run to the end a reference model predicts: random DAGs
whose steps draw a trigger, a condition that is false, an error (optional or not), on a
real Celery worker (in-process, Redis broker).

The reference walks the DAG in order: a step is skipped when its trigger refuses an
upstream outcome (all_success: any not succeeded; none_failed: any failed) or its
condition is false, else fails when it raises (skipped when it is optional), else
succeeds. The execution fails when any step failed. Derandomized and kept small, so a
run takes seconds on either backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from graphlib import TopologicalSorter
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from core.workflows import TRIGGERS, Retry, StepContext, Workflow
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, running_worker
from tests.e2e.test_random_definitions import GrowingRegistry, settled, step_statuses
from tests.helpers.dags import DagSpec
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue

_names = itertools.count()


@dataclass(frozen=True)
class ConditionalSpec:
    """A DAG (``deps``), each step's trigger, the steps whose condition is false
    (``vetoed``), those that raise (``raising``) and, of those, the optional ones."""

    deps: Mapping[str, tuple[str, ...]]
    triggers: Mapping[str, str]
    vetoed: frozenset[str]
    raising: frozenset[str]
    optional: frozenset[str]

    def expected_statuses(self) -> dict[str, str]:
        """Each step's final status, by the reference rules (see the module)."""
        found: dict[str, str] = {}
        for name in TopologicalSorter({n: set(d) for n, d in self.deps.items()}).static_order():
            upstream = [found[p] for p in self.deps[name]]
            trigger = self.triggers[name]
            refused = (trigger == "all_success" and any(u != "succeeded" for u in upstream)) or (
                trigger == "none_failed" and "failed" in upstream
            )
            if refused or name in self.vetoed:
                found[name] = "skipped"
            elif name in self.raising:
                found[name] = "skipped" if name in self.optional else "failed"
            else:
                found[name] = "succeeded"
        return found

    def build(self) -> Workflow:
        workflow = Workflow(f"conditional_{next(_names)}")
        for name, deps in self.deps.items():
            retry = Retry(max_attempts=1, on_exhausted="skip" if name in self.optional else "fail")
            vetoed = name in self.vetoed
            workflow.step(
                name,
                depends_on=deps,
                retry=retry,
                trigger=self.triggers[name],
                when=(lambda ctx, **up: False) if vetoed else None,
            )(self._fn(name))
        return workflow

    def _fn(self, name: str) -> Any:
        raising = name in self.raising

        def run(ctx: StepContext, **upstream: int | None) -> int:
            if raising:
                raise RuntimeError(f"step {name} raises")
            return 1 + sum(v or 0 for v in upstream.values())

        return run


@st.composite
def conditional_specs(draw: st.DrawFn, max_steps: int = 10) -> ConditionalSpec:
    count = draw(st.integers(1, max_steps))
    names = [f"s{i}" for i in range(count)]
    deps = {
        name: tuple(
            draw(st.lists(st.sampled_from(names[:i]), max_size=min(i, 3), unique=True)) if i else []
        )
        for i, name in enumerate(names)
    }
    raising = draw(st.sets(st.sampled_from(names), max_size=3))
    return ConditionalSpec(
        deps=deps,
        triggers={name: draw(st.sampled_from(TRIGGERS)) for name in names},
        vetoed=frozenset(draw(st.sets(st.sampled_from(names), max_size=3))),
        raising=frozenset(raising),
        optional=frozenset(draw(st.sets(st.sampled_from(sorted(raising) or names), max_size=2)))
        & frozenset(raising),
    )


@pytest.fixture
def running(database: TestDatabase, redis_url: str) -> Iterator[ConveyorCelery]:
    app = create_app(clean_app_settings(database, redis_url), GrowingRegistry())
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "polling_interval": 0.1,
    }
    with running_worker(app) as started:
        yield started


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=conditional_specs())
@example(
    # A failure two levels above an all_done join, beside a vetoed branch.
    spec=ConditionalSpec(
        deps={"a": (), "b": ("a",), "c": ("b",), "d": ("a",), "e": ("c", "d")},
        triggers={
            "a": "all_success",
            "b": "all_success",
            "c": "none_failed",
            "d": "all_success",
            "e": "all_done",
        },
        vetoed=frozenset({"d"}),
        raising=frozenset({"b"}),
        optional=frozenset(),
    )
)
def test_a_random_conditional_workflow_ends_as_the_reference_says(
    running: ConveyorCelery, spec: ConditionalSpec
) -> None:
    workflow = running.engine.registry.register(spec.build())
    execution_id = enqueue(workflow, None, app=running)
    as_dag = DagSpec(deps=spec.deps, raising=spec.raising, flaky=frozenset())
    execution = settled(running, execution_id, as_dag)
    expected = spec.expected_statuses()
    assert step_statuses(running, execution_id) == expected, spec
    assert execution.status == ("failed" if "failed" in expected.values() else "succeeded"), spec
