"""Random interleavings of the state manager's units of work keep the state invariants.

A hypothesis ``RuleBasedStateMachine`` drives a few executions of small DAGs (a chain
a -> b -> c with a deadline, a fan-out a -> b1, b2, b3 -> d limited to one running
execution at a time, and a -> s1, s2 with two sinks) through the units of work the
engine runs (``core.executions``, ``core.steps``, ``core.reconciler``): admission
within concurrency limits, claims, completions (with in-worker continuation, and two
sinks completing at once on PostgreSQL), error retries, failures, cancels, execution
retries, manual final transitions through the public state manager, deadlines,
workers dying mid-step (heartbeats moved into the past) and reconciler passes. Rules
may deliver a message twice, or speak for a worker whose attempt was taken back.
After every rule the invariants below are checked against the rows and the event
log, on both backends.

Reproducible: derandomized by default. ``CONVEYOR_HYPOTHESIS_SEED=<n>`` explores
from seed ``n`` instead, and ``CONVEYOR_HYPOTHESIS_EXAMPLES`` sets the budget.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Connection, delete, func, select, update

from core import executions, reconciler, steps
from core.enhanced_execution_state_manager import SyncEnhancedExecutionStateManager
from core.errors import InvalidTransition
from core.executions import StepSpec
from core.models import ExecutionEvent, StepExecution, WorkflowExecution
from core.outcomes import Claim, TransitionResult
from core.sql import utcnow
from core.states import EXECUTIONS, STEPS, ExecutionStatus, StepStatus
from core.workflows import Workflow
from tests.conftest import TestDatabase
from tests.helpers.race import complete_together
from tests.helpers.state import database_reachable

SE = StepExecution
WE = WorkflowExecution
EV = ExecutionEvent


# --- the workflows: each step with its upstream steps ------------------------------


@dataclass(frozen=True)
class Dag:
    """A workflow's graph, with what the engine derives from it (``core.workflows.Dag``)."""

    workflow_id: str
    parents: Mapping[str, tuple[str, ...]]
    # What the workflow's definition declares: its deadline, its max_concurrency.
    deadline: timedelta | None = None
    limit: int | None = None

    @property
    def limited(self) -> Workflow | None:
        """What admission reads of the definition: its limits (max_concurrency's key)."""
        return (
            None if self.limit is None else Workflow(self.workflow_id, max_concurrency=self.limit)
        )

    @property
    def steps(self) -> list[str]:
        return list(self.parents)

    def upstream(self, name: str) -> tuple[str, ...]:
        return self.parents[name]

    def downstream(self, name: str) -> list[str]:
        return [step for step, ups in self.parents.items() if name in ups]

    def descendants(self, name: str) -> list[str]:
        found: list[str] = []
        todo = self.downstream(name)
        while todo:
            step = todo.pop()
            if step not in found:
                found.append(step)
                todo.extend(self.downstream(step))
        return found

    @property
    def sinks(self) -> list[str]:
        return [name for name in self.parents if not self.downstream(name)]

    def specs(self, max_attempts: int) -> list[StepSpec]:
        return [StepSpec(name, len(ups), max_attempts) for name, ups in self.parents.items()]

    @property
    def graph(self) -> dict[str, list[str]]:
        return {name: list(ups) for name, ups in self.parents.items()}


CHAIN = Dag("sm-chain", {"a": (), "b": ("a",), "c": ("b",)}, deadline=timedelta(hours=1))
FAN = Dag(
    "sm-fan",
    {"a": (), "b1": ("a",), "b2": ("a",), "b3": ("a",), "d": ("b1", "b2", "b3")},
    limit=1,
)
SINKS = Dag("sm-sinks", {"a": (), "s1": ("a",), "s2": ("a",)})
# (dag, max_attempts) of each execution a run starts with.
EXECUTION_SPECS: list[tuple[Dag, int]] = [(CHAIN, 2), (FAN, 1), (FAN, 2), (SINKS, 1)]
DAGS = {dag.workflow_id: dag for dag, _ in EXECUTION_SPECS}
INDEXES = list(range(len(EXECUTION_SPECS)))
STEP_KEYS = [(i, name) for i, (dag, _) in enumerate(EXECUTION_SPECS) for name in dag.steps]
WORKERS = ["w1", "w2"]
OPERATOR_ACTIONS = ["cancel", "retry", "deadline"]
MANUAL_FINAL = [s.value for s in sorted(EXECUTIONS.final)]
MESSAGES = ["queued step", "twice", "any step", "every queued step"]

