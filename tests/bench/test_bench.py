"""bench/ runs end to end at a tiny size, so that it cannot rot: every figure is produced
and sane (finite and positive, CPU figures non-negative; the burst's fractions within
[0, 1] and its rank correlation within [-1, 1]). Timings are not asserted."""

from __future__ import annotations

import importlib.util
import math
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, insert
from sqlalchemy.pool import NullPool

from bench import run
from bench.scenarios import BURST_METRICS, KeyedThroughput, LimitedChain, sane, spearman
from bench.systems import CONVEYOR_MOST_PER_KEY
from core.models import StepExecution, WorkflowExecution
from tests.conftest import TestDatabase

TINY = [
    "--repetitions", "1",
    "--chain-executions", "3",
    "--fanout-executions", "2",
    "--long-steps", "20",
    "--map-items", "60",
    "--latency-executions", "3",
    "--enqueue-executions", "20",
    "--burst-executions", "20",
    "--keys", "4",
    "--per-key", "3",
]  # fmt: skip
EXTRAS = [
    "--systems", "celery",
    "--repetitions", "1",
    "--chain-executions", "1",
    "--fanout-executions", "1",
    "--long-steps", "11",
    "--map-items",
    "--latency-executions", "1",
    "--enqueue-executions", "1",
    "--burst-executions", "2",
    "--extras", "reconciler", "overhead", "waits",
    "--reconciler-rows", "2000",
    "--overhead-calls", "20",
    "--wait-sleepers", "200",
    "--wait-due", "50",
    "--wait-events", "3",
]  # fmt: skip


@pytest.mark.timeout(600)
def test_bench_prints_every_figure_at_a_tiny_size(capsys: pytest.CaptureFixture[str]) -> None:
    results = run.benchmark(run.parse(TINY))

    figures = results.figures()
    assert sane([f for f in figures if f.scenario != "burst"]) == []
    found = {(f.scenario, f.metric, f.system) for f in figures}
    systems = ["celery", "conveyor"]
    if importlib.util.find_spec("dbos") is not None:
        systems.append("dbos")
        assert "dbos" not in results.unavailable
    for system in systems:
        for scenario in ("chain10", "chain20"):
            assert (scenario, "steps/s", system) in found
            assert (scenario, "worker cpu ms/step", system) in found
        assert ("chain20", "cpu/step vs chain10", system) in found
        assert ("latency", "enqueue->start p95 ms", system) in found
        assert ("enqueue", "executions/s", system) in found
    for metric in ("round trips/step", "transactions/step", "write xacts/step"):
        assert ("chain10", metric, "conveyor") in found
        assert ("fanout", metric, "conveyor") in found
    assert ("fanout", "steps/s", "celery") in found
    # The map line: a @wf.map of 60 items against a chord of 60, no DBOS.
    for system in ("celery", "conveyor"):
        for metric in ("steps/s", "worker cpu ms/step", "cpu/step vs chain10"):
            assert ("map60", metric, system) in found
    depth = {f.system: f.value for f in figures if f.metric == "broker depth max"}
    # At most max_parallel (32) items queued at once: the map never floods the broker,
    # while the chord publishes its whole width (the sampler may miss the peak).
    assert depth["conveyor"] <= 32, depth
    assert "dbos" not in depth

    burst = {(f.metric, f.system): f.value for f in figures if f.scenario == "burst"}
    for system in ("celery", "conveyor", "conveyor-bf"):
        for metric in BURST_METRICS:
            value = burst[(metric, system)]
            assert math.isfinite(value), (metric, system, value)
            if metric.endswith("(of run)"):
                assert 0 <= value <= 1, (metric, system, value)
            elif metric == "finish order spearman":
                assert -1 <= value <= 1, (system, value)
            else:
                assert value > 0, (metric, system, value)
    assert ("dbos", "burst") not in {(f.system, f.scenario) for f in figures}

    # Flow control, conveyor only: a limited variant against the same unlimited one.
    for scenario, metrics in (
        ("limit_chain10", LimitedChain.metrics),
        ("keys4", KeyedThroughput(4, 3).metrics),
    ):
        for metric in metrics:
            assert (scenario, metric, "conveyor") in found, (scenario, metric)
        assert {f.system for f in figures if f.scenario == scenario} == {"conveyor"}
    # No key ever above its limit of 1 (the run fails loudly otherwise).
    most = {f.metric: f.value for f in figures if f.scenario == "keys4"}
    assert most["max running per key limited"] == 1

    printed = capsys.readouterr().out
    assert "chain10    steps/s" in printed
    assert "limit_chain10 limited/unlimited steps/s" in printed
    assert "keys4         max running per key limited        conveyor 1.00" in printed
    assert "burst      finish order spearman" in printed
    assert "map60      broker depth max" in printed
    assert "dbos (not run)" in printed


