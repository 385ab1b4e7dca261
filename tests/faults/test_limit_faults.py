"""Per-key concurrency under faults, on worker processes: a limit that holds however its
steps end (success, retry, failure for good, cancel, hard timeout, a SIGKILLed pool
process or worker), and slots that come back (``core.limits``).

The workflows are ``fault_limited`` (one step under the text key ``fault-limit``, 2 at a
time) and ``fault_limited_one`` (``fault-limit-one``, 1 at a time); each execution's
input says what its step does (``tests.faults.workflows.ACTS``). Each run of the step
logs its start and end (wall clock) to the cluster's spans log.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from core.database import get_db_session
from core.limits import key_states
from core.models import KeySlot
from tests.faults import workflows
from tests.faults.checker import (
    events_table,
    executions_table,
    key_holders_peak,
    steps_table,
    wait_until_final,
)
from tests.faults.cluster import SETTINGS, Cluster
from tests.faults.conftest import StartCluster
from worker.producer import enqueue

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(300)]

STEP = "call"
SAMPLE_SECONDS = 0.02
FINISH_TIMEOUT = 90.0
STALL_TIMEOUT = float(SETTINGS["CONVEYOR_STALL_TIMEOUT"])
# A free slot's next waiter starts in the transaction that frees it: well within this,
# and well before a stall timeout or (test 3) a reconciler pass could have done it.
AT_ONCE = 2.0
SLOT_SWEEP_TIMEOUT = 10.0  # a few reconciler passes (one a second)
EXAMPLES = 3
COMMON_ACTS = ("succeed", "succeed", "flaky", "fail", "cancel")
RARE_ACTS = ("crash", "timeout")  # each holds its slot for seconds


@dataclass
class Sampler:
    """Samples, every ``SAMPLE_SECONDS``, a key's running count as the database counts it
    (``key_states``) and, apart, the steps of ``workflows`` running now (their rows), and
    cancels each execution of ``to_cancel`` as soon as its step runs."""

    cluster: Cluster
    key: str
    workflows: Sequence[str]
    to_cancel: set[str] = field(default_factory=set)
    counted: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    def sample(self) -> None:
        with get_db_session() as db:
            conn = db.connection()
            states = key_states(conn, [self.key])
            self.counted.append(states[0].running if states else 0)
            running = (
                select(func.count())
                .select_from(
                    steps_table.join(
                        executions_table,
                        executions_table.c.execution_id == steps_table.c.execution_id,
                    )
                )
                .where(
                    executions_table.c.workflow_id.in_(list(self.workflows)),
                    steps_table.c.step_name == STEP,
                    steps_table.c.status == "running",
                )
            )
            self.rows.append(int(conn.execute(running).scalar_one()))
            runs = []
            if self.to_cancel:
                runs = list(
                    conn.execute(
                        select(steps_table.c.execution_id).where(
                            steps_table.c.execution_id.in_(sorted(self.to_cancel)),
                            steps_table.c.status == "running",
                        )
                    ).scalars()
                )
        for execution_id in runs:
            assert self.cluster.app.engine.cancel(execution_id), f"{execution_id} not cancelled"
            self.to_cancel.discard(execution_id)
            self.cancelled.append(execution_id)

    def until_final(self, execution_ids: Collection[str], timeout: float) -> float:
        """Sample until every execution is final; the seconds it took."""
        started = time.monotonic()
        rounds = 0
        while True:
            self.sample()
            rounds += 1
            if rounds % 10 == 0 and not _open(execution_ids):
                return time.monotonic() - started
            assert time.monotonic() - started < timeout, (
                f"not final after {timeout}s: {_step_statuses(execution_ids)}"
            )
            time.sleep(SAMPLE_SECONDS)


def _open(execution_ids: Collection[str]) -> int:
    with get_db_session() as db:
        statuses = db.execute(
            select(executions_table.c.status).where(
                executions_table.c.execution_id.in_(list(execution_ids))
            )
        ).scalars()
        return sum(1 for s in statuses if s not in ("succeeded", "failed", "cancelled"))


def _step_statuses(execution_ids: Collection[str]) -> Counter[str]:
    with get_db_session() as db:
        return Counter(
            db.execute(
                select(steps_table.c.status).where(
                    steps_table.c.execution_id.in_(list(execution_ids))
                )
            ).scalars()
        )


def _step(execution_id: str) -> Any:
    with get_db_session() as db:
        return db.execute(
            select(steps_table).where(
                steps_table.c.execution_id == execution_id, steps_table.c.step_name == STEP
            )
        ).one()


def _wait_step(execution_id: str, status: str, timeout: float = 30.0) -> Any:
    """Poll until the execution's step is ``status``; its row."""
    deadline = time.monotonic() + timeout
    while (row := _step(execution_id)).status != status:
        assert time.monotonic() < deadline, f"step of {execution_id} is {row.status}"
        time.sleep(0.02)
    return row


