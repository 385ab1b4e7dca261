"""Replaying a recorded step where you can debug it: the step's current code, run in
this process with exactly the input, upstream outputs and attempt its execution
recorded, touching nothing of the execution (``conveyor replay``, and the test kit's
``conveyor_test.replay``).

It refuses, naming the reason (``NotReplayable``), what it could not replay faithfully:
an execution whose payloads retention cleared, a step this code does not have (or a wait,
which runs no code), upstream outputs not recorded, and a step whose contract (its
parameters, return type, upstream steps or ``version=``) changed since the execution
began (its recorded shape, core.shapes).
"""

from __future__ import annotations

import logging
import pdb
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, select

from core.errors import ExecutionNotFound, InputValidationError, NotReplayable, StepNotFound
from core.models import MapItem, StepExecution, WorkflowExecution
from core.registry import WorkflowRegistry
from core.shapes import load_shape, shape_of
from core.states import StepStatus
from core.workflows import MapSpec, Workflow

log = logging.getLogger(__name__)

WE = WorkflowExecution.__table__.c
SE = StepExecution.__table__.c
MI = MapItem.__table__.c


@dataclass(frozen=True)
class Recorded:
    """What an execution recorded for one step: what the step ran with."""

    workflow: str
    version: int
    shape_hash: str | None
    payloads_cleared_at: datetime | None
    input_data: Any
    status: str
    attempt: int
    # Each upstream step's (status, output).
    upstream: dict[str, tuple[str, Any]]


def recorded(
    conn: Connection, execution_id: str, step: str, upstream: list[str], item: int | None
) -> Recorded:
    """Read, in one transaction, what ``step`` of the execution ran with."""
    execution = conn.execute(
        select(
            WE.workflow_id,
            WE.workflow_version,
            WE.shape_hash,
            WE.payloads_cleared_at,
            WE.input_data,
        ).where(WE.execution_id == execution_id)
    ).first()
    if execution is None:
        raise ExecutionNotFound(execution_id)
    row = conn.execute(
        select(SE.status, SE.attempt).where(SE.execution_id == execution_id, SE.step_name == step)
    ).first()
    if row is None:
        raise StepNotFound(execution_id, step)
    outputs = {
        r.step_name: (r.status, r.output_data)
        for r in conn.execute(
            select(SE.step_name, SE.status, SE.output_data).where(
                SE.execution_id == execution_id, SE.step_name.in_(upstream)
            )
        )
    }
    attempt = row.attempt
    if item is not None:
        item_row = conn.execute(
            select(MI.attempt).where(
                MI.execution_id == execution_id, MI.step_name == step, MI.item_index == item
            )
        ).first()
        if item_row is None:
            raise NotReplayable(execution_id, step, f"its map has no item {item}")
        attempt = item_row.attempt
    return Recorded(
        execution.workflow_id,
        execution.workflow_version,
        execution.shape_hash,
        execution.payloads_cleared_at,
        execution.input_data,
        row.status,
        attempt,
        outputs,
    )