STALL_TIMEOUT = 1.0  # a heartbeat moved an hour back is stalled; live workers beat first
FINAL_EXECUTION = {s.value for s in EXECUTIONS.final}
OPEN_STEP = {s.value for s in STEPS.open}
GAVE_UP = {StepStatus.FAILED.value, StepStatus.SKIPPED.value, StepStatus.CANCELLED.value}
EXECUTION_RETRIED = "retry"  # the reason core.executions.retry_execution records
STEPS_RETRIED = "execution retried"


# --- units of work the test runs besides the engine's ------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Rows and events of the machine's executions, read in one transaction."""

    executions: dict[str, Any]
    steps: dict[tuple[str, str], Any]
    events: list[Any]


def read_state(conn: Connection, execution_ids: Sequence[str]) -> Snapshot:
    ids = list(execution_ids)
    # Whether each deadline is still ahead, on the database's clock (as the reconciler).
    ahead = WE.deadline_at > utcnow()
    execution_rows = conn.execute(
        select(
            WE.execution_id,
            WE.workflow_id,
            WE.status,
            WE.attempt,
            WE.deadline_at,
            ahead.label("deadline_ahead"),
        ).where(WE.execution_id.in_(ids))
    ).all()
    step_rows = conn.execute(
        select(
            SE.execution_id, SE.step_name, SE.status, SE.attempt, SE.unmet_deps, SE.output_data
        ).where(SE.execution_id.in_(ids))
    ).all()
    events = conn.execute(
        select(EV.id, EV.execution_id, EV.step_name, EV.from_status, EV.to_status)
        .add_columns(EV.attempt, EV.reason)
        .where(EV.execution_id.in_(ids))
        .order_by(EV.id)
    ).all()
    return Snapshot(
        executions={r.execution_id: r for r in execution_rows},
        steps={(r.execution_id, r.step_name): r for r in step_rows},
        events=list(events),
    )


def clear_executions(conn: Connection) -> None:
    """Test only: forget the executions of earlier examples, which the reconciler's
    set-based, bounded passes would see too (and so behave differently on replay)."""
    conn.execute(delete(EV))
    conn.execute(delete(SE))
    conn.execute(delete(WE))


def queued_steps(conn: Connection, execution_ids: Sequence[str]) -> list[tuple[str, str]]:
    rows = conn.execute(
        select(SE.execution_id, SE.step_name).where(
            SE.execution_id.in_(list(execution_ids)), SE.status == StepStatus.QUEUED.value
        )
    ).all()
    return [(row.execution_id, row.step_name) for row in rows]


def last_step_event(conn: Connection, execution_id: str, step_name: str) -> int | None:
    """Id of the step's latest transition: who holds the step is decided by it."""
    latest: int | None = conn.execute(
        select(func.max(EV.id)).where(EV.execution_id == execution_id, EV.step_name == step_name)
    ).scalar_one()
    return latest


def age_heartbeats(conn: Connection, worker: str) -> None:
    """Test only: the worker process died an hour ago, with every step it was running."""
    conn.execute(
        update(SE)
        .where(SE.worker == worker, SE.status == StepStatus.RUNNING.value)
        .values(heartbeat_at=utcnow(-3600))
    )


def pass_deadline(conn: Connection, execution_id: str) -> None:
    """Test only: the execution's deadline has passed."""
    conn.execute(update(WE).where(WE.execution_id == execution_id).values(deadline_at=utcnow(-1)))


