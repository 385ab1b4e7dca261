"""The transition tables and what they imply for compare-and-set sources."""

from __future__ import annotations

import pytest

from core.errors import InvalidStatus, InvalidTransition
from core.states import EXECUTIONS, STEPS, ExecutionStatus, StepStatus


def test_final_statuses_have_no_forward_edges() -> None:
    assert EXECUTIONS.final == {
        ExecutionStatus.SUCCEEDED,
        ExecutionStatus.FAILED,
        ExecutionStatus.CANCELLED,
        ExecutionStatus.TIMED_OUT,
    }
    assert STEPS.final == {
        StepStatus.SUCCEEDED,
        StepStatus.FAILED,
        StepStatus.SKIPPED,
        StepStatus.CANCELLED,
    }


def test_sources_follow_the_table() -> None:
    assert EXECUTIONS.sources_of(ExecutionStatus.RUNNING) == {ExecutionStatus.PENDING}
    # A retry goes back to pending, to be admitted like a start.
    assert EXECUTIONS.sources_of(ExecutionStatus.RUNNING, retry=True) == frozenset()
    assert EXECUTIONS.sources_of(ExecutionStatus.PENDING, retry=True) == {
        ExecutionStatus.FAILED,
        ExecutionStatus.CANCELLED,
        ExecutionStatus.TIMED_OUT,
    }
    assert STEPS.sources_of(StepStatus.QUEUED) == {
        StepStatus.PENDING,
        StepStatus.QUEUED,
        StepStatus.RUNNING,
        StepStatus.WAITING,  # a task step held for a slot, admitted
    }
    # A wait is entered from pending; a step behind limits goes back to waiting for its
    # retry's backoff (running) or after a stall recovery (queued); no message can
    # claim a wait.
    assert STEPS.sources_of(StepStatus.WAITING) == {
        StepStatus.PENDING,
        StepStatus.WAITING,
        StepStatus.QUEUED,
        StepStatus.RUNNING,
    }
    assert StepStatus.WAITING not in STEPS.sources_of(StepStatus.RUNNING)
    assert StepStatus.WAITING in STEPS.open
    assert EXECUTIONS.sources_of(ExecutionStatus.PENDING) == frozenset()


def test_checks_name_the_problem() -> None:
    with pytest.raises(InvalidTransition, match="execution transition succeeded -> running"):
        EXECUTIONS.check(ExecutionStatus.SUCCEEDED, ExecutionStatus.RUNNING)
    with pytest.raises(InvalidTransition, match="new rows start as pending"):
        EXECUTIONS.check(None, ExecutionStatus.RUNNING)
    with pytest.raises(InvalidStatus, match="'finished' is not a valid step status"):
        STEPS.parse("finished")
    with pytest.raises(InvalidStatus):
        STEPS.parse(None)
    assert STEPS.parse("queued") is StepStatus.QUEUED
