"""One checker for every fault test: the invariants, read from the database and run log.

After a fault test's executions are final, ``check`` reads ``workflow_executions``,
``execution_steps`` and ``execution_events`` (SQLAlchemy Core) and the run log the
steps append to (see ``workflows.py``), and asserts, for every execution:

- it reached its expected final status (succeeded);
- no step row is left pending, queued, running or waiting; every step succeeded exactly
  once (one event into ``succeeded``), joins and wait nodes included, with the correct
  output (a sleep's: its ``wake_at``, never reached before it), and the execution's
  output is its sinks' outputs;
- a child execution is checked as the others are (they are found from their parents),
  and each child step started one child per attempt, the one its row names;
- every event in ``event_inbox`` was consumed (none lost), each by one event wait of
  these executions, the one waiting for its key, and no wait consumed two: the wait's
  ``succeeded`` event names the inbox row it took;
- the event log replays: each event's ``from_status`` is the previous event's
  ``to_status``, and the last one is the row's status (steps and executions);
- no step ran again unless the process that ran it before was killed: every run but a
  step's last is by a pid in ``dead_pids`` (so with no kills, each step ran once);
  wait nodes run no code: they are absent from the run log;
- a map step's items (``map_items``): one row per element of its list, each succeeded
  with its output, at an attempt no error retry was spent on (``attempt - recoveries``
  is 1: a kill's re-run is a recovery); the map counted down to 0 with none failed;
  one ``map expanded`` and one ``map done`` event (one aggregation); each item's code
  ran again only when the process of its earlier run was killed, never twice at one
  attempt, its last run at the row's attempt.

It returns the figures each test prints: executions, steps, runs, re-runs, ...
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from core.database import get_db_session
from core.models import ExecutionEvent, InboxEvent, MapItem, StepExecution, WorkflowExecution
from tests.faults import workflows

FINAL_EXECUTION = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
OPEN_STEP = frozenset({"pending", "queued", "running", "waiting"})
SHOWN_PROBLEMS = 25

executions_table = WorkflowExecution.__table__
steps_table = StepExecution.__table__
events_table = ExecutionEvent.__table__
inbox_table = InboxEvent.__table__
items_table = MapItem.__table__
# The inbox row an event wait took, as its ``succeeded`` event names it ("... #12").
TAKEN_EVENT = re.compile(r"#(\d+)")


@dataclass(frozen=True)
class Run:
    """One run of a step's code, as the step logged it."""

    execution_id: str
    step_name: str
    attempt: int
    pid: int


@dataclass
class Figures:
    """What a fault test reports; ``extra`` holds its own (kills, restarts, ...)."""

    executions: int = 0
    steps: int = 0
    runs: int = 0
    reruns: int = 0
    seconds_to_finish: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One line for the test's output and its assertion messages."""
        parts = {
            "executions": self.executions,
            "steps": self.steps,
            "runs": self.runs,
            "re-runs": self.reruns,
            **self.extra,
            "seconds to finish": round(self.seconds_to_finish, 1),
        }
        return ", ".join(f"{key} {value}" for key, value in parts.items())


def read_runs(path: Path) -> list[Run]:
    """Every run the steps logged, in the order they started."""
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        execution_id, step_name, attempt, pid = line.split()
        runs.append(Run(execution_id, step_name, int(attempt), int(pid)))
    return runs


def open_executions(execution_ids: Collection[str]) -> int:
    """How many of ``execution_ids`` are not final yet."""
    with get_db_session() as db:
        statuses = db.execute(
            select(executions_table.c.status).where(
                executions_table.c.execution_id.in_(list(execution_ids))
            )
        ).scalars()
        return sum(1 for status in statuses if status not in FINAL_EXECUTION)


def succeeded_steps(execution_ids: Collection[str]) -> int:
    """Steps of ``execution_ids`` that succeeded so far (the tests' progress gauge)."""
    with get_db_session() as db:
        statuses = db.execute(
            select(steps_table.c.status).where(steps_table.c.execution_id.in_(list(execution_ids)))
        ).scalars()
        return sum(1 for status in statuses if status == "succeeded")