def test_spearman_ranks_ties_and_reversals() -> None:
    assert spearman([0, 1, 2, 3], [10, 20, 30, 40]) == 1
    assert spearman([0, 1, 2, 3], [4, 3, 2, 1]) == -1
    assert spearman([0, 1, 2], [5, 5, 5]) == 0
    assert math.isclose(spearman([0, 1, 2, 3], [1, 1, 2, 3]), 0.9486832980505138)


@pytest.mark.timeout(600)
def test_bench_extras_run_at_a_tiny_size(capsys: pytest.CaptureFixture[str]) -> None:
    """The in-process extras use conveyor's statements and plans directly."""
    run.benchmark(run.parse(EXTRAS))

    printed = capsys.readouterr().out
    assert "reconcile_pass_seconds" in printed
    assert "transaction_us" in printed
    # The waits extra: an empty waker pass reads twice and writes nothing, sleepers send
    # no message, every due sleep is woken and its next step published.
    assert "empty_wake_pass_ms sleeping=200 via=wake_due" in printed
    assert "empty_wake_pass_statements sleeping=200 value=2.00" in printed
    assert "empty_wake_pass_writes sleeping=200 value=0.000" in printed
    assert "broker_messages_while_asleep sleeping=200 after_passes=43 value=0.000" in printed
    assert "ix_execution_steps_waiting_wake" in printed
    assert "steps_published due=50 batch=500 worker=none value=50.0" in printed
    assert "event_to_start_p50_ms system=conveyor" in printed
    assert "enqueue_to_start_p50_ms system=conveyor" in printed
    assert "producer_statements call=send_event" in printed
    assert "waits      event->start p50 ms    conveyor " in printed
    if importlib.util.find_spec("dbos") is not None:
        assert "send_to_recv_p50_ms system=dbos" in printed


def test_only_runs_the_scenarios_named() -> None:
    chosen = run.scenarios(run.parse(["--only", "limit_chain10,keys", "--keys", "7"]))
    assert [scenario.name for scenario in chosen] == ["limit_chain10", "keys7"]
    assert len(run.scenarios(run.parse(["--only", "map"]))) == 2  # every width
    with pytest.raises(SystemExit):
        run.parse(["--only", "chain10,nosuch"])


@pytest.mark.postgresql_only
def test_most_running_per_key_counts_overlapping_steps(database: TestDatabase) -> None:
    """The keys scenario's check sees two steps of a key running at once, and a slot
    handed over at the instant one finished as one."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    spans = {
        "handed-over": [(0, 2), (2, 4), (5, 6)],
        "overlapping": [(0, 3), (1, 2), (1.5, 5), (4, 6)],
    }
    engine = create_engine(database.url, poolclass=NullPool)
    ids: dict[str, list[str]] = {key: [] for key in spans}
    executions: list[dict[str, object]] = []
    steps: list[dict[str, object]] = []
    for key, intervals in spans.items():
        for index, (begin, end) in enumerate(intervals):
            execution_id = f"{key}-{index}"
            ids[key].append(execution_id)
            executions.append(
                {
                    "execution_id": execution_id,
                    "workflow_id": "bench_keyed",
                    "input_data": {"key": key, "i": index},
                    "status": "succeeded",
                }
            )
            steps.append(
                {
                    "execution_id": execution_id,
                    "step_name": "work",
                    "status": "succeeded",
                    "started_at": start + timedelta(seconds=begin),
                    "finished_at": start + timedelta(seconds=end),
                }
            )
    try:
        # Rows as the bench leaves them (finished), written as they are, not through
        # the state machine.
        with engine.begin() as connection:
            connection.execute(insert(WorkflowExecution.__table__), executions)
            connection.execute(insert(StepExecution.__table__), steps)
        with engine.connect() as connection:

            def most(execution_ids: list[str]) -> int:
                query = connection.exec_driver_sql(CONVEYOR_MOST_PER_KEY, (execution_ids, "work"))
                return int(query.scalar_one())

            assert most(ids["handed-over"]) == 1
            assert most(ids["overlapping"]) == 3
            assert most([*ids["handed-over"], *ids["overlapping"]]) == 3
            assert most(ids["handed-over"][:1]) == 1
    finally:
        engine.dispose()