def _key_now(key: str) -> tuple[int, int]:
    """The key's running and waiting counts now."""
    with get_db_session() as db:
        states = key_states(db.connection(), [key])
    return (states[0].running, states[0].waiting) if states else (0, 0)


def _slot_rows(key: str) -> int:
    with get_db_session() as db:
        count = db.execute(
            select(func.count()).select_from(KeySlot).where(KeySlot.key == key)
        ).scalar_one()
    return int(count)


def _wait_no_slots(key: str) -> float:
    """Poll until no ``key_slots`` row is left under ``key`` (the reconciler sweeps a
    row its holder's end left); the seconds it took."""
    started = time.monotonic()
    while _slot_rows(key):
        assert time.monotonic() - started < SLOT_SWEEP_TIMEOUT, (
            f"{_slot_rows(key)} slot row(s) left under {key} after {SLOT_SWEEP_TIMEOUT}s"
        )
        time.sleep(0.1)
    return time.monotonic() - started


@dataclass(frozen=True)
class Span:
    """One run of the limited step: its start and, unless its process died, its end."""

    execution_id: str
    attempt: int
    pid: int
    start: float
    end: float | None


def read_spans(path: Path) -> list[Span]:
    """The runs the limited step logged, in start order."""
    starts: dict[tuple[str, int, int], float] = {}
    ends: dict[tuple[str, int, int], float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            execution_id, attempt, pid, mark, at = line.split()
            found = starts if mark == "start" else ends
            found[(execution_id, int(attempt), int(pid))] = float(at)
    spans = [Span(*run, start, ends.get(run)) for run, start in starts.items()]
    return sorted(spans, key=lambda span: span.start)


def _step_events(execution_ids: Iterable[str]) -> dict[str, list[Any]]:
    """The limited step's events of each execution, in order."""
    with get_db_session() as db:
        rows = db.execute(
            select(
                events_table.c.execution_id,
                events_table.c.from_status,
                events_table.c.to_status,
                events_table.c.reason,
                events_table.c.created_at,
            )
            .where(
                events_table.c.execution_id.in_(list(execution_ids)),
                events_table.c.step_name == STEP,
            )
            .order_by(events_table.c.id)
        ).all()
    found: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        found[row.execution_id].append(row)
    return found


def _first(events: Sequence[Any], to_status: str, reason: str | None = None) -> datetime:
    """When the first of ``events`` into ``to_status`` (with ``reason``) was written."""
    for event in events:
        if event.to_status == to_status and reason in (None, event.reason):
            at: datetime = event.created_at
            return at
    raise AssertionError(f"no event into {to_status} ({reason}): {[tuple(e) for e in events]}")


def outcome_problems(acts: dict[str, str]) -> list[str]:
    """Each execution ended as its act says, its step with it; a step that succeeded
    did so once, with its output; the step's events replay to its row."""
    problems = []
    events = _step_events(acts)
    with get_db_session() as db:
        executions = {
            row.execution_id: row
            for row in db.execute(
                select(
                    executions_table.c.execution_id,
                    executions_table.c.status,
                    executions_table.c.input_data,
                ).where(executions_table.c.execution_id.in_(list(acts)))
            )
        }
        steps = {
            row.execution_id: row
            for row in db.execute(
                select(
                    steps_table.c.execution_id, steps_table.c.status, steps_table.c.output_data
                ).where(steps_table.c.execution_id.in_(list(acts)))
            )
        }
    for eid, act in acts.items():
        what = f"{act} execution {eid}"
        execution, step = executions[eid], steps[eid]
        expected = workflows.ACT_STATUS[act]
        if execution.status != expected or step.status != expected:
            problems.append(f"{what} is {execution.status}, its step {step.status}: not {expected}")
        history = events[eid]
        successes = sum(1 for event in history if event.to_status == "succeeded")
        if successes != (step.status == "succeeded"):
            problems.append(f"{what}: its step recorded {successes} successes")
        if step.status == "succeeded" and step.output_data != execution.input_data["start"]:
            problems.append(f"{what}: output {step.output_data}")
        for before, after in itertools.pairwise(history):
            if after.from_status != before.to_status:
                problems.append(
                    f"{what}: {after.from_status}->{after.to_status} after {before.to_status}"
                )
        if not history or history[-1].to_status != step.status:
            problems.append(f"{what}: its events do not replay to {step.status}")
    return problems


# --- 1. the property test --------------------------------------------------------------


def _enqueue_acts(cluster: Cluster, acts: Sequence[tuple[str, str, float]]) -> dict[str, str]:
    """One execution per (workflow, act, seconds); their ids with their acts, in order."""
    return {
        enqueue(workflow, {"start": n, "act": act, "seconds": seconds}, app=cluster.app): act
        for n, (workflow, act, seconds) in enumerate(acts)
    }


def test_a_key_never_runs_more_than_its_limit_however_its_steps_end(
    start_cluster: StartCluster,
) -> None:
    """Three worker processes (6 pool processes) run mixes of 20-35 executions of one
    step under ``Concurrency(key="fault-limit", limit=2)``, drawn by hypothesis: steps that
    succeed, fail then succeed on retry, fail for good, run until cancelled, exceed their
    hard timeout, or SIGKILL their own pool process. Sampled every 20 ms, the database's
    running count and the running rows never exceed 2; the events agree; at rest every
    execution ended as its act says, the count is 0 and no slot row is left."""
    cluster = start_cluster()
    cluster.wait_ready(cluster.spawn_worker())
    key, workflow = workflows.LIMIT_KEY, workflows.limited.name
    report: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # a shrink would re-run whole mixes
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run_mix(data: st.DataObject) -> None:
        common = data.draw(st.lists(st.sampled_from(COMMON_ACTS), min_size=18, max_size=30))
        rare = data.draw(st.lists(st.sampled_from(RARE_ACTS), min_size=2, max_size=5))
        order = data.draw(st.permutations(common + rare))
        seconds = data.draw(
            st.lists(st.sampled_from((0.05, 0.2)), min_size=len(order), max_size=len(order))
        )
        acts = _enqueue_acts(
            cluster, [(workflow, act, nap) for act, nap in zip(order, seconds, strict=True)]
        )
        sampler = Sampler(cluster, key, [workflow], {e for e, a in acts.items() if a == "cancel"})
        took = sampler.until_final(acts, FINISH_TIMEOUT)
        at_rest = _key_now(key)
        rows_at_rest = _slot_rows(key)
        swept_in = _wait_no_slots(key)
        peak = key_holders_peak(acts, STEP)
        figures = {
            "acts": dict(Counter(acts.values())),
            "samples": len(sampler.counted),
            "max counted": max(sampler.counted),
            "max running rows": max(sampler.rows),
            "max holders from events": peak,
            "slot rows at rest": rows_at_rest,
            "seconds to sweep": round(swept_in, 1),
            "seconds to finish": round(took, 1),
        }
        report.append(str(figures))
        print(f"\nlimit mix: {figures}")
        assert max(sampler.counted) <= workflows.LIMIT, figures
        assert max(sampler.rows) <= workflows.LIMIT, figures
        assert peak <= workflows.LIMIT, figures
        # The limit bound: the sampler saw the key full (it measured something).
        assert max(sampler.counted) == workflows.LIMIT, figures
        assert at_rest == (0, 0), figures
        problems = outcome_problems(acts)
        assert not problems, "\n".join(problems)

    run_mix()
    drift = cluster.log_count("outlived its holder")
    print(f"\nslots the reconciler freed as drift: {drift}")
    assert len(report) == EXAMPLES


# --- 2. a SIGKILLed worker holding the slot --------------------------------------------


def test_a_sigkilled_worker_holding_the_only_slot_gives_it_back_after_the_stall_timeout(
    start_cluster: StartCluster,
) -> None:
    """A's step holds the only slot of ``fault-limit-one`` (held on the gate) when its
    worker's main process is SIGKILLed (its pool dies with it); B's step waits for the
    key. After the stall timeout the reconciler recovers A's step (back to waiting,
    admitted again); both finish, one at a time: no run of B overlaps a run of A that
    held the slot, and the key's count returns to 0."""
    cluster = start_cluster()
    key, workflow = workflows.ONE_KEY, workflows.limited_one.name
    cluster.gate.touch()
    (a,) = _enqueue_acts(cluster, [(workflow, "hold", 0.3)])
    held = _wait_step(a, "running")
    (b,) = _enqueue_acts(cluster, [(workflow, "succeed", 0.3)])
    assert _wait_step(b, "waiting").wait_key == key
    pid = int(held.worker.rsplit(":", 1)[1])
    (victim,) = [worker for worker in cluster.workers if pid in worker.children()]
    killed_at = time.time()
    cluster.kill_worker(victim)
    cluster.gate.unlink()  # A's first run died with the pool: the gate holds nothing now
    sampler = Sampler(cluster, key, [workflow])
    took = sampler.until_final([a, b], FINISH_TIMEOUT)
    events = _step_events([a, b])
    spans = read_spans(cluster.spans_log)
    by_run = {(span.execution_id, span.attempt): span for span in spans}
    path = [(e.from_status, e.to_status) for e in events[a]]
    assert ("running", "queued") in path, path
    recovery = path.index(("running", "queued"))
    recovered_at: datetime = events[a][recovery].created_at
    figures = {
        "max counted": max(sampler.counted),
        "max running rows": max(sampler.rows),
        "seconds from the kill to the recovery": round(recovered_at.timestamp() - killed_at, 1),
        "runs (A/B, attempt, start and end after the kill)": [
            (
                "A" if s.execution_id == a else "B",
                s.attempt,
                round(s.start - killed_at, 2),
                None if s.end is None else round(s.end - killed_at, 2),
            )
            for s in spans
        ],
        "seconds to finish": round(took, 1),
    }
    print(f"\nSIGKILL holding the slot: {figures}")
    problems = outcome_problems({a: "hold", b: "succeed"})
    assert not problems, "\n".join(problems)
    # A's step went running -> queued (stalled) -> waiting, then was admitted again
    # (after B, if B took the slot first).
    assert path[recovery + 1] == ("queued", "waiting"), path
    assert [e.reason for e in events[a][recovery + 2 :]].count("admitted") == 1, path
    # Recovered on the evidence of a stale heartbeat, so no sooner than the stall timeout.
    assert recovered_at.timestamp() - killed_at >= STALL_TIMEOUT - 1, figures
    # A's first run died unfinished; its second ran whole, and B's did.
    assert by_run[(a, 1)].end is None, figures
    second, other = by_run[(a, 2)], by_run[(b, 1)]
    assert second.end is not None, figures
    assert other.end is not None, figures
    assert second.end <= other.start or other.end <= second.start, figures
    # B ran only once A's first run was gone.
    assert other.start > killed_at, figures
    assert max(sampler.counted) <= 1, figures
    assert max(sampler.rows) <= 1, figures
    assert key_holders_peak([a, b], STEP) == 1
    assert _key_now(key) == (0, 0)
    _wait_no_slots(key)


# --- 3. a hard timeout and a cancel free their slot at once ----------------------------


def test_a_hard_timeout_and_a_cancel_free_their_slot_at_once(start_cluster: StartCluster) -> None:
    """Under ``fault-limit-one``: A's step runs past its hard timeout (no retry), B's
    step waits; B is admitted within ``AT_ONCE`` of A's failure. Then C's step runs until
    cancelled, D's waits; the cancel admits D within ``AT_ONCE``. The reconciler runs
    once a minute here, and no step stalls: the ends freed the slots themselves."""
    cluster = start_cluster(settings={"CONVEYOR_RECONCILE_INTERVAL": "60"})
    key, workflow = workflows.ONE_KEY, workflows.limited_one.name
    (a,) = _enqueue_acts(cluster, [(workflow, "timeout", 0.1)])
    _wait_step(a, "running")
    (b,) = _enqueue_acts(cluster, [(workflow, "succeed", 0.1)])
    assert _wait_step(b, "waiting").wait_key == key
    sampler = Sampler(cluster, key, [workflow])
    sampler.until_final([a, b], FINISH_TIMEOUT)
    events = _step_events([a, b])
    a_ran, a_failed = _first(events[a], "running"), _first(events[a], "failed")
    b_admitted = _first(events[b], "queued", "admitted")
    assert "hard timeout" in str(_step(a).error), _step(a).error

    (c,) = _enqueue_acts(cluster, [(workflow, "cancel", 0.1)])
    _wait_step(c, "running")
    (d,) = _enqueue_acts(cluster, [(workflow, "succeed", 0.1)])
    assert _wait_step(d, "waiting").wait_key == key
    assert cluster.app.engine.cancel(c)
    sampler.until_final([c, d], FINISH_TIMEOUT)
    events = _step_events([c, d])
    c_cancelled = _first(events[c], "cancelled")
    d_admitted = _first(events[d], "queued", "admitted")
    figures = {
        "seconds A ran until its failure": round((a_failed - a_ran).total_seconds(), 2),
        "seconds from A's failure to B's admission": round(
            (b_admitted - a_failed).total_seconds(), 3
        ),
        "seconds from C's cancel to D's admission": round(
            (d_admitted - c_cancelled).total_seconds(), 3
        ),
        "max counted": max(sampler.counted),
    }
    print(f"\ntimeout and cancel free their slot: {figures}")
    problems = outcome_problems({a: "timeout", b: "succeed", c: "cancel", d: "succeed"})
    assert not problems, "\n".join(problems)
    # The timeout was recorded when Celery killed the run, not found as a stall later.
    assert (a_failed - a_ran).total_seconds() < workflows.HARD_TIMEOUT + STALL_TIMEOUT, figures
    assert (b_admitted - a_failed).total_seconds() < AT_ONCE, figures
    assert (d_admitted - c_cancelled).total_seconds() < AT_ONCE, figures
    assert max(sampler.counted) <= 1, figures
    assert max(sampler.rows) <= 1, figures
    assert key_holders_peak([a, b, c, d], STEP) == 1
    assert _key_now(key) == (0, 0)
    assert _slot_rows(key) == 0  # no reconciler pass needed


# --- 4. a crash the pool notices only at the hard time limit ---------------------------


def _process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``Z``: dead, not yet reaped), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def test_a_pool_process_dead_before_its_hard_time_limit_is_a_crash_not_a_timeout(
    start_cluster: StartCluster,
) -> None:
    """A step with a hard ``timeout`` whose pool process dies (SIGKILL) while its worker's
    main process is busy (stopped here) until past the limit: Celery's time-limit timer
    fires before the pool sees the process gone, and reports TimeLimitExceeded. The step
    is a crash all the same: recovered after the stall timeout (attempt 2, one
    recovery, no error retry spent), and its execution succeeds."""
    cluster = start_cluster()
    cluster.gate.touch()
    (a,) = _enqueue_acts(cluster, [(workflows.limited_one.name, "crash", 0.1)])
    row = _wait_step(a, "running")
    pid = int(row.worker.rsplit(":", 1)[1])
    (main,) = [worker for worker in cluster.workers if pid in worker.children()]
    os.kill(main.pid, signal.SIGSTOP)
    try:
        cluster.gate.unlink()  # the step's process kills itself now
        deadline = time.monotonic() + 10
        while _process_state(pid) not in ("Z", None):
            assert time.monotonic() < deadline, f"pool process {pid} still {_process_state(pid)}"
            time.sleep(0.02)
        # The fault: the main process stays stopped until the step's hard limit passed.
        time.sleep(max(0.0, row.started_at.timestamp() + workflows.HARD_TIMEOUT + 1 - time.time()))
    finally:
        os.kill(main.pid, signal.SIGCONT)
    wait_until_final([a], FINISH_TIMEOUT)
    step = _step(a)
    logged = main.log.read_text()
    assert "Hard time limit" in logged, "the fault did not happen: no time limit fired"
    assert (step.status, step.attempt, step.recoveries) == ("succeeded", 2, 1), step.error
