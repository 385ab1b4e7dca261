"""A reconciler pass over a large table (PostgreSQL).

Finished executions (three finished steps each) are bulk-loaded with ``INSERT ...
SELECT generate_series``, in stages (e.g. 100,000 then 1,000,000 rows), and at each
stage, after ``VACUUM ANALYZE``:

- the plan of each of the reconciler's scans is printed in one line (node types and
  indexes, Seq Scans counted) with its ``EXPLAIN ANALYZE`` time, to show that the
  partial indexes serve them;
- a pass with work is timed: a few hundred rows of each kind a pass handles (stalled
  running steps with attempts left and without, queued steps never picked up, due
  retries, pending executions never started, executions past their deadline, running
  executions whose steps are all final), seeded afresh before each pass;
- an idle pass (nothing to do) is timed: its cost should not grow with the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import ClauseElement, Connection, Engine, text

from bench import workflows
from bench.harness import (
    Services,
    SqlCounter,
    bench_settings,
    conveyor_app,
    conveyor_database,
    emit,
    flush_redis,
    median,
    note,
    state_engine,
)
from core import statements as sql
from core.config import Settings
from core.outcomes import ReconcileReport
from core.reconciler import outage_gap
from worker.app import ConveyorCelery

WORKER = "bench-host:1"
KINDS = ("stalled", "stalled_spent", "unclaimed", "retry_due", "pending", "overdue", "finishable")

# Finished executions: mostly succeeded, some failed, cancelled and timed out; a third
# had a deadline (finished, so outside the partial deadline index).
SEED_FINISHED = text(
    """
    WITH executions AS (
        INSERT INTO workflow_executions (
            execution_id, workflow_id, workflow_version, input_data, output_data, error,
            status, previous_status, attempt, priority, started_at, finished_at,
            deadline_at, created_at, updated_at)
        SELECT
            gen_random_uuid()::text, 'bench_done', 1, jsonb_build_object('i', g),
            CASE WHEN g % 20 = 0 THEN NULL ELSE jsonb_build_object('load', g) END,
            CASE WHEN g % 20 = 0
                THEN '{"step": "load", "type": "ValueError", "message": "bad row"}'::jsonb
            END,
            CASE WHEN g % 20 = 0 THEN 'failed'
                 WHEN g % 50 = 1 THEN 'cancelled'
                 WHEN g % 50 = 2 THEN 'timed_out'
                 ELSE 'succeeded' END,
            'running', 1, g % 10,
            t.created + interval '1 second', t.created + interval '3 seconds',
            CASE WHEN g % 3 = 0 THEN t.created + interval '1 hour' END,
            t.created, t.created + interval '3 seconds'
        FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS g
        CROSS JOIN LATERAL (
            SELECT now() - interval '30 days' + g * interval '2 seconds' AS created
        ) AS t
        RETURNING execution_id, status, created_at
    )
    INSERT INTO execution_steps (
        execution_id, step_name, status, previous_status, attempt, max_attempts,
        unmet_deps, output_data, worker, queued_at, started_at, finished_at, heartbeat_at,
        created_at, updated_at)
    SELECT
        e.execution_id, s.name,
        CASE WHEN e.status = 'succeeded' OR s.position = 0 THEN 'succeeded'
             WHEN e.status = 'failed' AND s.position = 2 THEN 'failed'
             WHEN e.status = 'failed' THEN 'succeeded'
             ELSE 'cancelled' END,
        'running', 1, 1, 0, jsonb_build_object('rows', s.position), 'bench-host:0',
        e.created_at, e.created_at, e.created_at + interval '3 seconds',
        e.created_at + interval '2 seconds', e.created_at, e.created_at + interval '3 seconds'
    FROM executions AS e
    CROSS JOIN (VALUES ('extract', 0), ('transform', 1), ('load', 2)) AS s(name, position)
    """
)

# The work a pass finds: ``per_kind`` executions of ``bench_work`` of each kind.
SEED_WORK = text(
    """
    WITH executions AS (
        INSERT INTO workflow_executions (
            execution_id, workflow_id, workflow_version, input_data, status,
            previous_status, attempt, priority, started_at, deadline_at, created_at,
            updated_at)
        SELECT
            gen_random_uuid()::text, 'bench_work', 1, jsonb_build_object('kind', k.kind),
            CASE WHEN k.kind = 'pending' THEN 'pending' ELSE 'running' END,
            CASE WHEN k.kind = 'pending' THEN NULL ELSE 'pending' END,
            1, 0,
            CASE WHEN k.kind <> 'pending' THEN now() - interval '2 hours' END,
            CASE WHEN k.kind = 'overdue' THEN now() - interval '1 minute'
                 ELSE now() + interval '1 day' END,
            now() - interval '2 hours', now() - interval '2 hours'
        FROM unnest(CAST(:kinds AS text[])) AS k(kind)
        CROSS JOIN generate_series(1, CAST(:per_kind AS integer)) AS g
        RETURNING execution_id, input_data ->> 'kind' AS kind
    ), plan AS (
        SELECT
            e.execution_id, e.kind, s.name, s.position,
            e.kind = 'finishable' AS done,
            s.position = 0 AND e.kind IN ('stalled', 'stalled_spent', 'overdue') AS running,
            s.position = 0 AND e.kind IN ('unclaimed', 'retry_due') AS queued
        FROM executions AS e
        CROSS JOIN (VALUES ('extract', 0), ('transform', 1), ('load', 2)) AS s(name, position)
    )
    INSERT INTO execution_steps (
        execution_id, step_name, status, previous_status, attempt, max_attempts,
        unmet_deps, worker, queued_at, started_at, finished_at, heartbeat_at,
        next_attempt_at, created_at, updated_at)
    SELECT
        execution_id, name,
        CASE WHEN done THEN 'succeeded' WHEN running THEN 'running'
             WHEN queued THEN 'queued' ELSE 'pending' END,
        NULL, 1,
        CASE WHEN kind = 'stalled_spent' THEN 1 ELSE 3 END,
        CASE WHEN done OR position = 0 THEN 0 ELSE 1 END,
        CASE WHEN running THEN :worker END,
        CASE WHEN done OR running OR queued THEN now() - interval '2 hours' END,
        CASE WHEN done OR running THEN now() - interval '2 hours' END,
        CASE WHEN done THEN now() - interval '1 hour' END,
        CASE WHEN running AND kind = 'overdue' THEN now()
             WHEN running THEN now() - interval '1 hour' END,
        CASE WHEN queued AND kind = 'retry_due' THEN now() - interval '1 minute' END,
        now() - interval '2 hours', now()
    FROM plan
    """
)

CLEAR_WORK = text("DELETE FROM workflow_executions WHERE workflow_id = 'bench_work'")

# Executions a pass left running with no step queued or running: nothing will move them.
STRANDED = text(
    """
    SELECT count(*) FROM workflow_executions AS e
    WHERE e.workflow_id = 'bench_work' AND e.status = 'running'
      AND NOT EXISTS (
          SELECT 1 FROM execution_steps AS s
          WHERE s.execution_id = e.execution_id AND s.status IN ('queued', 'running'))
    """
)

SEED_LIVENESS = text(
    """
    INSERT INTO database_liveness (id, last_seen_at, reachable_since)
    VALUES (1, clock_timestamp(), clock_timestamp() - interval '1 hour')
    ON CONFLICT (id) DO UPDATE
    SET last_seen_at = excluded.last_seen_at, reachable_since = excluded.reachable_since
    """
)

# Each scan of a pass, and the indexes that keep it proportional to the open work: the
# partial ones (only running or queued steps, only open executions with a deadline), or
# the one led by status. Both partial indexes on running steps hold the same rows.
RUNNING_STEPS = {"ix_execution_steps_running_heartbeat", "ix_execution_steps_running_worker"}
GOOD_INDEXES = {
    "stalled_steps": RUNNING_STEPS,
    "due_queued_steps": {"ix_execution_steps_queued_due"},
    "due_starts": {"ix_workflow_executions_status_created"},
    "waiting_workflows": {
        "ix_workflow_executions_status_created",
        "ix_workflow_executions_workflow_status",
    },
    "overdue_executions": {"ix_workflow_executions_open_deadline"},
    "finishable_executions": {"ix_workflow_executions_status_created"},
    "worker_heartbeat": RUNNING_STEPS,
}


def _scans(settings: Settings) -> dict[str, ClauseElement]:
    batch = settings.reconcile_batch
    return {
        "stalled_steps": sql.stalled_steps(
            settings.stall_timeout,
            outage_gap(settings.stall_timeout, settings.reconcile_interval),
            batch,
        ),
        "due_queued_steps": sql.due_queued_steps(settings.republish_after, batch),
        "due_starts": sql.due_starts(settings.start_after, batch),
        "waiting_workflows": sql.waiting_workflows(settings.start_after, batch),
        "overdue_executions": sql.overdue_executions(batch),
        "finishable_executions": sql.finishable_executions(batch),
        "worker_heartbeat": sql.heartbeat(WORKER),
    }


# --- seeding ----------------------------------------------------------------------------


def _seed_finished(engine: Engine, first: int, last: int) -> None:
    with engine.begin() as connection:
        # Bulk load: skip the per-row foreign-key triggers (the rows are consistent).
        connection.execute(text("SET LOCAL session_replication_role = replica"))
        connection.execute(SEED_FINISHED, {"first": first, "last": last})


def _vacuum_analyze(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE workflow_executions, execution_steps"))
        # Write the load out now, not during the timed passes.
        connection.execute(text("CHECKPOINT"))


def _reseed_work(engine: Engine, per_kind: int) -> None:
    with engine.begin() as connection:
        connection.execute(CLEAR_WORK)
        connection.execute(
            SEED_WORK, {"kinds": list(KINDS), "per_kind": per_kind, "worker": WORKER}
        )
        # Passes have seen the database for an hour: the stalled rows are judged stalled.
        connection.execute(SEED_LIVENESS)


def _clear_work(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(CLEAR_WORK)


# --- plans ------------------------------------------------------------------------------


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _describe(node: dict[str, Any]) -> str:
    kind = str(node["Node Type"]).replace(" ", "")
    if node.get("Join Type", "Inner") != "Inner":
        kind = f"{kind}[{node['Join Type']}]"
    target = node.get("Index Name") or node.get("Relation Name")
    return f"{kind}({target})" if target else kind


def _explain(connection: Connection, statement: ClauseElement) -> dict[str, Any]:
    compiled = statement.compile(
        dialect=connection.dialect, compile_kwargs={"render_postcompile": True}
    )
    result = connection.exec_driver_sql(
        f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {compiled.string}", compiled.params
    )
    document = result.scalar_one()
    return dict(document[0])


def explain_scans(engine: Engine, settings: Settings, rows: int) -> None:
    """Print each scan's plan in one line, its index check and its EXPLAIN ANALYZE time."""
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            for name, statement in _scans(settings).items():
                explained = _explain(connection, statement)
                nodes = list(_nodes(explained["Plan"]))
                indexes = {str(n["Index Name"]) for n in nodes if n.get("Index Name")}
                seq_scans = sum(1 for n in nodes if n["Node Type"] == "Seq Scan")
                emit(
                    "reconcile_scan_ms",
                    float(explained["Execution Time"]),
                    rows=rows,
                    scan=name,
                    plan=">".join(_describe(n) for n in nodes),
                    seq_scans=seq_scans,
                    index_ok="yes" if indexes & GOOD_INDEXES[name] else "NO",
                )
        finally:
            transaction.rollback()  # the heartbeat UPDATE was run by EXPLAIN ANALYZE