def make_retries_due(conn: Connection, execution_ids: Sequence[str]) -> None:
    """Test only: the backoff of every queued retry has elapsed."""
    conn.execute(
        update(SE)
        .where(
            SE.execution_id.in_(list(execution_ids)),
            SE.status == StepStatus.QUEUED.value,
            SE.next_attempt_at.is_not(None),
        )
        .values(next_attempt_at=utcnow(-1))
    )


@dataclass(frozen=True)
class Token:
    """What a worker holds after a claim: the attempt it will report."""

    index: int
    claim: Claim
    worker: str
    claim_event: int | None

    @property
    def step(self) -> str:
        return self.claim.step_name


# --- the machine --------------------------------------------------------------------


class StateManagerMachine(RuleBasedStateMachine):
    """Executions of CHAIN and FAN moved by the engine's units of work in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.manager = SyncEnhancedExecutionStateManager()
        self.ids: list[str] = []
        self.tokens: list[Token] = []
        # Each worker process has an id per life: one that died is replaced by a new one.
        self.lives = dict.fromkeys(WORKERS, 1)
        self.max_recoveries = 0
        # Executions whose deadline the test moved into the past (until a retry sets a
        # new one): the others' deadlines are ahead of them, or they have none.
        self.overdue: set[int] = set()

    # -- helpers --

    def run(self, work: Any, *args: Any, **kwargs: Any) -> Any:
        return self.manager.run(work, *args, **kwargs)

    def dag(self, index: int) -> Dag:
        return EXECUTION_SPECS[index][0]

    def worker_id(self, worker: str) -> str:
        return f"{worker}.{self.lives[worker]}"

    def holds(self, token: Token) -> bool:
        """Whether the token's claim is still the step's latest transition."""
        latest = self.run(last_step_event, self.ids[token.index], token.step)
        return bool(latest == token.claim_event)

    def queued_steps(self) -> list[tuple[int, str]]:
        rows = self.run(queued_steps, self.ids)
        return sorted((self.ids.index(eid), name) for eid, name in rows)

    # -- setup --

    @initialize(max_recoveries=st.sampled_from([0, 1]))
    def create_executions(self, max_recoveries: int) -> None:
        """The executions, and how often a step may be taken back from a dead worker."""
        self.max_recoveries = max_recoveries
        self.run(clear_executions)
        now = datetime.now(UTC)
        batch = [
            executions.new_execution(
                dag.workflow_id,
                {"n": i},
                max_payload_bytes=10_000,
                deadline_at=None if dag.deadline is None else now + dag.deadline,
                steps=dag.specs(max_attempts),
            )
            for i, (dag, max_attempts) in enumerate(EXECUTION_SPECS)
        ]
        created = self.run(executions.create_executions, batch)
        self.ids = [c.execution_id for c in created]

    # -- producers and operators --

    @rule(index=st.sampled_from(INDEXES))
    def admit(self, index: int) -> None:
        """A start message (or an admission after a slot freed up) arrives."""
        dag = self.dag(index)
        self.run(executions.admit, dag.workflow_id, [self.ids[index]], dag.limited)

    @rule(index=st.sampled_from(INDEXES), action=st.sampled_from(OPERATOR_ACTIONS))
    def operator(self, index: int, action: str) -> None:
        """Someone cancels or retries an execution, or its deadline passes."""
        execution_id = self.ids[index]
        dag = self.dag(index)
        if action == "cancel":
            self.run(executions.cancel_execution, execution_id, "cancelled by the test")
        elif action == "retry":
            retried = self.run(executions.retry_execution, execution_id, dag.graph, dag.deadline)
            if retried.applied:
                self.overdue.discard(index)  # a new deadline (or none)
        else:
            self.run(pass_deadline, execution_id)
            self.overdue.add(index)

    @rule(index=st.sampled_from(INDEXES), status=st.sampled_from(MANUAL_FINAL))
    def manual_final(self, index: int, status: str) -> None:
        """Someone moves an execution to a final status through the public manager (the
        seed's ``transition_execution``): its open steps close with it; a success is
        refused while a step is open."""
        execution_id = self.ids[index]
        try:
            self.manager.transition_execution(execution_id, status, reason="by the test")
        except InvalidTransition:
            assert status == ExecutionStatus.SUCCEEDED.value, status
            assert self.manager.get_execution(execution_id).status == "running"
            still_open = {s.status for s in self.manager.get_steps(execution_id)} & OPEN_STEP
            assert still_open, "a success refused with no step open"

    # -- workers --

    def _hold(self, index: int, claim: Claim, worker_id: str) -> Token:
        dag = self.dag(index)
        # A claimed step reads the output of every upstream step: they all succeeded.
        assert set(claim.upstream) == set(dag.upstream(claim.step_name)), claim
        assert all(output is not None for output in claim.upstream.values()), claim
        event = self.run(last_step_event, self.ids[index], claim.step_name)
        token = Token(index, claim, worker_id, event)
        self.tokens.append(token)
        return token

    def _claim(self, index: int, step: str, worker: str) -> Token | None:
        dag = self.dag(index)
        worker_id = self.worker_id(worker)
        claim = self.run(
            steps.claim,
            self.ids[index],
            step,
            worker_id,
            f"task-{step}",
            None,
            lambda _route: dag.upstream(step),
        )
        return None if claim is None else self._hold(index, claim, worker_id)

    @rule(data=st.data(), worker=st.sampled_from(WORKERS), message=st.sampled_from(MESSAGES))
    def claim(self, data: st.DataObject, worker: str, message: str) -> None:
        """A worker receives the message of a queued step, or of any step (an early,
        late or republished message), or the same message twice (a redelivery), or the
        messages of every queued step (a worker with a big prefetch)."""
        queued = self.queued_steps()
        if message == "every queued step":
            for index, step in queued:
                self._claim(index, step, worker)
            return
        keys = STEP_KEYS if message == "any step" or not queued else queued
        index, step = data.draw(st.sampled_from(keys), label="step")
        self._claim(index, step, worker)
        if message == "twice":
            assert self._claim(index, step, worker) is None, "claimed twice"

    @rule(
        data=st.data(),
        worker=st.sampled_from(WORKERS),
        count=st.integers(1, 3),
        continues=st.booleans(),
    )
    def run_steps(self, data: st.DataObject, worker: str, count: int, continues: bool) -> None:
        """A worker claims queued steps, runs them and records their success; with
        ``continues`` it claims a released step in the same transaction and runs it."""
        token: Token | None = None
        for _ in range(count):
            if token is None:
                queued = self.queued_steps()
                if not queued:
                    return
                index, step = data.draw(st.sampled_from(queued), label="queued step")
                token = self._claim(index, step, worker)
            if token is not None:
                token = self._complete(token, continues)

    def _token(self, data: st.DataObject) -> Token:
        return data.draw(st.sampled_from(self.tokens), label="token")

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        """A worker reports success (possibly again, possibly for an attempt taken back)."""
        self._complete(self._token(data), continues=False)

    @rule(index=st.sampled_from([i for i in INDEXES if len(EXECUTION_SPECS[i][0].sinks) > 1]))
    def sinks_complete_together(self, index: int) -> None:
        """Two workers hold the two sinks of an execution (starting it and running its
        queued upstream steps first, and claiming sinks still queued) and complete them
        at the same moment: on PostgreSQL both transactions make their step's update
        before either checks for the end (two connections, a barrier); SQLite's writers
        are serial, so there they complete one after the other."""
        dag = self.dag(index)
        first, second = dag.sinks[:2]
        self.admit(index)  # its start message, if it has not started
        for step in dag.steps:
            if step not in dag.sinks and (index, step) in self.queued_steps():
                token = self._claim(index, step, WORKERS[0])
                if token is not None:
                    self._complete(token, continues=False)
        held = {t.step: t for t in self.tokens if t.index == index and self.holds(t)}
        queued = self.queued_steps()
        for step, worker in [(first, WORKERS[0]), (second, WORKERS[1])]:
            if step not in held and (index, step) in queued:
                token = self._claim(index, step, worker)
                if token is not None:
                    held[step] = token
        if first not in held or second not in held:
            return
        claims = [held[first].claim, held[second].claim]
        outputs = [{"step": c.step_name, "attempt": c.attempt} for c in claims]
        engine = self.manager.database.engine
        if engine.dialect.name == "postgresql":
            completions = complete_together(engine, claims, dag, outputs)
        else:
            completions = [
                self.run(steps.complete, c, out, json.dumps(out), dag, None)
                for c, out in zip(claims, outputs, strict=True)
            ]
        assert all(c.transition.applied for c in completions), completions

    def _complete(self, token: Token, continues: bool) -> Token | None:
        """Record the token's success; the token of the step it continued with, if any."""
        holds = self.holds(token)
        output = {"step": token.step, "attempt": token.claim.attempt}
        completion = self.run(
            steps.complete,
            token.claim,
            output,
            json.dumps(output),
            self.dag(token.index),
            token.worker if continues else None,
        )
        # Exactly-once recording: only the holder of the step's latest claim completes it.
        assert completion.transition.applied == holds, (token, completion)
        if completion.continued is None:
            return None
        return self._hold(token.index, completion.continued, token.worker)

    def _fail(self, token: Token, error: dict[str, str]) -> TransitionResult:
        dag = self.dag(token.index)
        failure = self.run(
            steps.fail_step,
            self.ids[token.index],
            token.step,
            token.claim.attempt,
            error,
            dag.descendants(token.step),
            dag.sinks,
        )
        result: TransitionResult = failure.transition
        return result

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), delay=st.sampled_from([0.0, 3600.0]), permanent=st.booleans())
    def error(self, data: st.DataObject, delay: float, permanent: bool) -> None:
        """A step raises: retried while it has tries left, else failed (as the engine).
        A ``permanent`` error (bad input) is never retried."""
        token = self._token(data)
        holds = self.holds(token)
        error = {"type": "InputValidationError" if permanent else "Boom", "message": "raised"}
        tries = token.claim.attempt - token.claim.recoveries
        if not permanent and tries < EXECUTION_SPECS[token.index][1]:
            moved = self.run(
                steps.schedule_retry,
                self.ids[token.index],
                token.step,
                token.claim.attempt,
                delay,
                error,
            )
        else:
            moved = self._fail(token, error)
        assert moved.applied == holds, (token, moved)

    @rule(worker=st.sampled_from(WORKERS))
    def worker_dies(self, worker: str) -> None:
        """A worker process is killed: its steps' heartbeats stop (an hour ago), and the
        worker comes back as a new process. Its old claims may still report later: a
        worker cut off from the database, not dead, looks the same to the reconciler."""
        self.run(age_heartbeats, self.worker_id(worker))
        self.lives[worker] += 1

    # -- the reconciler --

    @rule(retries_due=st.booleans())
    def reconcile(self, retries_due: bool) -> None:
        """One reconciler pass (one transaction), then the admission of the executions it
        found unstarted. ``retries_due``: every waiting retry's backoff elapsed first."""
        if retries_due:
            self.run(make_retries_due, self.ids)
        # Live workers beat every few seconds: only the steps of dead ones are stalled.
        for worker in WORKERS:
            self.manager.heartbeat(self.worker_id(worker))
        # The database has been reachable all along: stalls are judged on that evidence.
        self.run(database_reachable, STALL_TIMEOUT)
        before = self.run(read_state, self.ids).executions
        report = self.run(
            reconciler.reconcile_pass,
            stall_timeout=STALL_TIMEOUT,
            # Negative: every queued step and pending execution is overdue, whatever
            # the clock's resolution, so a pass does the same on every replay.
            republish_after=-1.0,
            start_after=-1.0,
            limit=100,
            max_recoveries=self.max_recoveries,
            dag_of=lambda workflow, _version: DAGS.get(workflow),
        )
        # Nothing of an execution that had finished is ever sent again.
        finished = {eid for eid, row in before.items() if row.status in FINAL_EXECUTION}
        stray = [key for key in report.republish if key[0] in finished]
        assert not stray, f"republished steps of finished executions: {stray}"
        for found in report.start:  # (execution, workflow, ...) of unstarted executions
            self.run(executions.admit, found[1], [found[0]], DAGS[found[1]].limited)

    # -- invariants --

    @invariant()
    def state_is_consistent(self) -> None:
        if not self.ids:
            return
        snapshot = self.run(read_state, self.ids)
        check_event_log(snapshot)
        for index, execution_id in enumerate(self.ids):
            check_execution(self.dag(index), execution_id, snapshot)
        check_limits(snapshot)
        for index, execution_id in enumerate(self.ids):
            row = snapshot.executions[execution_id]
            if index not in self.overdue and row.status not in FINAL_EXECUTION:
                # Set at creation, or by the latest retry: never one already passed.
                where = f"execution {execution_id} ({row.status}, deadline {row.deadline_at})"
                assert row.deadline_at is None or row.deadline_ahead, f"{where}: overdue"
                assert (row.deadline_at is None) == (self.dag(index).deadline is None), where


