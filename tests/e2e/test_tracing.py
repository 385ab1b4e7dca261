"""Tracing on a real worker: spans of an execution's start and of each step run, one trace
across the broker, recorded by the OpenTelemetry SDK in this process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from core.registry import configure_registry
from tests.conftest import TestDatabase
from tests.e2e.conftest import clean_app_settings, e2e_registry, running_worker, wait_for
from worker.app import ConveyorCelery, create_app
from worker.producer import enqueue
from worker.tracing import Tracing


@dataclass
class Traced:
    """A running worker whose spans go to ``exported``, and the provider producers use."""

    app: ConveyorCelery
    provider: TracerProvider
    exported: InMemorySpanExporter

    def spans_of(self, execution_id: str, count: int) -> list[ReadableSpan]:
        """The execution's finished spans once there are ``count`` (a step's span ends
        just after its outcome is committed), by start time."""
        deadline = time.monotonic() + 30
        while True:
            spans = [
                s
                for s in self.exported.get_finished_spans()
                if (s.attributes or {}).get("conveyor.execution_id") == execution_id
            ]
            if len(spans) >= count or time.monotonic() > deadline:
                return sorted(spans, key=lambda s: s.start_time or 0)
            time.sleep(0.05)


@pytest.fixture(params=[0, 100], ids=["each-step-through-the-broker", "continued"])
def traced(
    request: pytest.FixtureRequest, database: TestDatabase, redis_url: str
) -> Iterator[Traced]:
    """A worker with tracing on; its steps go through the broker, or are continued."""
    settings = clean_app_settings(database, redis_url).model_copy(
        update={"tracing": True, "continue_max_steps": request.param}
    )
    registry = e2e_registry()
    configure_registry(registry)
    app = create_app(settings, registry)
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    # The process's global provider is set once; this app's spans go to its own.
    app.engine.tracing = Tracing(True, provider)
    with running_worker(app):
        yield Traced(app, provider, exported)
    provider.shutdown()


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def test_a_three_step_execution_is_one_trace_under_its_producer(traced: Traced) -> None:
    producer = traced.provider.get_tracer("tests")
    with producer.start_as_current_span("enqueue linear") as enqueuing:
        execution_id = enqueue("linear", {"start": 1}, app=traced.app)
    assert wait_for(execution_id).status == "succeeded"

    start, double, add_one, describe = traced.spans_of(execution_id, 4)
    names = [s.name for s in (start, double, add_one, describe)]
    assert names == [
        "conveyor.start linear",
        "conveyor.step linear.double",
        "conveyor.step linear.add_one",
        "conveyor.step linear.describe",
    ]
    trace_id = enqueuing.get_span_context().trace_id
    assert {s.context.trace_id for s in (start, double, add_one, describe) if s.context} == {
        trace_id
    }
    # The start message's span is the producer's child across the broker; each step's
    # is the child of the span that released it, through the broker or continued here.
    assert _parent(start) == enqueuing.get_span_context().span_id
    assert _parent(double) == _id(start)
    assert _parent(add_one) == _id(double)
    assert _parent(describe) == _id(add_one)
    assert start.kind == SpanKind.CONSUMER
    assert dict(start.attributes or {}) == {
        "conveyor.execution_id": execution_id,
        "conveyor.workflow": "linear",
        "conveyor.status": "started",
    }
    for span, step in ((double, "double"), (add_one, "add_one"), (describe, "describe")):
        assert dict(span.attributes or {}) == {
            "conveyor.execution_id": execution_id,
            "conveyor.workflow": "linear",
            "conveyor.step": step,
            "conveyor.attempt": 1,
            "conveyor.status": "succeeded",
        }
        assert span.status.status_code == StatusCode.UNSET
    continued = traced.app.engine.settings.continue_max_steps > 0
    expected = SpanKind.INTERNAL if continued else SpanKind.CONSUMER
    assert [s.kind for s in (add_one, describe)] == [expected, expected]


def test_failed_and_retried_attempts_record_their_errors(traced: Traced) -> None:
    broken = enqueue("broken", None, app=traced.app)
    flaky = enqueue("flaky", None, app=traced.app)
    assert wait_for(broken).status == "failed"
    assert wait_for(flaky).status == "succeeded"

    _, fine, explode = traced.spans_of(broken, 3)
    assert (fine.attributes or {})["conveyor.status"] == "succeeded"
    assert (explode.attributes or {})["conveyor.status"] == "failed"
    assert explode.status.status_code == StatusCode.ERROR
    assert explode.status.description == "ValueError: the data is bad"
    [event] = explode.events
    assert (event.name, (event.attributes or {})["exception.type"]) == ("exception", "ValueError")

    _, first, second, third = traced.spans_of(flaky, 4)
    statuses = [(s.attributes or {})["conveyor.status"] for s in (first, second, third)]
    assert statuses == ["retrying", "retrying", "succeeded"]
    assert [(s.attributes or {})["conveyor.attempt"] for s in (first, second, third)] == [1, 2, 3]
    # A retry's span is the child of the failed attempt that published it.
    assert _parent(second) == _id(first)
    assert _parent(third) == _id(second)
