"""Every compare-and-set statement moves rows only along edges of core/states.py.

Each statement is inspected, not run: the statuses its WHERE accepts (``status = x``,
``status IN (...)``) and the statuses its SET may write (a literal, or each branch of a
CASE), and every (source, target) pair must be an edge of the transition table.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Update
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, Case
from sqlalchemy.sql.visitors import iterate

from core import statements as sql
from core.states import EXECUTIONS, STEPS, ExecutionStatus, StateMachine, StepStatus
from core.step_statements import hot_path

KEYS = [("e", "s")]


def _literals(element: Any) -> Iterator[str]:
    """The values bound in ``element``: one parameter (a value, or an expanding list),
    or a list of parameters (``IN (:p1, :p2)``)."""
    for node in iterate(element):
        if isinstance(node, BindParameter):
            value = node.value
            if isinstance(value, list | tuple | set | frozenset):
                yield from (str(v) for v in value)
            elif value is not None:
                yield str(value)


def sources(statement: Update) -> set[str]:
    """Statuses the WHERE clause accepts for the updated table's ``status``."""
    found: set[str] = set()
    table = statement.table.name  # type: ignore[attr-defined]
    for element in iterate(statement.whereclause):
        if (
            isinstance(element, BinaryExpression)
            and getattr(getattr(element.left, "table", None), "name", None) == table
            and getattr(element.left, "key", None) == "status"
            and element.operator in (operators.eq, operators.in_op)
        ):
            found.update(_literals(element.right))
    return found


def targets(statement: Update) -> set[str]:
    """Statuses the SET clause may write (a CASE contributes each branch); a statement
    that leaves ``status`` alone keeps each row where it is."""
    value = next(
        (v for k, v in statement._values.items() if getattr(k, "key", k) == "status"), None
    )
    if value is None:
        return sources(statement)
    if isinstance(value, Case):
        branches = [result for _, result in value.whens] + [value.else_]
        found: set[str] = set()
        for branch in branches:
            if isinstance(branch, BindParameter):
                found.update(_literals(branch))
            # else: the row's own status, unchanged
        return found
    return set(_literals(value))


def check(machine: StateMachine[Any], statement: Update, *, retry: bool = False) -> None:
    found_sources, found_targets = sources(statement), targets(statement)
    assert found_sources, "a compare-and-set names the statuses it moves from"
    assert found_targets, "and the statuses it moves to"
    for source in found_sources:
        for target in found_targets:
            if source == target and machine is STEPS and source != StepStatus.QUEUED:
                continue  # a CASE branch that leaves the row as it is
            assert machine.is_allowed(machine.parse(source), machine.parse(target), retry=retry), (
                f"{source} -> {target} is not in the {machine.kind} table"
            )


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_the_hot_path_moves_steps_only_along_the_table(dialect: str) -> None:
    statements = hot_path(dialect)
    for statement in (
        statements.claim,
        statements.complete,
        statements.release,
        statements.continue_step,
    ):
        check(STEPS, statement)


def test_a_start_claims_its_first_root_through_queued_as_two_recorded_edges() -> None:
    # One UPDATE moves the claimed root pending -> running: the edges pending -> queued
    # and queued -> running, each written as its own event by the same statement.
    statement = hot_path("postgresql").start_roots
    assert sources(statement) == {StepStatus.PENDING.value}
    assert targets(statement) == {StepStatus.QUEUED.value, StepStatus.RUNNING.value}
    assert STEPS.is_allowed(StepStatus.PENDING, StepStatus.QUEUED)
    assert STEPS.is_allowed(StepStatus.QUEUED, StepStatus.RUNNING)


def test_step_statements_move_steps_only_along_the_table() -> None:
    running = frozenset({StepStatus.RUNNING})
    for statement in (
        sql.queue_roots(["e"]),
        sql.republish(KEYS),
        sql.cancel_steps_of(["e"]),
        sql.recover_stalled(KEYS, requeue=True, max_recoveries=3),
        sql.recover_stalled(KEYS, requeue=False, max_recoveries=3),
        sql.transition_steps("e", ["s"], StepStatus.QUEUED, running, attempt=1),
        sql.transition_steps("e", ["s"], StepStatus.FAILED, running, attempt=1),
        sql.transition_steps("e", None, StepStatus.SKIPPED, frozenset({StepStatus.PENDING})),
    ):
        check(STEPS, statement)
    retried = sql.transition_steps(
        "e", ["s"], StepStatus.PENDING, STEPS.sources_of(StepStatus.PENDING, retry=True), retry=True
    )
    check(STEPS, retried, retry=True)


def test_execution_statements_move_executions_only_along_the_table() -> None:
    for statement in (
        sql.finish_executions_if_done(["e"]),
        hot_path("postgresql").finish,
        hot_path("postgresql").start,
        sql.transition_execution(["e"], ExecutionStatus.RUNNING, {ExecutionStatus.PENDING}),
        sql.transition_execution(
            ["e"], ExecutionStatus.TIMED_OUT, EXECUTIONS.sources_of(ExecutionStatus.TIMED_OUT)
        ),
    ):
        check(EXECUTIONS, statement)


def test_the_checker_refuses_an_edge_the_table_does_not_have() -> None:
    illegal = sql.transition_steps("e", ["s"], StepStatus.RUNNING, frozenset({StepStatus.PENDING}))
    with pytest.raises(AssertionError, match="pending -> running is not in the step table"):
        check(STEPS, illegal)