def check_event_log(snapshot: Snapshot) -> None:
    """Every transition replays along allowed edges and ends in the row's status."""
    by_execution: dict[str, list[Any]] = {}
    by_step: dict[tuple[str, str], list[Any]] = {}
    for event in snapshot.events:
        if event.step_name is None:
            by_execution.setdefault(event.execution_id, []).append(event)
        else:
            by_step.setdefault((event.execution_id, event.step_name), []).append(event)

    retries_of: dict[str, list[int]] = {}
    for execution_id, row in snapshot.executions.items():
        chain = by_execution.get(execution_id, [])
        assert chain, f"execution {execution_id} has no events"
        first = chain[0]
        assert (first.from_status, first.to_status) == (None, ExecutionStatus.PENDING.value)
        status, attempt = first.to_status, first.attempt
        for event in chain[1:]:
            where = f"execution {execution_id} event {event.id}"
            assert event.from_status == status, f"{where}: from {event.from_status}, was {status}"
            source, target = EXECUTIONS.parse(status), EXECUTIONS.parse(event.to_status)
            if EXECUTIONS.is_allowed(source, target):
                assert event.attempt == attempt, f"{where}: attempt changed without a retry"
            else:
                assert EXECUTIONS.is_allowed(source, target, retry=True), f"{where}: illegal"
                assert event.reason == EXECUTION_RETRIED, f"{where}: retry edge without a retry"
                assert event.attempt == attempt + 1, f"{where}: a retry is a new attempt"
                retries_of.setdefault(execution_id, []).append(event.id)
            status, attempt = event.to_status, event.attempt
        assert status == row.status, f"execution {execution_id}: log ends {status}, row {row}"
        assert attempt == row.attempt, f"execution {execution_id}: log attempt {attempt}, {row}"

    for key, row in snapshot.steps.items():
        status, attempt, previous_id = StepStatus.PENDING.value, 1, 0
        succeeded = 0
        for event in by_step.get(key, []):
            where = f"step {key} event {event.id} ({event.reason})"
            assert event.from_status == status, f"{where}: from {event.from_status}, was {status}"
            source, target = STEPS.parse(status), STEPS.parse(event.to_status)
            if not STEPS.is_allowed(source, target):
                assert STEPS.is_allowed(source, target, retry=True), f"{where}: illegal"
                assert event.reason == STEPS_RETRIED, f"{where}: retry edge without a retry"
                # Only an explicit retry of the execution, after this step gave up.
                retried = [i for i in retries_of.get(key[0], []) if previous_id < i < event.id]
                assert retried, f"{where}: left {status} without the execution being retried"
                assert event.attempt == attempt + 1, f"{where}: a retry is a new attempt"
            assert event.attempt >= attempt, f"{where}: attempt went back"
            succeeded += target is StepStatus.SUCCEEDED
            status, attempt, previous_id = event.to_status, event.attempt, event.id
        assert status == row.status, f"step {key}: log ends {status}, row is {row.status}"
        assert attempt == row.attempt, f"step {key}: log attempt {attempt}, row {row.attempt}"
        # Succeeded is final and an execution retry keeps succeeded steps: once, ever.
        assert succeeded <= 1, f"step {key} succeeded {succeeded} times"