class ReplayContext:
    """The StepContext of a replayed step: the recorded execution, attempt and input; it
    beats no heartbeat, is never cancelled, and pauses no key (it logs what it would)."""

    def __init__(
        self,
        execution_id: str,
        step: str,
        attempt: int,
        workflow: Workflow,
        stored: Any,
        map_index: int | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.step_name = step
        self.attempt = attempt
        self.map_index = map_index
        self._workflow = workflow
        self._stored = stored

    @property
    def input(self) -> Any:
        """The execution's input, parsed by the workflow's input model."""
        try:
            return self._workflow.parse_input(self._stored)
        except ValidationError as exc:
            raise InputValidationError(
                f"stored input of workflow {self._workflow.name!r} no longer fits its input "
                f"model: {exc}"
            ) from exc

    @property
    def idempotency_key(self) -> str:
        """The key the step had when it ran (as ``RunningStep``'s)."""
        if self.map_index is not None:
            return f"{self.execution_id}:{self.step_name}:{self.map_index}"
        return f"{self.execution_id}:{self.step_name}"

    def heartbeat(self) -> None:
        """Nothing to refresh: the replay holds no step."""

    def is_cancelled(self) -> bool:
        """Never: the replay is not the execution."""
        return False

    def pause_key(self, key: str, *, until: datetime | timedelta) -> None:
        """Not applied: a replay changes nothing; logged."""
        log.warning("replay: ctx.pause_key(%r, until=%s) not applied", key, until)


@dataclass(frozen=True)
class Replayed:
    """What the replayed code returned (``output``, as JSON) or raised (``error`` and
    its ``traceback``)."""

    execution_id: str
    step: str
    attempt: int
    output: Any = None
    error: BaseException | None = None
    traceback: str | None = None

    @property
    def failed(self) -> bool:
        """Whether the code raised."""
        return self.error is not None


def replay(
    run: Callable[..., Recorded],
    registry: WorkflowRegistry,
    execution_id: str,
    step_name: str,
    *,
    item: int | None = None,
    debug: bool = False,
) -> Replayed:
    """Run ``step_name``'s current code with what execution ``execution_id`` recorded
    for it (``run`` runs a unit of work: the state manager's ``run``). With ``debug``,
    the code runs under pdb (stopping at its first line) and an error it raises opens
    pdb's post-mortem."""
    peek = run(recorded, execution_id, step_name, [], None)
    try:
        workflow = registry.get(peek.workflow, peek.version)
    except Exception as missing:
        raise NotReplayable(execution_id, step_name, str(missing)) from missing
    step = workflow.steps.get(step_name)
    if step is None:
        raise NotReplayable(
            execution_id, step_name, f"this code's {workflow.name!r} has no such step"
        )
    mapped = isinstance(step.wait, MapSpec) and step.wait.child is None
    if step.wait is not None and not mapped:
        raise NotReplayable(
            execution_id, step_name, f"it is a {step.kind} step, which runs no code of its own"
        )
    if mapped and item is None:
        raise NotReplayable(execution_id, step_name, "it is a map step: name an item to replay")
    if not mapped and item is not None:
        raise NotReplayable(execution_id, step_name, "it is no map step: it has no items")
    upstream = list(workflow.upstream(step_name))
    found = run(recorded, execution_id, step_name, upstream, item)
    if found.payloads_cleared_at is not None:
        raise NotReplayable(
            execution_id,
            step_name,
            f"its payloads (input, outputs) were cleared by retention on "
            f"{found.payloads_cleared_at:%Y-%m-%d %H:%M} UTC",
        )
    _check_contract(run, execution_id, step_name, workflow, found)
    outputs: dict[str, Any] = {}
    for name in upstream:
        status, output = found.upstream.get(name, ("missing", None))
        if status != StepStatus.SUCCEEDED.value:
            raise NotReplayable(
                execution_id, step_name, f"its upstream step {name!r} is {status}, not succeeded"
            )
        outputs[name] = output
    args: list[Any] = []
    context = ReplayContext(
        execution_id, step_name, found.attempt, workflow, found.input_data, item
    )
    if mapped:
        assert isinstance(step.wait, MapSpec)
        over = outputs.pop(step.wait.over)
        if not isinstance(over, list) or item is None or not 0 <= item < len(over):
            raise NotReplayable(execution_id, step_name, f"its map has no item {item}")
        args.append(over[item])
    try:
        if debug:
            value = pdb.runcall(step.fn, context, *args, **outputs)
        else:
            value = step.fn(context, *args, **outputs)
    except Exception as error:
        if debug:
            pdb.post_mortem(sys.exc_info()[2])
        return Replayed(
            execution_id,
            step_name,
            found.attempt,
            error=error,
            traceback="".join(traceback.format_exception(error)),
        )
    return Replayed(execution_id, step_name, found.attempt, output=step.to_json(value))


def _check_contract(
    run: Callable[..., Any], execution_id: str, step_name: str, workflow: Workflow, found: Recorded
) -> None:
    """Refuse a step whose contract in this code differs from the one it ran under."""
    if found.shape_hash is None:
        return  # begun before shapes were recorded: nothing to compare with
    shape = run(load_shape, found.shape_hash)
    if shape is None:
        return
    theirs = shape.steps.get(step_name)
    mine = shape_of(workflow).steps.get(step_name)
    if theirs != mine:
        changed = sorted(
            k
            for k in {*(mine or {}), *(theirs or {})}
            if (mine or {}).get(k) != (theirs or {}).get(k)
        )
        raise NotReplayable(
            execution_id,
            step_name,
            f"its contract changed since the execution began ({', '.join(changed)}): this "
            "code would not be given what it was",
        )