def running_workers(execution_ids: Collection[str]) -> list[str]:
    """The ``worker`` (host:pid) of each step of ``execution_ids`` running now."""
    with get_db_session() as db:
        return [
            str(worker)
            for worker in db.execute(
                select(steps_table.c.worker).where(
                    steps_table.c.execution_id.in_(list(execution_ids)),
                    steps_table.c.status == "running",
                )
            ).scalars()
            if worker
        ]


def wait_until_final(execution_ids: Collection[str], timeout: float) -> float:
    """Poll until every execution is final or ``timeout`` passes; the seconds it took.

    Returns at the deadline without failing: ``check`` then names what is not final.
    """
    started = time.monotonic()
    while open_executions(execution_ids) and time.monotonic() - started < timeout:
        time.sleep(0.2)
    return time.monotonic() - started


def wait_mid_run(
    execution_ids: Collection[str], steps: int, fraction: float, timeout: float = 90.0
) -> int:
    """Poll until ``fraction`` of the ``steps`` succeeded while one is running (so that a
    fault lands mid-run and mid-step); how many had succeeded."""
    deadline = time.monotonic() + timeout
    while True:
        done = succeeded_steps(execution_ids)
        if done >= fraction * steps and running_workers(execution_ids):
            return done
        assert done < steps, f"the run finished before {fraction:.0%} with a step running"
        assert time.monotonic() < deadline, f"{done} of {steps} steps after {timeout}s"
        time.sleep(0.05)


def seconds_to_progress(
    execution_ids: Collection[str], done: int, since: float, timeout: float = 90.0
) -> float:
    """Poll until more than ``done`` steps succeeded; the seconds from ``since`` till then."""
    deadline = time.monotonic() + timeout
    while succeeded_steps(execution_ids) <= done:
        assert time.monotonic() < deadline, f"no step succeeded within {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - since


def _replay_problems(
    what: str, final_status: str, history: Iterable[tuple[str | None, str]]
) -> list[str]:
    problems = []
    previous: str | None = None
    for index, (from_status, to_status) in enumerate(history):
        if index and from_status != previous:
            problems.append(
                f"{what}: event {index} goes {from_status}->{to_status} after {previous}"
            )
        previous = to_status
    if previous != final_status:
        problems.append(f"{what}: events replay to {previous}, the row is {final_status}")
    return problems