def check_limits(snapshot: Snapshot) -> None:
    """No workflow runs more executions at once than its max_concurrency allows."""
    running = Counter(
        row.workflow_id
        for row in snapshot.executions.values()
        if row.status == ExecutionStatus.RUNNING.value
    )
    for workflow, count in running.items():
        limit = DAGS[workflow].limit
        assert limit is None or count <= limit, f"{count} of {workflow} running, limit {limit}"


def check_execution(dag: Dag, execution_id: str, snapshot: Snapshot) -> None:
    """The rows of one execution agree with its DAG and its status."""
    status = snapshot.executions[execution_id].status
    steps = {name: snapshot.steps[(execution_id, name)] for name in dag.steps}
    statuses = Counter(row.status for row in steps.values())
    where = f"execution {execution_id} ({status}, steps {dict(statuses)})"
    for name, row in steps.items():
        upstream = dag.upstream(name)
        not_done = sum(1 for up in upstream if steps[up].status != StepStatus.SUCCEEDED.value)
        assert row.unmet_deps >= 0, f"{where}: {name} unmet_deps {row.unmet_deps}"
        if row.status == StepStatus.PENDING.value:
            assert row.unmet_deps == not_done, f"{where}: {name} unmet {row.unmet_deps}"
        if row.status in {"queued", "running", "succeeded"}:
            assert not_done == 0, f"{where}: {name} is {row.status} before its upstream"
        if row.status == StepStatus.SUCCEEDED.value:
            assert row.output_data == {"step": name, "attempt": row.attempt}, f"{where}: {row}"
    if status == ExecutionStatus.PENDING.value:
        # Before its (next) start: only a retry's kept successes have moved.
        moved = set(statuses) - {StepStatus.PENDING.value, StepStatus.SUCCEEDED.value}
        assert not moved, f"{where}: steps moved before start"
    if status in FINAL_EXECUTION:
        assert not set(statuses) & OPEN_STEP, f"{where}: finished with open steps"
    if status == ExecutionStatus.SUCCEEDED.value:
        assert set(statuses) == {StepStatus.SUCCEEDED.value}, f"{where}: not all succeeded"
    if status == ExecutionStatus.RUNNING.value:
        # The transaction that ends an execution's last open step finishes it (rule 7).
        assert set(statuses) & OPEN_STEP, f"{where}: every step is final, still running"
        # Nothing is left waiting on a step that gave up: fail_step skips descendants in
        # its own transaction, an execution retry requeues the step.
        for name, row in steps.items():
            if row.status == StepStatus.PENDING.value:
                gave_up = [up for up in dag.upstream(name) if steps[up].status in GAVE_UP]
                assert not gave_up, f"{where}: {name} stranded behind {gave_up}"


# --- the test -----------------------------------------------------------------------


def machine_settings() -> settings:
    examples = int(os.environ.get("CONVEYOR_HYPOTHESIS_EXAMPLES", "30"))
    return settings(
        max_examples=examples,
        stateful_step_count=40,
        deadline=None,
        derandomize="CONVEYOR_HYPOTHESIS_SEED" not in os.environ,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.mark.timeout(300)
def test_interleavings_keep_the_invariants(database: TestDatabase) -> None:
    machine = StateManagerMachine
    chosen = os.environ.get("CONVEYOR_HYPOTHESIS_SEED")
    if chosen is not None:
        machine = seed(int(chosen))(type("SeededMachine", (StateManagerMachine,), {}))
    print(f"hypothesis: {'seed ' + chosen if chosen else 'derandomized'} on {database.backend}")
    run_state_machine_as_test(machine, settings=machine_settings())
