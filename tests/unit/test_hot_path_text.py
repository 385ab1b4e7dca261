"""The hot path's PostgreSQL statements keep the SQL text psycopg and SQLAlchemy can cache.

A step's claim and completion run thousands of times a second across a fleet. psycopg
converts a query's ``%(name)s`` placeholders once per distinct text, but only for texts
of at most ``MAX_CACHED_STATEMENT_LENGTH`` bytes with at most
``MAX_CACHED_STATEMENT_PARAMS`` parameters: a longer one is parsed again on every
execution (a tenth of a worker's CPU when the completion was 5.5 KB). An expanding
parameter (``IN`` over a list) is rendered into the text on every execution, so only
the lists of step names are expanding (the planner needs their length: see
``core.step_statements._step_named``); constant lists are one bind per value.
"""

from __future__ import annotations

import re

import pytest
from psycopg import _queries
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.visitors import iterate

from core.map_statements import map_statements
from core.states import StepStatus
from core.step_statements import hot_path

FUSED = (
    "start_pg",
    "claim_pg",
    "complete_pg",
    "finish_pg",
    "outputs",
    "execution",
    "current",
    "hold",
    "continue_held_pg",
    "hand_off",
)
STEP_NAME_LISTS = {"names", "downstream", "here", "sinks"}


@pytest.mark.parametrize("names", [1, 8])
@pytest.mark.parametrize("name", FUSED)
def test_a_hot_statement_stays_within_psycopgs_query_cache(name: str, names: int) -> None:
    compiled = getattr(hot_path("postgresql"), name).compile(dialect=postgresql.psycopg.dialect())
    expanding = set(re.findall(r"POSTCOMPILE_(\w+)", str(compiled)))
    assert expanding <= STEP_NAME_LISTS, "a constant list is rendered per execution"

    # The text as executed for a chain (one name in each list) or an 8-wide fan-out.
    values = {key: ["s0001"] * names if key in expanding else "v" for key in compiled.binds}
    executed = compiled._process_parameters_for_postcompile(
        compiled.construct_params(values, _check=False)
    )
    assert len(executed.statement.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH
    assert len(executed.parameters) <= _queries.MAX_CACHED_STATEMENT_PARAMS


def test_the_completion_completes_only_what_a_worker_ran() -> None:
    # A wait leaves waiting through core.waits, never through a worker's completion: the
    # fused completion's text does not grow with the waiting status.
    compiled = str(hot_path("postgresql").complete_pg.compile(dialect=postgresql.dialect()))
    assert "waiting" not in compiled
    where = hot_path("postgresql").complete.whereclause
    assert where is not None
    statuses = {b.value for b in iterate(where) if isinstance(b, BindParameter)} & STATUSES
    assert statuses == {"running"}


STATUSES = {s.value for s in StepStatus}


def test_a_map_items_completion_stays_within_psycopgs_query_cache() -> None:
    statement = map_statements("postgresql").complete_pg
    assert statement is not None
    compiled = statement.compile(dialect=postgresql.psycopg.dialect())
    executed = compiled._process_parameters_for_postcompile(
        compiled.construct_params(dict.fromkeys(compiled.binds, "v"), _check=False)
    )
    assert len(executed.statement.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH
    assert len(executed.parameters) <= _queries.MAX_CACHED_STATEMENT_PARAMS
