"""Random workflow definitions either are refused as they are defined or run every
execution to a final state, on a real Celery worker (in-process, Redis broker).

Definitions come from ``tests.helpers.dags``: repeated and self dependencies, unknown
names, cycles, diamonds, fans up to 20 wide, chains, and steps that raise always or on
their first attempt. Each accepted one is registered in the running worker's registry
under a new name and executed once: the execution, and every step, must end as the
reference expects; nothing is left pending, queued or running. Derandomized, and
``max_examples`` is kept small so that a run takes seconds on either backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from core.errors import DefinitionError
from core.executions import get_execution, get_steps
from core.models import WorkflowExecution
from core.registry import WorkflowRegistry
from core.workflows import Workflow
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, running_worker
from tests.helpers.dags import DagSpec, dag_specs
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue

FINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})


class GrowingRegistry(WorkflowRegistry):
    """A registry that takes workflows while the worker's threads look them up: each
    registration swaps in a new dict, so a lookup iterates the old one or the new one,
    never a dict that changes size under it."""

    def register(self, workflow: Workflow) -> Workflow:
        workflow.validate()
        self._workflows = {**self._workflows, (workflow.name, workflow.version): workflow}
        return workflow


@pytest.fixture
def running(database: TestDatabase, redis_url: str) -> Iterator[ConveyorCelery]:
    """An in-process worker on an app whose registry grows as the test defines."""
    app = create_app(clean_app_settings(database, redis_url), GrowingRegistry())
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "polling_interval": 0.1,
    }
    with running_worker(app) as started:
        yield started


def step_statuses(app: ConveyorCelery, execution_id: str) -> dict[str, str]:
    """Each step's status."""
    return {s.step_name: s.status for s in app.engine.manager.run(get_steps, execution_id)}


def settled(app: ConveyorCelery, execution_id: str, spec: DagSpec) -> WorkflowExecution:
    """The execution once final; fails naming its steps' statuses if it is not in 30 s."""
    deadline = time.monotonic() + 30
    while True:
        execution = app.engine.manager.run(get_execution, execution_id)
        if execution.status in FINAL:
            return execution
        if time.monotonic() > deadline:
            pytest.fail(
                f"execution {execution_id} still {execution.status} after 30 s; "
                f"steps: {step_statuses(app, execution_id)}; {spec}"
            )
        time.sleep(0.02)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Half the draws without mistakes: most then run, the rest are refused at no cost.
@given(spec=st.one_of(dag_specs(mistakes=False), dag_specs()))
@example(
    spec=DagSpec(deps={"up": (), "down": ("up", "up")}, raising=frozenset(), flaky=frozenset())
)
@example(
    spec=DagSpec(
        deps={
            "root": (),
            **{f"b{i}": ("root",) for i in range(18)},
            "join": tuple(f"b{i}" for i in range(18)),
        },
        raising=frozenset({"b3"}),
        flaky=frozenset({"b7", "join"}),
    )
)
def test_a_random_definition_is_refused_or_runs_to_its_expected_end(
    running: ConveyorCelery, spec: DagSpec
) -> None:
    expected = spec.refusal()
    try:
        workflow = spec.build("run")
        running.engine.registry.register(workflow)
    except DefinitionError:
        event("refused")
        assert expected is not None, f"refused, but a reference check accepts {spec}"
        return
    # Run what was accepted before comparing with the reference: a definition accepted
    # by mistake shows what it does to its executions (a step named twice upstream
    # left its execution running forever).
    execution_id = enqueue(workflow, None, app=running)
    execution = settled(running, execution_id, spec)
    assert expected is None, f"accepted, but a reference check refuses it ({expected}): {spec}"
    event(f"ran to {spec.expected_execution_status()}")
    statuses = step_statuses(running, execution_id)
    assert statuses == spec.expected_statuses(), spec
    assert execution.status == spec.expected_execution_status(), spec
    if execution.status == "succeeded":
        assert execution.output_data == spec.expected_output(), spec