# --- passes -----------------------------------------------------------------------------


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def time_passes(
    app: ConveyorCelery, rows: int, per_kind: int, repeats: int, broker_url: str
) -> None:
    """Median seconds of passes with work and of idle passes."""
    engine = state_engine()
    work = per_kind * len(KINDS)
    # A first pass, counted and not timed: what a pass with work sends and finds.
    _reseed_work(engine, per_kind)
    with SqlCounter().counting(engine) as counted:
        report = app.engine.reconcile()
    _report_first_pass(report, counted, rows, work, engine)
    with_work: list[float] = []
    for _ in range(repeats):
        flush_redis(broker_url)
        _reseed_work(engine, per_kind)
        with_work.append(_timed(app.engine.reconcile))
    flush_redis(broker_url)
    _clear_work(engine)
    idle = [_timed(app.engine.reconcile) for _ in range(repeats)]
    emit("reconcile_pass_seconds", median(with_work), rows=rows, work=work, part="pass")
    emit("reconcile_pass_seconds", median(idle), rows=rows, work=0, part="pass")


def _report_first_pass(
    report: ReconcileReport, counted: SqlCounter, rows: int, work: int, engine: Engine
) -> None:
    found = {
        "requeued": len(report.requeued),
        "stalled_failed": len(report.stalled_failed),
        "republished": len(report.republish),
        "started": len(report.start),
        "timed_out": len(report.timed_out),
        "finished": len(report.finished),
    }
    note("first pass found: " + ", ".join(f"{k}={v}" for k, v in found.items()))
    emit("reconcile_pass_statements", counted.statements, rows=rows, work=work)
    emit("reconcile_pass_commits", counted.commits, rows=rows, work=work)
    with engine.connect() as connection:
        stranded = int(connection.execute(STRANDED).scalar_one())
    emit("reconcile_stranded_executions", stranded, rows=rows, work=work)


def reconciler(running: Services, stages: list[int], per_kind: int, repeats: int) -> None:
    """Load finished executions stage by stage; at each stage, explain and time passes."""
    url = conveyor_database(running, "bench_reconciler")
    settings = bench_settings(url, running.broker_url)
    with conveyor_app(settings, workflows.registry()) as app:
        engine = state_engine()
        loaded = 0
        for rows in stages:
            started = time.perf_counter()
            _seed_finished(engine, loaded + 1, rows)
            _vacuum_analyze(engine)
            note(
                f"reconciler: {rows} finished executions ({3 * rows} steps) loaded "
                f"(+{rows - loaded}) in {time.perf_counter() - started:.1f}s"
            )
            loaded = rows
            _reseed_work(engine, per_kind)
            explain_scans(engine, settings, rows)
            time_passes(app, rows, per_kind, repeats, running.broker_url)
        flush_redis(running.broker_url)
