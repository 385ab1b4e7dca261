"""worker.tracing without a tracer: off, or opentelemetry missing, it does nothing."""

from __future__ import annotations

import logging
import sys

import pytest

from core.outcomes import Claim, Route
from worker.failures import StepFailed
from worker.tracing import Tracing

CLAIM = Claim("e-1", "load", 1, 0, Route("etl", 1, 0), None, {})


def _exercise(tracing: Tracing) -> None:
    assert tracing.headers() is None
    with tracing.received(object()), tracing.step_span(CLAIM) as span:
        span.set("conveyor.status", "succeeded")
        span.outcome(StepFailed("e-1", "etl", "load", 1, 1, "ValueError", "bad"))
        assert span.context is None


def test_tracing_off_is_a_no_op() -> None:
    tracing = Tracing(enabled=False)
    assert not tracing.enabled
    _exercise(tracing)


def test_tracing_on_without_opentelemetry_warns_and_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # None in sys.modules makes `import opentelemetry` raise ImportError, as if absent.
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    caplog.set_level(logging.WARNING, logger="worker.tracing")
    tracing = Tracing(enabled=True)
    assert not tracing.enabled
    assert "opentelemetry is not installed" in caplog.text
    _exercise(tracing)


def test_a_step_failed_report_round_trips_through_pickle_and_json() -> None:
    import json
    import pickle

    report = StepFailed("e-1", "etl", "load", 1, 3, "ValueError", "bad row", 0.5)
    again = pickle.loads(pickle.dumps(report))
    assert (again.step, again.retry_in, str(again)) == ("load", 0.5, str(report))
    assert json.loads(json.dumps(report.args)) == list(report.args)
    assert str(report) == (
        "step load of execution e-1 (workflow etl) failed on attempt 1/3: ValueError: bad row; "
        "will retry, attempt 2/3 in 0.50s"
    )