def check(
    execution_ids: Collection[str],
    run_log: Path,
    *,
    dead_pids: Collection[int] = (),
    figures: Figures | None = None,
) -> Figures:
    """Assert every invariant for ``execution_ids``; the figures (raises with them)."""
    figures = figures or Figures()
    ids = list(execution_ids)
    with get_db_session() as db:
        ids += descendants(db, ids)
        executions = {
            row.execution_id: row
            for row in db.execute(
                select(
                    executions_table.c.execution_id,
                    executions_table.c.workflow_id,
                    executions_table.c.status,
                    executions_table.c.input_data,
                    executions_table.c.output_data,
                    executions_table.c.error,
                    executions_table.c.parent_execution_id,
                    executions_table.c.parent_step_name,
                    executions_table.c.parent_attempt,
                ).where(executions_table.c.execution_id.in_(ids))
            )
        }
        steps = db.execute(
            select(
                steps_table.c.execution_id,
                steps_table.c.step_name,
                steps_table.c.status,
                steps_table.c.attempt,
                steps_table.c.output_data,
                steps_table.c.wake_at,
                steps_table.c.finished_at,
                steps_table.c.child_execution_id,
                steps_table.c.map_total,
                steps_table.c.map_left,
                steps_table.c.map_failed,
            ).where(steps_table.c.execution_id.in_(ids))
        ).all()
        items = db.execute(
            select(
                items_table.c.execution_id,
                items_table.c.step_name,
                items_table.c.item_index,
                items_table.c.status,
                items_table.c.attempt,
                items_table.c.recoveries,
                items_table.c.attempt_base,
                items_table.c.output_data,
            )
            .where(items_table.c.execution_id.in_(ids))
            .order_by(items_table.c.item_index)
        ).all()
        events = db.execute(
            select(
                events_table.c.execution_id,
                events_table.c.step_name,
                events_table.c.from_status,
                events_table.c.to_status,
                events_table.c.reason,
            )
            .where(events_table.c.execution_id.in_(ids))
            .order_by(events_table.c.id)
        ).all()
        inbox = db.execute(
            select(
                inbox_table.c.id,
                inbox_table.c.name,
                inbox_table.c.event_key,
                inbox_table.c.consumed_at,
                inbox_table.c.consumed_by_execution,
                inbox_table.c.consumed_by_step,
            ).order_by(inbox_table.c.id)
        ).all()
    histories: dict[tuple[str, str | None], list[tuple[str | None, str]]] = defaultdict(list)
    # The reasons of each map step's events ("map expanded: ...", "map done: ...").
    reasons: dict[tuple[str, str], list[str]] = defaultdict(list)
    # The inbox row each event wait's success names: (execution, step) -> ids.
    took: dict[tuple[str, str], list[int]] = defaultdict(list)
    for event in events:
        histories[(event.execution_id, event.step_name)].append(
            (event.from_status, event.to_status)
        )
        if event.step_name:
            reasons[(event.execution_id, event.step_name)].append(event.reason or "")
        if event.step_name and event.to_status == "succeeded" and event.from_status == "waiting":
            took[(event.execution_id, event.step_name)] += [
                int(found) for found in TAKEN_EVENT.findall(event.reason or "")
            ]
    runs: dict[tuple[str, str], list[Run]] = defaultdict(list)
    wanted = set(ids)
    for run in read_runs(run_log):
        if run.execution_id in wanted:
            runs[(run.execution_id, run.step_name)].append(run)

    problems: list[str] = []
    missing = wanted - executions.keys()
    problems += [f"execution {eid} has no row" for eid in sorted(missing)]
    steps_by_execution: dict[str, dict[str, Any]] = defaultdict(dict)
    for step in steps:
        steps_by_execution[step.execution_id][step.step_name] = step
    dead = set(dead_pids)
    for eid, execution in executions.items():
        expected = workflows.expected_outputs(
            execution.workflow_id,
            execution.input_data["start"],
            workflows.map_length(execution.workflow_id, execution.input_data),
        )
        if execution.status != "succeeded":
            problems.append(
                f"execution {eid} ({execution.workflow_id}) is {execution.status}, "
                f"not succeeded; error: {execution.error}"
            )
        problems += _replay_problems(f"execution {eid}", execution.status, histories[(eid, None)])
        if execution.status == "succeeded":
            sinks = {name: expected[name] for name in workflows.sinks(execution.workflow_id)}
            if execution.output_data != sinks:
                problems.append(f"execution {eid} output {execution.output_data} != {sinks}")
        rows = steps_by_execution[eid]
        if set(rows) != set(expected):
            problems.append(f"execution {eid} has steps {sorted(rows)}, not {sorted(expected)}")
        joins = set(workflows.joins(execution.workflow_id))
        waits = workflows.wait_nodes(execution.workflow_id)
        for name, step in rows.items():
            kind = " (join)" if name in joins else f" ({waits[name]})" if name in waits else ""
            what = f"step {eid}/{name}{kind}"
            if step.status in OPEN_STEP:
                problems.append(f"{what} left {step.status}")
            elif step.status != "succeeded":
                problems.append(f"{what} is {step.status}")
            history = histories[(eid, name)]
            completions = sum(1 for _, to_status in history if to_status == "succeeded")
            if completions != 1:
                problems.append(f"{what} recorded {completions} successful completions")
            if step.status == "succeeded":
                if expected.get(name) == workflows.WAKE_TIME:
                    problems += _sleep_problems(what, step)
                elif step.output_data != expected.get(name):
                    problems.append(f"{what} output {step.output_data} != {expected.get(name)}")
            problems += _replay_problems(what, step.status, history)
            step_runs = sorted(runs[(eid, name)], key=lambda r: r.attempt)
            figures.steps += 1
            if name in waits:
                if step_runs:
                    problems.append(f"{what} is a wait node, yet code ran for it: {step_runs}")
                continue
            figures.runs += len(step_runs)
            figures.reruns += max(0, len(step_runs) - 1)
            if step.status == "succeeded" and not step_runs:
                problems.append(f"{what} succeeded without its code running")
            lived = [r for r in step_runs[:-1] if r.pid not in dead]
            if lived:
                problems.append(
                    f"{what} ran again though the process of an earlier run lived: "
                    + ", ".join(f"attempt {r.attempt} in pid {r.pid}" for r in step_runs)
                )
    items_by_map: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for item in items:
        items_by_map[(item.execution_id, item.step_name)].append(item)
    for eid, execution in executions.items():
        for name in workflows.map_nodes(execution.workflow_id):
            map_step = steps_by_execution[eid].get(name)
            if map_step is None:
                continue
            found = items_by_map[(eid, name)]
            figures.extra["map items"] = figures.extra.get("map items", 0) + len(found)
            problems += _map_problems(
                f"map {eid}/{name}",
                map_step,
                found,
                workflows.expected_outputs(
                    execution.workflow_id,
                    execution.input_data["start"],
                    workflows.map_length(execution.workflow_id, execution.input_data),
                )[name],
                reasons[(eid, name)],
                runs,
                dead,
                figures,
            )
    problems += _inbox_problems(inbox, took, executions)
    problems += _child_problems(executions, steps_by_execution)
    figures.executions = len(executions)
    if problems:
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        more = len(problems) - SHOWN_PROBLEMS
        raise AssertionError(
            f"{len(problems)} invariant violations ({figures.line()}):\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return figures


def _map_problems(
    what: str,
    step: Any,
    items: Sequence[Any],
    outputs: Sequence[Any],
    reasons: Sequence[str],
    runs: Mapping[tuple[str, str], list[Run]],
    dead: Collection[int],
    figures: Figures,
) -> list[str]:
    """A map's items each ended once, succeeded with its output at an attempt no error
    retry was spent on, ran again only after a kill; the map aggregated once."""
    problems = []
    indexes = [item.item_index for item in items]
    if indexes != list(range(len(outputs))):
        shown = indexes if len(indexes) < 20 else f"{len(indexes)} rows"
        problems.append(f"{what} has items {shown}, not 0..{len(outputs) - 1}")
    if (step.map_total, step.map_left, step.map_failed) != (len(outputs), 0, 0):
        problems.append(
            f"{what} counted total {step.map_total}, left {step.map_left}, "
            f"failed {step.map_failed}; not {len(outputs)}, 0, 0"
        )
    for prefix in ("map expanded", "map done"):
        found = sum(1 for reason in reasons if reason.startswith(prefix))
        if found != 1:
            problems.append(f"{what} has {found} {prefix!r} events, not 1")
    for item in items:
        where = f"{what}[{item.item_index}]"
        if item.status != "succeeded":
            problems.append(f"{where} is {item.status}")
        elif item.item_index < len(outputs) and item.output_data != outputs[item.item_index]:
            problems.append(f"{where} output {item.output_data} != {outputs[item.item_index]}")
        if item.attempt - item.recoveries != 1 or item.attempt_base != 0:
            problems.append(
                f"{where} at attempt {item.attempt} with {item.recoveries} recoveries "
                f"(base {item.attempt_base}): an error retry was spent"
            )
        figures.extra["item recoveries"] = figures.extra.get("item recoveries", 0) + (
            item.recoveries
        )
        item_runs = sorted(
            runs.get((item.execution_id, f"{item.step_name}[{item.item_index}]"), []),
            key=lambda r: r.attempt,
        )
        figures.extra["item runs"] = figures.extra.get("item runs", 0) + len(item_runs)
        figures.extra["item re-runs"] = figures.extra.get("item re-runs", 0) + max(
            0, len(item_runs) - 1
        )
        attempts = [r.attempt for r in item_runs]
        if not item_runs:
            problems.append(f"{where} ended without its code running")
            continue
        if len(set(attempts)) != len(attempts):
            problems.append(f"{where} ran twice at one attempt: {attempts}")
        if attempts[-1] != item.attempt:
            problems.append(
                f"{where} last ran at attempt {attempts[-1]}, its row is at {item.attempt}"
            )
        lived = [r for r in item_runs[:-1] if r.pid not in dead]
        if lived:
            problems.append(
                f"{where} ran again though the process of an earlier run lived: "
                + ", ".join(f"attempt {r.attempt} in pid {r.pid}" for r in item_runs)
            )
    return problems


def descendants(db: Any, execution_ids: Collection[str]) -> list[str]:
    """The child executions of ``execution_ids``, their children, and so on."""
    found: list[str] = []
    frontier = list(execution_ids)
    while frontier:
        frontier = list(
            db.execute(
                select(executions_table.c.execution_id).where(
                    executions_table.c.parent_execution_id.in_(frontier)
                )
            ).scalars()
        )
        found += frontier
    return found


def _child_problems(
    executions: Mapping[str, Any], steps_by_execution: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Each child step started one child per attempt, and its row names the last."""
    problems = []
    started: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for execution in executions.values():
        if execution.parent_execution_id is not None:
            started[(execution.parent_execution_id, execution.parent_step_name)].append(execution)
    for eid, execution in executions.items():
        for name, kind in workflows.wait_nodes(execution.workflow_id).items():
            if kind != "child" or name not in steps_by_execution[eid]:
                continue
            step = steps_by_execution[eid][name]
            children = started[(eid, name)]
            what = f"step {eid}/{name} (child)"
            attempts = sorted(child.parent_attempt for child in children)
            if len(set(attempts)) != len(attempts):
                problems.append(f"{what} started two children for one attempt: {attempts}")
            if step.attempt not in attempts:
                problems.append(f"{what} started no child at attempt {step.attempt}")
            named = [child for child in children if child.execution_id == step.child_execution_id]
            if not named or named[0].parent_attempt != step.attempt:
                problems.append(f"{what} names child {step.child_execution_id}, not its own")
    return problems


def _sleep_problems(what: str, step: Any) -> list[str]:
    """A sleep that succeeded: its output is its wake time, and it ended no earlier."""
    if step.wake_at is None or step.finished_at is None:
        return [f"{what} succeeded with wake_at {step.wake_at}, finished_at {step.finished_at}"]
    try:
        woke = datetime.fromisoformat(str(step.output_data))
    except ValueError:
        return [f"{what} output {step.output_data!r} is not a wake time"]
    problems = []
    if woke != step.wake_at:
        problems.append(f"{what} output {woke} is not its wake_at {step.wake_at}")
    if step.finished_at < step.wake_at:
        problems.append(f"{what} ended at {step.finished_at}, before its wake_at {step.wake_at}")
    return problems


def _inbox_problems(
    inbox: Iterable[Any], took: Mapping[tuple[str, str], list[int]], executions: Mapping[str, Any]
) -> list[str]:
    """Every inbox row consumed, by the one wait of its (name, key) that names it, and
    no wait of ``executions`` took two or none."""
    problems = []
    consumers: dict[tuple[str, str], list[int]] = defaultdict(list)
    rows = {row.id: row for row in inbox}
    for row in rows.values():
        what = f"event #{row.id} ({row.name}/{row.event_key})"
        if row.consumed_at is None or row.consumed_by_execution is None:
            problems.append(f"{what} was never consumed: lost")
            continue
        consumer = (row.consumed_by_execution, row.consumed_by_step)
        consumers[consumer].append(row.id)
        if took.get(consumer) != [row.id]:
            problems.append(
                f"{what} consumed by {consumer[0]}/{consumer[1]}, whose events name "
                f"{took.get(consumer, [])}"
            )
        execution = executions.get(row.consumed_by_execution)
        if (
            execution is not None
            and row.name == workflows.APPROVAL_EVENT
            and row.event_key != workflows.approval_key(execution.input_data["start"])
        ):
            problems.append(f"{what} consumed by {consumer[0]}, which waits for another key")
    for consumer, ids in consumers.items():
        if len(ids) > 1:
            problems.append(f"wait {consumer[0]}/{consumer[1]} consumed {len(ids)} events: {ids}")
    for (eid, step), ids in took.items():
        if eid not in executions:
            continue
        waits = workflows.wait_nodes(executions[eid].workflow_id)
        if waits.get(step) != "event":
            continue
        if len(ids) != 1 or ids[0] not in rows:
            problems.append(f"wait {eid}/{step} succeeded naming inbox rows {ids}")
    return problems


def transitions(execution_ids: Collection[str], from_status: str, to_status: str) -> int:
    """Step events ``from_status`` -> ``to_status`` of ``execution_ids`` (queued -> queued:
    the reconciler's republishes; running -> queued: retries and stall recoveries)."""
    with get_db_session() as db:
        return len(
            db.execute(
                select(events_table.c.id).where(
                    events_table.c.execution_id.in_(list(execution_ids)),
                    events_table.c.step_name.is_not(None),
                    events_table.c.from_status == from_status,
                    events_table.c.to_status == to_status,
                )
            ).all()
        )


def start_resends(execution_ids: Collection[str]) -> int:
    """Start messages the reconciler re-sent for ``execution_ids`` while they were (last)
    pending: the sum of their ``starts_resent``."""
    with get_db_session() as db:
        total = db.execute(
            select(func.coalesce(func.sum(executions_table.c.starts_resent), 0)).where(
                executions_table.c.execution_id.in_(list(execution_ids))
            )
        ).scalar_one()
        return int(total)


def item_statuses(execution_ids: Collection[str]) -> Mapping[str, int]:
    """The map items of ``execution_ids`` by status."""
    with get_db_session() as db:
        rows = db.execute(
            select(items_table.c.status, func.count())
            .where(items_table.c.execution_id.in_(list(execution_ids)))
            .group_by(items_table.c.status)
        ).all()
    return {str(status): int(n) for status, n in rows}


def item_republishes(execution_ids: Collection[str]) -> int:
    """Item messages the reconciler re-sent while their item stayed queued (its
    ``republishes``; a due retry's first message is not one)."""
    with get_db_session() as db:
        total = db.execute(
            select(func.coalesce(func.sum(items_table.c.republishes), 0)).where(
                items_table.c.execution_id.in_(list(execution_ids))
            )
        ).scalar_one()
    return int(total)


def summarize_steps(execution_ids: Collection[str]) -> Mapping[str, int]:
    """Step rows of ``execution_ids`` by status (for progress messages)."""
    counts: dict[str, int] = defaultdict(int)
    with get_db_session() as db:
        for status in db.execute(
            select(steps_table.c.status).where(steps_table.c.execution_id.in_(list(execution_ids)))
        ).scalars():
            counts[status] += 1
    return dict(counts)


# Step statuses in which an admitted attempt holds its slots (``core.limits.HOLDING``).
HOLDING = frozenset({"queued", "running"})


def key_holders_peak(execution_ids: Collection[str], step_name: str) -> int:
    """The most attempts of ``step_name`` (a step behind one concurrency key) holding a
    slot at once, replayed from the events in id order: an attempt holds from its
    ``admitted`` event (waiting -> queued) until its step leaves queued and running, or
    goes running -> queued (a stall recovery: the attempt moved on).

    Sound against the database's own counts: an admission's event is written after it
    locked the key and counted the holders, so every end it counted as ended has a
    smaller id; an end with a smaller id not yet committed then only lowers the replay
    (the admission counted it as holding). A peak above the limit is an over-admission.
    """
    with get_db_session() as db:
        events = db.execute(
            select(
                events_table.c.execution_id,
                events_table.c.from_status,
                events_table.c.to_status,
                events_table.c.reason,
            )
            .where(
                events_table.c.execution_id.in_(list(execution_ids)),
                events_table.c.step_name == step_name,
            )
            .order_by(events_table.c.id)
        ).all()
    holding: set[str] = set()
    peak = 0
    for event in events:
        if event.from_status == "waiting" and event.reason == "admitted":
            holding.add(event.execution_id)
            peak = max(peak, len(holding))
        elif event.to_status not in HOLDING or event.from_status == "running":
            # Out of queued and running, or running -> queued (a recovery); queued ->
            # running and queued -> queued (a republish) keep the slot.
            holding.discard(event.execution_id)
    return peak
