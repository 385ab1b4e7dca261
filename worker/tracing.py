"""OpenTelemetry spans of execution starts and step runs (``CONVEYOR_TRACING=true``).

Needs ``pip install 'conveyor[otel]'`` and a tracer provider, configured the usual way
(the SDK's ``TracerProvider`` with an exporter, set up in a module the worker imports,
or ``opentelemetry-instrument``): conveyor creates spans through the API only. With
tracing off, or opentelemetry not installed, ``Tracing`` imports nothing and every
call is a no-op.

Spans, with attributes ``conveyor.execution_id``, ``conveyor.workflow`` and, on a step's,
``conveyor.step`` and ``conveyor.attempt``; ``conveyor.status`` is the outcome:

- ``conveyor.start <workflow>`` (CONSUMER): a start message handled: the admission
  (``started``, or ``waiting`` for a concurrency slot) and the root step run with it.
- ``conveyor.step <workflow>.<step>`` (CONSUMER, or INTERNAL when continued in the same
  task): one attempt, from its claim to its recorded outcome (``succeeded``,
  ``retrying``, ``failed``); an error is recorded on the span, with status ERROR.

Across the broker: each publish injects the current context into the message's headers
(``opentelemetry.propagate.inject``: W3C ``traceparent`` by default) and the task
extracts it as the parent of its spans. A start's span is the child of the producer's
current span (an HTTP request, your code), a step's span the child of the span that
released it (the start, its upstream step, or the failed attempt it retries), whether
that went through the broker or was continued in the same task. Messages the
reconciler re-sends start new traces.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

from core.outcomes import Claim
from worker.failures import StepFailed

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import Tracer, TracerProvider

log = logging.getLogger(__name__)

INSTRUMENTATION = "conveyor"
Attributes = Mapping[str, str | int]


class Span:
    """A span being recorded (or nothing, with tracing off)."""

    def __init__(self, span: OtelSpan | None = None) -> None:
        self._span = span

    @property
    def context(self) -> Context | None:
        """A context with this span current: the parent of what it leads to."""
        if self._span is None:
            return None
        from opentelemetry import trace

        return trace.set_span_in_context(self._span)

    def set(self, key: str, value: str | int) -> None:
        """Set an attribute."""
        if self._span is not None:
            self._span.set_attribute(key, value)

    def error(self, error: BaseException, description: str | None = None) -> None:
        """Record ``error`` on the span and mark it failed."""
        if self._span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self._span.record_exception(error)
        self._span.set_status(
            Status(StatusCode.ERROR, description or f"{type(error).__name__}: {error}")
        )

    def outcome(self, failure: StepFailed | None) -> None:
        """A step's outcome: succeeded, or its failure (retrying or final)."""
        if failure is None:
            self.set("conveyor.status", "succeeded")
            return
        self.set("conveyor.status", "retrying" if failure.retrying else "failed")
        cause = failure.__cause__
        self.error(cause or failure, f"{failure.error_type}: {failure.message}")


NO_SPAN = Span()


class Tracing:
    """Spans through OpenTelemetry's API, or nothing at all."""

    def __init__(self, enabled: bool, provider: TracerProvider | None = None) -> None:
        self._tracer: Tracer | None = None
        if not enabled:
            return
        try:
            from opentelemetry import trace
        except ImportError:
            log.warning(
                "CONVEYOR_TRACING is on but opentelemetry is not installed "
                "(pip install 'conveyor[otel]'): no spans"
            )
            return
        self._tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=provider)

    @property
    def enabled(self) -> bool:
        """Whether spans are made."""
        return self._tracer is not None

    def headers(self) -> dict[str, str] | None:
        """The current trace context as message headers (None: nothing to carry)."""
        if self._tracer is None:
            return None
        from opentelemetry import propagate

        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier or None

    @contextmanager
    def received(self, request: object) -> Iterator[None]:
        """Make the trace context a delivered message carries (Celery puts its headers on
        the task's request) the current one for the block."""
        if self._tracer is None:
            yield
            return
        from opentelemetry import context, propagate

        fields = propagate.get_global_textmap().fields
        carrier = {
            name: value for name in fields if isinstance(value := getattr(request, name, None), str)
        }
        token = context.attach(propagate.extract(carrier))
        try:
            yield
        finally:
            context.detach(token)

    @contextmanager
    def span(
        self,
        name: str,
        attributes: Attributes,
        *,
        consumer: bool = False,
        parent: Context | None = None,
    ) -> Iterator[Span]:
        """A span around the block, the current one in it: a child of ``parent`` (default:
        the current span). An exception leaving the block is recorded on it, except a
        ``StepFailed``, recorded already on its step's span."""
        if self._tracer is None:
            yield NO_SPAN
            return
        from opentelemetry.trace import SpanKind

        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.CONSUMER if consumer else SpanKind.INTERNAL,
            attributes=dict(attributes),
            record_exception=False,
            set_status_on_exception=False,
        ) as otel_span:
            span = Span(otel_span)
            try:
                yield span
            except StepFailed:
                raise
            except BaseException as error:
                span.error(error)
                raise

    def step_span(
        self, claim: Claim, parent: Context | None = None
    ) -> AbstractContextManager[Span]:
        """The span of one attempt of a claimed step (see the module's docstring)."""
        return self.span(
            f"conveyor.step {claim.route.workflow}.{claim.step_name}",
            {
                "conveyor.execution_id": claim.execution_id,
                "conveyor.workflow": claim.route.workflow,
                "conveyor.step": claim.step_name,
                "conveyor.attempt": claim.attempt,
            },
            consumer=not claim.continued,
            parent=parent,
        )

    def start_span(self, execution_id: str, workflow: str) -> AbstractContextManager[Span]:
        """The span of a start message handled."""
        return self.span(
            f"conveyor.start {workflow}",
            {"conveyor.execution_id": execution_id, "conveyor.workflow": workflow},
            consumer=True,
        )
